"""`optimize_loss(check_numerics=...)`: a NaN loss or gradient stops the step before the update."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from optimize_reference import (
    B0,
    LR,
    W0,
    _assert_weights,
    _batches,
    _loss,
    _model,
    _train,
    _weights,
)

from tfloop import optimize


def _nan_labels_batch():
    x, y = _batches(steps=1)[0]
    y = y.copy()
    y[0, 0] = np.nan
    return x, y


def test_check_numerics_raises_on_nan_loss_before_the_update():
    model = _model()
    step = optimize.optimize_loss(model, _loss, learning_rate=LR, optimizer="SGD")
    with pytest.raises(tf.errors.InvalidArgumentError, match="loss is inf or nan"):
        _train(step, [_nan_labels_batch()])
    _assert_weights(model, [W0, B0], rtol=0)


def test_check_numerics_guards_a_nan_loss_with_finite_gradients():
    """A NaN that reaches the loss but not the gradients still stops the step."""

    def nan_offset_loss(labels, logits):
        return _loss(labels, logits) + tf.stop_gradient(tf.constant(np.nan, tf.float32))

    model = _model()
    step = optimize.optimize_loss(
        model, nan_offset_loss, learning_rate=LR, optimizer="SGD"
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="loss is inf or nan"):
        _train(step, _batches(steps=1))
    _assert_weights(model, [W0, B0], rtol=0)


def test_check_numerics_checks_transformed_gradients():
    """sqrt(0) has a finite value but an infinite gradient."""

    def sqrt_loss(labels, logits):
        return tf.reduce_sum(tf.sqrt(tf.abs(logits - logits)), axis=-1)

    model = _model()
    step = optimize.optimize_loss(
        model, sqrt_loss, learning_rate=LR, optimizer="SGD", clip_gradients=1.0
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"gradient of `.*kernel`"):
        _train(step, _batches(steps=1))
    _assert_weights(model, [W0, B0], rtol=0)


def test_without_check_numerics_nan_reaches_the_weights():
    model = _model()
    step = optimize.optimize_loss(
        model, _loss, learning_rate=LR, optimizer="SGD", check_numerics=False
    )
    _train(step, [_nan_labels_batch()])
    assert np.isnan(_weights(model)[0]).any()
