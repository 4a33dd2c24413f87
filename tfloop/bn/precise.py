"""Precise BN: recompute moving statistics for the current weights."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple

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
    tolerance: float = 0.0,
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

    With a `tolerance`, the pass stops early once the statistics are known
    well enough: after at least `MIN_BATCHES` batches, when for every layer
    the root mean square over channels of the estimated relative error
    (the standard error of the mean in units of the standard deviation, and
    half the relative standard error of the variance: each is how far the
    normalized output would move) is at most `tolerance`. Standard errors
    come from the spread between batches, so they include what upstream
    batch statistics add. The test runs on the device, in the same call:
    stopping early costs no host round trip.

    Args:
      model: the model; its BN layers are taken over as by a train step.
      dataset: a `tf.data.Dataset`, or a distributed dataset of `strategy`.
      num_batches: how many batches to use at most (fewer if the dataset
        ends, or with `tolerance`, once the statistics have converged).
      strategy: the strategy the model was built under; None: the current.
      tolerance: stop once the relative error above is at most this; 0:
        always use `num_batches` batches.

    Returns:
      The number of batches used; 0 if no layer may be recalibrated (the
      model has no BN layer, or all are frozen), without reading `dataset`.
    """
    if num_batches < 1:
        raise ValueError(f"`num_batches` must be at least 1, got {num_batches!r}.")
    if not tolerance >= 0:  # Also refuses NaN.
        raise ValueError(f"`tolerance` must be at least 0, got {tolerance!r}.")
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        targets = _calibration_targets(model)
    if not targets:  # No BN layer, or all frozen: nothing to recompute.
        return 0
    if isinstance(dataset, tf.data.Dataset):
        dataset = strategy.experimental_distribute_dataset(dataset.take(num_batches))
    calibration_pass = _calibration_function(model, targets, strategy)
    used, counts, means, variances = (
        t.numpy()
        for t in calibration_pass(
            iter(dataset),
            tf.constant(num_batches, tf.int32),
            tf.constant(tolerance, tf.float64),
        )
    )
    if used == 0:
        raise ValueError("`dataset` yielded no batches to recalibrate with.")
    channels = np.cumsum([layer.moving_mean.shape[0] for layer, _ in targets])[:-1]
    for (layer, layer_state), count, mean, variance in zip(
        targets, counts, np.split(means, channels), np.split(variances, channels)
    ):
        if count == 0:  # Not reached by the forward pass: left alone.
            continue
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
        layer_state.count.assign(used)
    return int(used)


# Traced calibration passes, per model and (strategy, layers), so that a
# recalibration before every validation does not trace again each time.
_CALIBRATION_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _calibration_function(model, targets, strategy) -> Callable:
    """The `tf.function` of a whole calibration pass over an iterator.

    All batches are merged on the device, in float64, inside one call (one
    host round trip per recalibration, not one per batch). It returns the
    number of batches used, and per target layer its element count and per
    channel (all layers' channels concatenated) the pooled mean and variance.
    """
    functions = _CALIBRATION_FUNCTIONS.setdefault(model, {})
    key = (strategy, tuple(id(layer) for layer, _ in targets))
    if key in functions:
        return functions[key]
    model_ref = weakref.ref(model)  # The cache must not keep the model alive.
    channels = [layer.moving_mean.shape[0] for layer, _ in targets]
    layer_of_channel = np.repeat(np.arange(len(channels)), channels)
    epsilon = np.repeat([layer.epsilon for layer, _ in targets], channels)

    def batch_totals(element) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        moments = _calibration_moments(model_ref(), targets, _images_of(element))
        zeros = [tf.zeros([c], tf.float64) for c in channels]
        parts = [moments.get(i, (0.0, z, z)) for i, z in enumerate(zeros)]
        return tuple(
            tf.concat([tf.reshape(tf.cast(p[k], tf.float64), [-1]) for p in parts], 0)
            for k in range(3)
        )

    @tf.function
    def calibration_pass(iterator, num_batches, tolerance):
        counts = tf.zeros([len(channels)], tf.float64)
        mean = m2 = tf.zeros([sum(channels)], tf.float64)
        spread = _Spread.zeros(sum(channels))
        used = tf.constant(0, tf.int32)
        for _ in tf.range(num_batches):
            optional = iterator.get_next_as_optional()
            if not optional.has_value():
                break
            per_replica = strategy.run(batch_totals, args=(optional.get_value(),))
            # After the fused all-reduce, every replica holds the same values.
            batch = strategy.experimental_local_results(per_replica)[0]
            counts, mean, m2 = _chan_merge((counts, mean, m2), batch, layer_of_channel)
            spread = spread.add(batch[1], batch[2])
            used += 1
            if tolerance > 0 and used >= MIN_BATCHES:
                variance = m2 / tf.gather(tf.maximum(counts, 1.0), layer_of_channel)
                error = spread.relative_error(variance + epsilon, layer_of_channel)
                if tf.reduce_max(error) <= tolerance:
                    break
        per_channel = tf.gather(counts, layer_of_channel)
        return used, counts, mean, tf.math.divide_no_nan(m2, per_channel)

    functions[key] = calibration_pass
    return calibration_pass


