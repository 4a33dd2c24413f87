"""Weight EMA: Keras' average against numpy, swapped in and out with BN restored."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfloop
from tfloop import ema, optimizers


def test_weight_ema_against_numpy_and_swapped_in_for_evaluation():
    """Keras' average (a copy at step 1, then d avg + (1 - d) w), in and out."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(2),
        ]
    )
    optimizer = optimizers.make_optimizer("sgd", 0.5, moving_average_decay=0.8)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    step = tfloop.make_train_step(model, optimizer, loss)
    with ema.averaged_weights(model, optimizer) as swapped:
        assert not swapped  # No average before the first step.
    rng = np.random.default_rng(0)
    average = None
    for _ in range(5):
        x = rng.standard_normal((8, 3)).astype(np.float32)
        y = rng.integers(0, 2, 8)
        step((x, y))
        weights = [v.numpy().astype(np.float64) for v in model.trainable_variables]
        average = (
            weights
            if average is None
            else [0.8 * a + 0.2 * w for a, w in zip(average, weights)]
        )
    raw = [v.numpy() for v in model.trainable_variables]
    layer = model.layers[1]
    statistics = layer.moving_mean.numpy()
    with ema.averaged_weights(model, optimizer) as swapped:
        assert swapped
        for v, a in zip(model.trainable_variables, average):
            np.testing.assert_allclose(v.numpy(), a, rtol=1e-5, atol=1e-6)
        tfloop.bn.recalibrate(model, tf.data.Dataset.from_tensors(x), num_batches=1)
        assert not np.allclose(layer.moving_mean.numpy(), statistics)
    for v, r in zip(model.trainable_variables, raw):  # Back exactly.
        np.testing.assert_array_equal(v.numpy(), r)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), statistics)


def test_ema_needs_an_averaging_optimizer():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    averaged = ema.averaged_weights(model, keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="use_ema=True"), averaged:
        pass
