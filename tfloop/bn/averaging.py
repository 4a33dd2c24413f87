"""Moving averages: fused cross-replica moments and the (debiased) EMA update."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfloop.bn.ownership import _Collector, _LayerState, _Moments

# How the moving average treats its first updates; see `_effective_decay`.
AVERAGING_MODES = ("debias", "ramp", "plain")


def _pool(moments: Sequence[_Moments]) -> _Moments:
    """Merges moments of several calls of one layer (shared layers) exactly."""
    if len(moments) == 1:
        return moments[0]
    count = tf.add_n([m.count for m in moments])
    mean = tf.add_n([m.count * m.mean for m in moments]) / count
    variance = (
        tf.add_n([m.count * (m.variance + tf.square(m.mean - mean)) for m in moments])
        / count
    )
    return _Moments(count, mean, variance, synced=all(m.synced for m in moments))


def _cross_replica_moments(
    per_layer: Sequence[_Moments], shifts: Sequence[tf.Tensor]
) -> list[_Moments]:
    """Global-batch moments of every layer from one fused all-reduce.

    Each replica contributes, per layer, its count n and the shifted sums
    n * (mean - K) and n * (variance + (mean - K)^2), where the shift K is the
    layer's moving mean (identical on every replica). The global moments are
    then exact, within-replica plus between-replica variance, and the shift
    keeps the subtraction `E[(x-K)^2] - E[x-K]^2` well conditioned.
    """
    replica_context = tf.distribute.get_replica_context()
    if (
        not per_layer
        or replica_context is None
        or replica_context.num_replicas_in_sync == 1
    ):
        return list(per_layer)
    # Vectorized over all layers' channels: a fixed number of ops, however
    # many layers there are.
    channels = [m.mean.shape[0] for m in per_layer]
    counts = tf.stack([m.count for m in per_layer])
    shift = tf.concat(list(shifts), axis=0)
    delta = tf.concat([m.mean for m in per_layer], axis=0) - shift
    variance = tf.concat([m.variance for m in per_layer], axis=0)
    # Each channel's count: its layer's.
    layer_of_channel = np.repeat(np.arange(len(channels)), channels)
    per_channel = tf.gather(counts, layer_of_channel)
    fused = replica_context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.stop_gradient(
            tf.concat(
                [
                    per_channel * delta,
                    per_channel * (variance + tf.square(delta)),
                    counts,
                ],
                axis=0,
            )
        ),
    )
    first, second, counts = tf.split(fused, [sum(channels), sum(channels), -1])
    per_channel = tf.gather(counts, layer_of_channel)
    delta = first / per_channel
    variance = tf.maximum(second / per_channel - tf.square(delta), 0.0)
    return [
        _Moments(count, mean, var, synced=True)
        for count, mean, var in zip(
            tf.unstack(counts),
            tf.split(shift + delta, channels),
            tf.split(variance, channels),
        )
    ]


def _effective_decay(
    decay: float | Sequence[float], count: tf.Tensor, averaging: str
) -> tf.Tensor:
    """The weight the old moving value gets at update number `count + 1`.

    Elementwise: `decay` and `count` may be vectors (one entry per layer).

    - `debias` (default): the zero-debiased average of Sonnet's
      `ExponentialMovingAverage` and `assign_moving_average(zero_debias=True)`,
      kept in debiased form: the value after t updates is
      sum_i (1-d) d^(t-i) x_i / (1 - d^t), so the initial value carries no
      weight and after one update the statistics *are* that batch's. It equals
      an EMA whose decay at update t+1 is d (1 - d^t) / (1 - d^(t+1)).
    - `ramp`: TF's `ExponentialMovingAverage(num_updates=t)`,
      min(d, (1 + t) / (10 + t)); the initial value keeps a small weight.
    - `plain`: the stock Keras/slim average with constant decay d.
    """
    t = tf.cast(count, tf.float64)
    d = tf.constant(decay, tf.float64)
    if averaging == "debias":
        value = d * (1.0 - d**t) / (1.0 - d ** (t + 1.0))
    elif averaging == "ramp":
        value = tf.minimum(d, (1.0 + t) / (10.0 + t))
    else:
        value = d
    return tf.cast(value, tf.float32)


def _apply_updates(
    owned: Sequence[tuple[keras.layers.Layer, _LayerState]],
    collector: _Collector,
    *,
    decay: float | None,
    averaging: str,
) -> None:
    """Updates every layer that reported moments, once, from the global batch.

    Runs in replica context, after the forward pass: this is tfloop's
    counterpart of slim's `UPDATE_OPS` barrier.
    """
    reported = [
        (layer, layer_state, _pool(collector.moments[id(layer)]))
        for layer, layer_state in owned
        if id(layer) in collector.moments
    ]
    local = [(i, m) for i, (_, _, m) in enumerate(reported) if not m.synced]
    reduced = _cross_replica_moments(
        [m for _, m in local],
        [tf.stop_gradient(reported[i][0].moving_mean.value) for i, _ in local],
    )
    moments = [m for _, _, m in reported]
    for (i, _), m in zip(local, reduced):
        moments[i] = m
    if not reported:
        return
    # The decays of all layers as one vector: a few ops in all, not per layer.
    keeps = tf.unstack(
        _effective_decay(
            [layer.momentum if decay is None else decay for layer, _, _ in reported],
            tf.stack([layer_state.count for _, layer_state, _ in reported]),
            averaging,
        )
    )
    for (layer, layer_state, _), m, keep in zip(reported, moments, keeps):
        for variable, batch_value in (
            (layer.moving_mean, m.mean),
            (layer.moving_variance, m.variance),
        ):
            new_value = keep * variable.value + (1.0 - keep) * tf.stop_gradient(
                tf.cast(batch_value, tf.float32)
            )
            variable.assign(tf.cast(new_value, variable.dtype))
        layer_state.count.assign_add(1)


def _initial_weight(decay: float, count: int, averaging: str) -> float:
    """The weight the initializer still carries in the moving statistics.

    Zero-debiased averages give it no weight after the first update; plain
    ones give it decay ** count (0.9997 ** 1000 = 0.74: slim's decay needs
    thousands of steps); the ramp gives it the product of its decays.
    """
    if averaging == "debias":
        return 0.0 if count > 0 else 1.0
    if averaging == "plain":
        return float(decay**count)
    t = np.arange(count, dtype=np.float64)
    return float(np.prod(np.minimum(decay, (1.0 + t) / (10.0 + t))))


