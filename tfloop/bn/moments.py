"""Batch moments: per layer and call, pooled exactly across calls and replicas.

Everything that merges moments does it in float64 from (count, mean,
variance) or from sums shifted by a per-channel constant, never as
`E[x^2] - E[x]^2` in float32: with features of mean 1e4 and standard
deviation 1 that form loses every digit of the variance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import tensorflow as tf


@dataclasses.dataclass
class _Moments:
    """Batch moments one call of one layer reported, per channel."""

    count: tf.Tensor  # Scalar: elements reduced per channel.
    mean: tf.Tensor
    variance: tf.Tensor
    synced: bool  # Already the global-batch moments of all replicas.


def _pool(moments: Sequence[_Moments]) -> _Moments:
    """Merges moments of several calls of one layer (shared layers) exactly."""
    if len(moments) == 1:
        return moments[0]
    moments = [
        _Moments(
            *(tf.cast(t, tf.float64) for t in (m.count, m.mean, m.variance)), m.synced
        )
        for m in moments
    ]
    count = tf.add_n([m.count for m in moments])
    mean = tf.math.divide_no_nan(tf.add_n([m.count * m.mean for m in moments]), count)
    variance = tf.math.divide_no_nan(
        tf.add_n([m.count * (m.variance + tf.square(m.mean - mean)) for m in moments]),
        count,
    )
    return _Moments(count, mean, variance, synced=all(m.synced for m in moments))


def _shifted_sums(moments: _Moments, shift: tf.Tensor) -> tf.Tensor:
    """[n (mean - K), n (variance + (mean - K)^2)] in float64: summable over replicas."""
    n = tf.cast(moments.count, tf.float64)
    delta = tf.cast(moments.mean, tf.float64) - tf.cast(shift, tf.float64)
    variance = tf.cast(moments.variance, tf.float64)
    # An empty shard has NaN moments; it contributes nothing.
    delta = tf.where(n > 0, delta, 0.0)
    variance = tf.where(n > 0, variance, 0.0)
    return tf.concat([n * delta, n * (variance + tf.square(delta))], axis=0)


def _from_shifted_sums(
    count: tf.Tensor, sums: tf.Tensor, shift: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean and variance (float64) back from summed `_shifted_sums`."""
    first, second = tf.split(sums, 2)
    delta = tf.math.divide_no_nan(first, count)
    variance = tf.maximum(tf.math.divide_no_nan(second, count) - tf.square(delta), 0.0)
    return tf.cast(shift, tf.float64) + delta, variance


def _batch_moments(
    layer, x, mask, *, sync: bool
) -> tuple[tf.Tensor, tf.Tensor, _Moments]:
    """Mean and variance to normalize `x` with, and the moments to report.

    Only the reported moments are guarded against empty shards: the guard
    stays out of the gradient computation.
    """
    axes = layer._reduction_axes
    if mask is not None:
        if sync:
            raise ValueError(
                f"`sync_bn=True` does not support masked inputs (layer `{layer.name}`)."
            )
        weights = tf.broadcast_to(
            tf.cast(tf.expand_dims(mask, -1), x.dtype), tf.shape(x)
        )
        mean, variance = tf.nn.weighted_moments(x, axes, weights)
        count = tf.reduce_sum(weights) / tf.cast(tf.shape(x)[layer.axis], x.dtype)
        return mean, variance, _Moments(count, mean, variance, synced=False)
    count = _element_count(x, axes)
    mean, variance = tf.nn.moments(x, axes)  # Two-pass: exact at any mean.
    context = tf.distribute.get_replica_context()
    if sync and context is not None and context.num_replicas_in_sync > 1:
        return _synchronized(layer, context, _Moments(count, mean, variance, False))
    if tf.get_static_value(count):
        return mean, variance, _Moments(count, mean, variance, synced=False)
    # An empty shard (last batch of a split) counts for nothing.
    return (
        mean,
        variance,
        _Moments(
            count,
            tf.where(count > 0, mean, 0.0),
            tf.where(count > 0, variance, 0.0),
            synced=False,
        ),
    )


def _synchronized(
    layer, context, local: _Moments
) -> tuple[tf.Tensor, tf.Tensor, _Moments]:
    """Global-batch moments in the forward pass: one all-reduce, differentiable.

    Keras' `synchronized=True` all-reduces sum(x) and sum(x^2) in float32,
    which loses the variance of features with a large mean; this reduces
    float64 sums shifted by the moving mean instead.
    """
    shift = tf.stop_gradient(layer.moving_mean.value)
    total = context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.concat(
            [_shifted_sums(local, shift), [tf.cast(local.count, tf.float64)]], axis=0
        ),
    )
    count = total[-1]
    mean, variance = _from_shifted_sums(count, total[:-1], shift)
    dtype = local.mean.dtype
    mean, variance = tf.cast(mean, dtype), tf.cast(variance, dtype)
    return mean, variance, _Moments(count, mean, variance, synced=True)


def _element_count(x: tf.Tensor, axes: Sequence[int]) -> tf.Tensor:
    """Elements per channel of `x` (float32), a constant when shapes are static."""
    known = 1
    unknown = []
    for axis in axes:
        if x.shape[axis] is None:
            unknown.append(axis)
        else:
            known *= x.shape[axis]
    if not unknown:
        return tf.constant(known, tf.float32)
    dynamic = tf.reduce_prod(tf.gather(tf.shape(x), unknown))
    return tf.cast(dynamic * known, tf.float32)
