"""Precise BN: recompute moving statistics for the current weights."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from tfloop.bn.averaging import _collect
from tfloop.bn.ownership import _Collector, _LayerState, _Moments, _own_model


def _calibration_targets(
    model: keras.Model,
) -> list[tuple[keras.layers.Layer, _LayerState]]:
    """Owned layers whose statistics may be recomputed (not frozen)."""
    return [(l, s) for l, s in _own_model(model) if not s.frozen and l.trainable]


def _calibration_moments(model: keras.Model, targets, images) -> dict[int, _Moments]:
    """Inference-mode forward pass in which BN layers use batch moments.

    Upstream BN layers normalize with their batch statistics, as in training
    and as in fvcore's and pycls's precise BN: one pass gives every layer's
    statistics. Returns global-batch (count, mean, variance) by position in
    `targets`.
    """
    collector = _Collector(calibrate=True)
    with collector:
        model(images, training=False)
    reported, _ = _collect(targets, collector)
    position = {id(layer): i for i, (layer, _) in enumerate(targets)}
    return {
        position[id(layer)]: (m.count, m.mean, m.variance)
        for (layer, _), m in zip(reported.layers, reported.moments)
    }


def _images_of(element):
    return element[0] if isinstance(element, (tuple, list)) else element


def recalibrate(
    model: keras.Model,
    dataset,
    *,
    num_batches: int,
    strategy: tf.distribute.Strategy | None = None,
) -> int:
    """Sets BN moving statistics to their population values for the current weights.

    Moving averages lag weights that change fast; this is precise BN
    (Wu & Johnson, 2021): a forward-only pass over `num_batches` batches of
    `dataset` (elements `images` or `(images, labels, ...)`, any batch sizes, a
    last partial one included), in inference mode (dropout off) except that BN
    layers normalize with batch statistics. Every owned, unfrozen BN layer's
    moving mean and variance become the mean and variance of all its inputs
    over those batches, pooled exactly (Chan's merge in float64) across
    batches, replicas and workers; its update count becomes the number of
    batches, so later zero-debiased updates weigh them as that many batches.
    No other variable changes. Frozen layers (`freeze`, `trainable=False`)
    are left alone.

    The first BN layer's statistics are exact. Deeper layers see upstream BN
    layers normalizing with batch statistics, as in training (fvcore and
    pycls do the same): one pass serves all layers, where using recalibrated
    upstream statistics would take one pass per layer.

    Args:
      model: the model; its BN layers are taken over as by a train step.
      dataset: a `tf.data.Dataset`, or a distributed dataset of `strategy`.
      num_batches: how many batches to use (fewer if the dataset ends).
      strategy: the strategy the model was built under; None: the current.

    Returns:
      The number of batches used.
    """
    if num_batches < 1:
        raise ValueError(f"`num_batches` must be at least 1, got {num_batches!r}.")
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        targets = _calibration_targets(model)
    if isinstance(dataset, tf.data.Dataset):
        dataset = strategy.experimental_distribute_dataset(dataset.take(num_batches))

    batch_moments = _calibration_function(model, targets, strategy)
    totals: dict[int, tuple[float, np.ndarray, np.ndarray]] = {}
    used = 0
    for element in dataset:
        if used == num_batches:
            break
        for i, (count, mean, variance) in batch_moments(element).items():
            totals[i] = _chan_merge(
                totals.get(i),
                (
                    float(count),
                    mean.numpy().astype(np.float64),
                    variance.numpy().astype(np.float64),
                ),
            )
        used += 1
    if used == 0:
        raise ValueError("`dataset` yielded no batches to recalibrate with.")
    for i, (_, mean, variance) in totals.items():
        layer, layer_state = targets[i]
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
        layer_state.count.assign(used)
    return used


# Traced calibration passes, per model and (strategy, layers), so that a
# recalibration before every validation does not trace again each time.
_CALIBRATION_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _calibration_function(model, targets, strategy) -> Callable:
    """The `tf.function` of one calibration batch: global (count, mean, var)."""
    functions = _CALIBRATION_FUNCTIONS.setdefault(model, {})
    key = (strategy, tuple(id(layer) for layer, _ in targets))
    if key not in functions:
        model_ref = weakref.ref(model)  # The cache must not keep the model alive.

        @tf.function
        def batch_moments(element):
            def replica_fn(element):
                return _calibration_moments(model_ref(), targets, _images_of(element))

            per_replica = strategy.run(replica_fn, args=(element,))
            # After the fused all-reduce, every replica holds the same values.
            return strategy.experimental_local_results(per_replica)[0]

        functions[key] = batch_moments
    return functions[key]


def _chan_merge(a, b):
    """Merges (count, mean, variance) of two sets exactly and stably (Chan et al.)."""
    if a is None or a[0] == 0:
        return b
    if b[0] == 0:
        return a
    (na, ma, va), (nb, mb, vb) = a, b
    n = na + nb
    delta = mb - ma
    mean = ma + delta * (nb / n)
    m2 = va * na + vb * nb + delta**2 * (na * nb / n)
    return n, mean, m2 / n
