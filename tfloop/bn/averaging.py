"""Moving averages: one fused cross-replica reduction, then the (debiased) EMA.

A train step reports every owned layer's batch moments (`_Collector`); this
module turns them into global-batch moments with one all-reduce for all layers
(which also carries the step's other sums, e.g. the global example count that
normalizes the loss), then updates every layer's moving statistics once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfloop.bn.moments import _from_shifted_sums, _Moments, _shifted_sums
from tfloop.bn.ownership import _HISTORY_COUNT, _Collector, _LayerState

# How the moving average treats its first updates; see `_effective_decay`.
AVERAGING_MODES = ("debias", "ramp", "plain")


def _cross_replica_moments(
    per_layer: Sequence[_Moments],
    shifts: Sequence[tf.Tensor],
    sums: Sequence[tf.Tensor] = (),
) -> tuple[list[_Moments], list[tf.Tensor]]:
    """Global-batch moments of every layer, and global `sums`, from one all-reduce.

    Each replica contributes, per layer, its count n and the shifted sums
    n (mean - K) and n (variance + (mean - K)^2) in float64, where the shift K
    is the layer's moving mean (identical on every replica); `sums` are extra
    float64 scalars summed alongside. The global moments are exact
    (within-replica plus between-replica variance) at any feature mean.
    Outside a multi-replica context nothing is reduced.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return list(per_layer), [tf.cast(s, tf.float64) for s in sums]
    if not per_layer and not sums:
        return [], []
    # Vectorized over all layers' channels: a fixed number of ops, however
    # many layers there are.
    channels = [m.mean.shape[0] for m in per_layer]
    packed = [tf.stop_gradient(_shifted_sums(m, k)) for m, k in zip(per_layer, shifts)]
    counts = [tf.cast(m.count, tf.float64) for m in per_layer]
    fused = context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.concat(
            packed + [tf.stack(counts + [tf.cast(s, tf.float64) for s in sums])],
            axis=0,
        ),
    )
    pieces = tf.split(fused, [2 * c for c in channels] + [len(counts) + len(sums)])
    scalars = tf.unstack(pieces[-1])
    reduced = []
    for m, shift, piece, count in zip(per_layer, shifts, pieces, scalars):
        mean, variance = _from_shifted_sums(count, piece, shift)
        reduced.append(_Moments(count, mean, variance, synced=True))
    return reduced, scalars[len(counts) :]


def _effective_decay(
    decay: float | Sequence[float], count: tf.Tensor, averaging: str
) -> tf.Tensor:
    """The weight the old moving value gets at update number `count + 1` (float64).

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

    Statistics restored from elsewhere carry `_HISTORY_COUNT`, where every
    mode gives decay d.
    """
    t = tf.cast(count, tf.float64)
    d = tf.constant(decay, tf.float64)
    if averaging == "debias":
        return d * (1.0 - d**t) / (1.0 - d ** (t + 1.0))
    if averaging == "ramp":
        return tf.minimum(d, (1.0 + t) / (10.0 + t))
    return d * tf.ones_like(t)


@dataclasses.dataclass
class _Reported:
    """The layers that reported moments in one forward pass, and their moments."""

    layers: list[tuple[keras.layers.Layer, _LayerState]]
    moments: list[_Moments]


def _collect(
    owned: Sequence[tuple[keras.layers.Layer, _LayerState]],
    collector: _Collector,
    sums: Sequence[tf.Tensor] = (),
) -> tuple[_Reported, list[tf.Tensor]]:
    """Global-batch moments of every reporting layer, and global `sums`.

    Runs in replica context after the forward pass: tfloop's counterpart of
    slim's `UPDATE_OPS` barrier. One all-reduce carries every layer that is
    not already synchronized, and `sums`.
    """
    layers = [(l, s) for l, s in owned if collector.reported(l, s)]
    moments = [collector.take(l, s) for l, s in layers]
    local = [i for i, m in enumerate(moments) if not m.synced]
    reduced, sums = _cross_replica_moments(
        [moments[i] for i in local],
        [tf.stop_gradient(layers[i][0].moving_mean.value) for i in local],
        sums,
    )
    for i, m in zip(local, reduced):
        moments[i] = m
    return _Reported(layers, moments), sums


