"""A small BN model and a numpy computation of its BN inputs, for several tests."""

import keras
import numpy as np

from tfloop import bn

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
EPS = 1e-3


def mlp(momentum=0.99, dropout=0.0):
    """Dense -> BN -> ReLU -> Dense -> BN -> Dense: small enough for numpy."""
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, name="d1"),
            keras.layers.BatchNormalization(momentum=momentum, epsilon=EPS),
            keras.layers.ReLU(),
            keras.layers.Dropout(dropout),
            keras.layers.Dense(3, name="d2"),
            keras.layers.BatchNormalization(momentum=momentum, epsilon=EPS),
            keras.layers.Dense(4, name="out"),
        ]
    )


def numpy_bn_inputs(model, x):
    """Inputs of both BN layers in training mode, computed with numpy alone."""
    w1, b1 = (v.numpy() for v in model.get_layer("d1").weights)
    w2, b2 = (v.numpy() for v in model.get_layer("d2").weights)
    bn1 = bn.layers(model)[0]
    h1 = x @ w1 + b1
    normalized = (h1 - h1.mean(0)) / np.sqrt(h1.var(0) + EPS)
    a1 = np.maximum(normalized * bn1.gamma.numpy() + bn1.beta.numpy(), 0.0)
    return [h1, a1 @ w2 + b2]
