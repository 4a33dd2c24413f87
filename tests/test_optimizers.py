"""Slim's optimizer flags on Keras optimizers, against the update rules in numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfloop import optimizers


def _apply(optimizer, gradients):
    """Applies gradients to w = [1.0] one after the other; returns w after each."""
    w = keras.Variable(np.array([1.0], np.float32))
    values = []
    for g in gradients:
        optimizer.apply_gradients([(tf.constant([g], tf.float32), w)])
        values.append(float(w.numpy()[0]))
    return values


def test_momentum_is_the_heavy_ball():
    values = _apply(
        optimizers.make_optimizer("momentum", 0.1, momentum=0.5), [1.0, 1.0]
    )
    # v = m v - lr g; w += v: v1 = -0.1, v2 = 0.5 * -0.1 - 0.1.
    np.testing.assert_allclose(values, [0.9, 0.75], rtol=1e-6)


def test_rmsprop_knobs_are_tf1s_with_epsilon_inside_the_root():
    optimizer = optimizers.make_optimizer(
        "rmsprop", 0.1, rmsprop_decay=0.5, rmsprop_momentum=0.3, opt_epsilon=1.0
    )
    values = _apply(optimizer, [2.0, 2.0])
    ms1 = 0.5 * 4.0
    mom1 = 0.1 * 2.0 / np.sqrt(ms1 + 1.0)
    ms2 = 0.5 * ms1 + 0.5 * 4.0
    mom2 = 0.3 * mom1 + 0.1 * 2.0 / np.sqrt(ms2 + 1.0)
    np.testing.assert_allclose(values, [1 - mom1, 1 - mom1 - mom2], rtol=1e-6)


def test_adam_knobs_and_defaults():
    adam = optimizers.make_optimizer(
        "Adam", 0.1, adam_beta1=0.8, adam_beta2=0.99, opt_epsilon=0.5
    )
    assert (adam.beta_1, adam.beta_2, adam.epsilon) == (0.8, 0.99, 0.5)
    plain = optimizers.make_optimizer("adam", 0.1, adam_beta1=None)
    assert (plain.beta_1, plain.epsilon) == (0.9, 1e-7)  # Keras' defaults.


def test_a_knob_the_optimizer_does_not_take_is_refused():
    with pytest.raises(
        ValueError, match=r"--adam_beta1=0.8 does not apply to --optimizer=momentum"
    ):
        optimizers.make_optimizer("momentum", 0.1, adam_beta1=0.8)
    with pytest.raises(ValueError, match="`optimizer` 'lbfgs' is unknown"):
        optimizers.make_optimizer("lbfgs", 0.1)
    with pytest.raises(
        ValueError, match=r"`moving_average_decay` must be in \(0, 1\), got 1.0"
    ):
        optimizers.make_optimizer("sgd", 0.1, moving_average_decay=1.0)