def _apply_updates(reported: _Reported, *, decay: float | None, averaging: str) -> None:
    """Updates every reporting layer's moving statistics once.

    A layer whose global count is 0 this step (its branch of a `tf.cond` ran
    on no replica, or every shard was empty) is left as it is. At count 0,
    statistics that differ from the initializer's came from elsewhere
    (restored, pretrained, `model.fit`): they count as a long history
    (`_HISTORY_COUNT`), so the first step does not throw them away.
    """
    if not reported.layers:
        return
    counts = tf.stack([s.count.value() for _, s in reported.layers])
    counts = tf.where(
        (counts == 0) & _restored(reported.layers),
        tf.constant(_HISTORY_COUNT, tf.int64),
        counts,
    )
    # The decays of all layers as one vector: a few ops in all, not per layer.
    keeps = tf.unstack(
        _effective_decay(
            [
                layer.momentum if decay is None else decay
                for layer, _ in reported.layers
            ],
            counts,
            averaging,
        )
    )
    for (layer, layer_state), m, keep, count in zip(
        reported.layers, reported.moments, keeps, tf.unstack(counts)
    ):
        layer_state.averaging, layer_state.decay = averaging, decay
        updated = m.count > 0
        for variable, batch_value in (
            (layer.moving_mean, m.mean),
            (layer.moving_variance, m.variance),
        ):
            old = variable.value
            keep_ = tf.cast(keep, old.dtype)
            new_value = keep_ * old + (1.0 - keep_) * tf.stop_gradient(
                tf.cast(batch_value, old.dtype)
            )
            variable.assign(tf.where(updated, new_value, old))
        layer_state.count.assign(count + tf.cast(updated, tf.int64))


def _restored(layers: Sequence[tuple[keras.layers.Layer, _LayerState]]) -> tf.Tensor:
    """Per layer: do its moving statistics differ from the initializer's values?

    Vectorized over all layers' channels, like the reduction. A layer whose
    initializer is not constant (its initial values are unknown) is never
    taken as restored.
    """
    known = [i for i, (_, s) in enumerate(layers) if s.initial is not None]
    if not known:
        return tf.zeros([len(layers)], tf.bool)
    values, initial, segments = [], [], []
    for position, i in enumerate(known):
        layer, layer_state = layers[i]
        for variable, value in zip(
            (layer.moving_mean, layer.moving_variance), layer_state.initial
        ):
            values.append(tf.cast(variable.value, tf.float64))
            initial.append(value.astype(np.float64))
            segments.append(np.full(value.shape, position))
    differs = tf.math.unsorted_segment_max(
        tf.cast(tf.not_equal(tf.concat(values, 0), np.concatenate(initial)), tf.int32),
        np.concatenate(segments),
        len(known),
    )
    return tf.scatter_nd(np.array(known)[:, None], differs > 0, [len(layers)])


def _initial_weight(decay: float, count: int, averaging: str) -> float:
    """The weight the initializer still carries in the moving statistics.

    Zero-debiased averages give it no weight after the first update; plain
    ones give it decay ** count (0.9997 ** 1000 = 0.74: slim's decay needs
    thousands of steps); the ramp gives it the product of its decays.
    Restored statistics (`_HISTORY_COUNT`) carry none of it.
    """
    if count >= _HISTORY_COUNT:
        return 0.0
    if averaging == "debias":
        return 0.0 if count > 0 else 1.0
    if averaging == "plain":
        return float(decay**count)
    t = np.arange(count, dtype=np.float64)
    return float(np.prod(np.minimum(decay, (1.0 + t) / (10.0 + t))))
