"""Staleness: how far moving statistics are from the batch statistics."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from tfloop.bn.averaging import _initial_weight
from tfloop.bn.precise import _calibration_moments, _calibration_targets, _images_of


@dataclasses.dataclass(frozen=True)
class Staleness:
    """How far one layer's moving statistics are from a batch's own.

    Attributes:
      layer: the layer's path.
      mean_shift: mean over channels of |moving mean - batch mean| / batch std.
      log_variance_ratio: mean over channels of |log(moving var / batch var)|.
      initial_weight: the weight the initializer (0 and 1) still carries in
        the moving statistics: 0 for zero-debiased averages after one update,
        decay ** steps for plain ones.
    """

    layer: str
    mean_shift: float
    log_variance_ratio: float
    initial_weight: float


def staleness(model: keras.Model, batch) -> list[Staleness]:
    """Compares every BN layer's moving statistics with a batch's own, per layer.

    Scale-free, so layers compare with each other: a mean shift of 1 means the
    moving mean is one standard deviation off. Values near 0 mean the moving
    statistics describe the batch; large ones mean validation with them will
    not reflect the model (the classic "val loss stays at ln(4)" symptom).
    Changes no variable. `batch` is `images` or `(images, labels, ...)`.
    """
    targets = _calibration_targets(model)
    moments = _moments_function(model, targets)(_images_of(batch))
    report = []
    for i, (layer, layer_state) in enumerate(targets):
        if i not in moments:
            continue
        eps = layer.epsilon
        _, batch_mean, batch_var = (t.numpy() for t in moments[i])
        batch_var = batch_var + eps
        moving_var = layer.moving_variance.numpy() + eps
        decay = layer.momentum if layer_state.decay is None else layer_state.decay
        report.append(
            Staleness(
                layer=layer.path,
                mean_shift=float(
                    np.mean(
                        np.abs(layer.moving_mean.numpy() - batch_mean)
                        / np.sqrt(batch_var)
                    )
                ),
                log_variance_ratio=float(
                    np.mean(np.abs(np.log(moving_var / batch_var)))
                ),
                initial_weight=_initial_weight(
                    decay, int(layer_state.count.numpy()), layer_state.averaging
                ),
            )
        )
    return report


# Traced passes, per model and layers: a staleness report before every
# validation must not trace (and warn about retracing) each time.
_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _moments_function(model: keras.Model, targets) -> Callable:
    functions = _FUNCTIONS.setdefault(model, {})
    key = tuple(id(layer) for layer, _ in targets)
    if key not in functions:
        model_ref = weakref.ref(model)  # The cache must not keep the model alive.
        functions[key] = tf.function(
            lambda images: _calibration_moments(model_ref(), targets, images)
        )
    return functions[key]
