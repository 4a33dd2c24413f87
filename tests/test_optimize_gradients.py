"""`optimize_loss`'s gradient knobs (clipping, multipliers, noise) against numpy."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from optimize_reference import (
    B0,
    FEATURES,
    LR,
    W0,
    _assert_weights,
    _batches,
    _clip_each,
    _clip_global,
    _global_norm,
    _grads,
    _loss,
    _model,
    _numpy_sgd,
    _train,
    _weights,
)

from tfloop import optimize


def test_global_norm_clipping_matches_numpy():
    batches = _batches()
    assert _global_norm(_grads(W0, B0, *batches[0])) > 2.0  # Clipping is active.
    model = _model()
    step = optimize.optimize_loss(
        model, _loss, learning_rate=LR, optimizer="SGD", clip_gradients=0.5
    )
    _train(step, batches)
    _assert_weights(model, _numpy_sgd(batches, lambda g: _clip_global(g, 0.5)))


def test_clip_gradients_callable_sees_pairs():
    batches = _batches()
    model = _model()
    halve = lambda pairs: [(g * 0.5, v) for g, v in pairs]
    step = optimize.optimize_loss(
        model, _loss, learning_rate=LR, optimizer="SGD", clip_gradients=halve
    )
    _train(step, batches)
    _assert_weights(model, _numpy_sgd(batches, lambda g: [x * 0.5 for x in g]))


def test_per_tensor_clipping_matches_numpy():
    batches = _batches()
    model = _model()
    step = optimize.optimize_loss(
        model, _loss, learning_rate=LR, optimizer="SGD", clip_gradient_norm=0.3
    )
    _train(step, batches)
    _assert_weights(model, _numpy_sgd(batches, lambda g: _clip_each(g, 0.3)))


@pytest.mark.parametrize("style", ["path_and_name", "pairs", "ref", "tf1_name"])
def test_gradient_multipliers(style):
    batches = _batches()
    model = _model()
    kernel, bias = model.layers[0].kernel, model.layers[0].bias
    multipliers = {
        "path_and_name": {kernel.path: 0.5, "bias": 3.0},
        "pairs": [(kernel, 0.5), (bias, 3.0)],
        "ref": {kernel.value.ref(): 0.5, bias.value.ref(): 3.0},
        "tf1_name": {kernel.path + ":0": 0.5, bias.path + ":0": 3.0},
    }[style]
    step = optimize.optimize_loss(
        model,
        _loss,
        learning_rate=LR,
        optimizer="SGD",
        gradient_multipliers=multipliers,
    )
    _train(step, batches)
    _assert_weights(model, _numpy_sgd(batches, lambda g: [g[0] * 0.5, g[1] * 3.0]))


def test_gradient_multiplier_keys_must_name_one_variable():
    model = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(4), keras.layers.Dense(2)]
    )
    with pytest.raises(ValueError, match=r"`gradient_multipliers` key 'kernal'"):
        optimize.optimize_loss(
            model, _loss, learning_rate=LR, optimizer="SGD",
            gradient_multipliers={"kernal": 2.0},
        )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"names 2 variables .*; use the variable path"
    ):
        optimize.optimize_loss(
            model, _loss, learning_rate=LR, optimizer="SGD",
            gradient_multipliers={"kernel": 2.0},
        )  # fmt: skip


def test_gradient_noise_is_scaled_truncated_normal():
    batches = _batches(steps=1)
    model = _model()
    step = optimize.optimize_loss(
        model, _loss, learning_rate=LR, optimizer="SGD", gradient_noise_scale=0.5
    )
    _train(step, batches)
    noiseless = _numpy_sgd(batches, lambda g: g)
    noise = [(n - w) / (-LR * 0.5) for w, n in zip(_weights(model), noiseless)]
    flat = np.concatenate([n.ravel() for n in noise])
    assert np.all(np.abs(flat) <= 2.0 + 1e-4)  # Truncated at two std devs.
    assert np.all(np.abs(flat) > 0)