# Batches a tolerance-based stop needs at least: the spread between batches
# must be estimated before it can say the statistics have converged.
MIN_BATCHES = 4


class _Spread(NamedTuple):
    """Per channel sums over batches of batch means, variances and squares."""

    batches: tf.Tensor
    means: tf.Tensor
    squared_means: tf.Tensor
    variances: tf.Tensor
    squared_variances: tf.Tensor

    @classmethod
    def zeros(cls, channels: int) -> _Spread:
        zeros = tf.zeros([channels], tf.float64)
        return cls(tf.constant(0.0, tf.float64), zeros, zeros, zeros, zeros)

    def add(self, mean: tf.Tensor, variance: tf.Tensor) -> _Spread:
        return _Spread(
            self.batches + 1.0,
            self.means + mean,
            self.squared_means + tf.square(mean),
            self.variances + variance,
            self.squared_variances + tf.square(variance),
        )

    def relative_error(self, variance: tf.Tensor, layer_of_channel) -> tf.Tensor:
        """Per layer, the RMS over channels of the pooled estimates' error.

        The squared standard errors of the mean (over `variance`) and of the
        variance (over `4 variance**2`, since the normalized output moves by
        half the variance's relative error), from the spread between batch
        values: sample variance / number of batches.
        """
        n = self.batches

        def squared_standard_error(total, squares):
            return tf.maximum(squares - tf.square(total) / n, 0.0) / (n * (n - 1.0))

        squared = squared_standard_error(
            self.means, self.squared_means
        ) / variance + squared_standard_error(
            self.variances, self.squared_variances
        ) / (4.0 * tf.square(variance))
        per_layer = tf.math.unsorted_segment_mean(
            squared, layer_of_channel, int(layer_of_channel.max()) + 1
        )
        return tf.sqrt(per_layer)


def _chan_merge(totals, batch, layer_of_channel):
    """Merges a batch's (counts, mean, variance) into running (counts, mean, M2).

    Chan et al.'s pairwise update, exact and stable: M2 is the sum of squared
    deviations from the mean. Counts are per layer, the rest per channel;
    empty sets (count 0) change nothing.
    """
    counts, mean, m2 = totals
    batch_counts, batch_mean, batch_variance = batch
    new_counts = counts + batch_counts
    na, nb, n = (
        tf.gather(c, layer_of_channel) for c in (counts, batch_counts, new_counts)
    )
    delta = batch_mean - mean
    mean = mean + delta * tf.math.divide_no_nan(nb, n)
    m2 = m2 + batch_variance * nb + tf.square(delta) * tf.math.divide_no_nan(na * nb, n)
    return new_counts, mean, m2
