"""`optimize_loss`'s `optimizer`, `learning_rate` and `learning_rate_decay_fn`."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from optimize_reference import (
    LR,
    _batches,
    _loss,
    _model,
    _numpy_sgd,
    _weights,
)

from tfloop import optimize


def _rates_and_weights(step, model, batches):
    rates = []
    for x, y in batches:
        rates.append(float(step.optimizer.learning_rate))
        step((tf.constant(x), tf.constant(y)))
    return rates, _weights(model)


@pytest.mark.parametrize(
    "learning_rate, decay_fn, expected",
    [
        (LR, lambda lr, s: lr * 0.5 ** tf.cast(s, tf.float32), [0.1, 0.05, 0.025]),
        (
            LR,
            lambda lr, s: tf.compat.v1.train.exponential_decay(lr, s, 1, 0.5),
            [0.1, 0.05, 0.025],
        ),
        (
            keras.optimizers.schedules.ExponentialDecay(LR, 1, 0.5),
            None,
            [0.1, 0.05, 0.025],
        ),
        (
            keras.optimizers.schedules.ExponentialDecay(LR, 1, 0.5),
            lambda lr, s: 2.0 * lr,
            [0.2, 0.1, 0.05],
        ),
    ],
    ids=["decay_fn", "tf1_decay_fn", "schedule", "schedule_and_decay_fn"],
)
def test_learning_rate_decay(learning_rate, decay_fn, expected):
    batches = _batches()
    model = _model()
    step = optimize.optimize_loss(
        model,
        _loss,
        learning_rate=learning_rate,
        optimizer="SGD",
        learning_rate_decay_fn=decay_fn,
    )
    rates, weights = _rates_and_weights(step, model, batches)
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    for got, want in zip(weights, _numpy_sgd(batches, lambda g: g, lrs=expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(step.global_step) == 3


@pytest.mark.parametrize(
    "name, cls",
    [
        ("SGD", keras.optimizers.SGD),
        ("Momentum", keras.optimizers.SGD),
        ("Adam", keras.optimizers.Adam),
        ("AdamW", keras.optimizers.AdamW),
        ("RMSProp", keras.optimizers.RMSprop),
        ("Adagrad", keras.optimizers.Adagrad),
        ("Ftrl", keras.optimizers.Ftrl),
        ("adam", keras.optimizers.Adam),
    ],
)
def test_optimizer_names_map_to_keras_classes(name, cls):
    step = optimize.optimize_loss(_model(), _loss, learning_rate=0.25, optimizer=name)
    assert type(step.optimizer) is cls
    assert float(step.optimizer.learning_rate) == 0.25
    expected_momentum = {"SGD": 0.0, "Momentum": 0.9}.get(name)
    if expected_momentum is not None:
        assert step.optimizer.momentum == expected_momentum


def test_optimizer_class_factory_and_instance():
    by_class = optimize.optimize_loss(
        _model(), _loss, learning_rate=0.25, optimizer=keras.optimizers.Nadam
    )
    assert isinstance(by_class.optimizer, keras.optimizers.Nadam)
    by_factory = optimize.optimize_loss(
        _model(),
        _loss,
        learning_rate=0.25,
        optimizer=lambda lr: keras.optimizers.SGD(lr, momentum=0.5),
    )
    assert by_factory.optimizer.momentum == 0.5
    assert float(by_factory.optimizer.learning_rate) == 0.25
    instance = keras.optimizers.Adam(0.01)
    by_instance = optimize.optimize_loss(
        _model(), _loss, learning_rate=None, optimizer=instance
    )
    assert by_instance.optimizer is instance
