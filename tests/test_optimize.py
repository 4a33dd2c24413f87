"""Tests for `tfloop.optimize.optimize_loss`: argument errors and batch norm.

Each knob has its own file: `test_optimize_gradients`, `_optimizer`,
`_check_numerics`, `_summaries`, `_distributed` (model and numpy reference:
`optimize_reference`).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from optimize_reference import (
    FEATURES,
    LR,
    OUTPUTS,
    _batches,
    _loss,
    _model,
    _train,
)

from tfloop import optimize


@pytest.mark.parametrize(
    "kwargs, error, argument",
    [
        ({"learning_rate": LR, "optimizer": "Adamax"}, ValueError, "optimizer"),
        (
            {"learning_rate": LR, "optimizer": keras.optimizers.SGD(LR)},
            ValueError,
            "learning_rate",
        ),
        ({"learning_rate": None, "optimizer": "SGD"}, ValueError, "learning_rate"),
        ({"learning_rate": "fast", "optimizer": "SGD"}, TypeError, "learning_rate"),
        ({"learning_rate": -1.0, "optimizer": "SGD"}, ValueError, "learning_rate"),
        ({"learning_rate": LR, "optimizer": 42}, TypeError, "optimizer"),
        (
            {
                "learning_rate": None,
                "optimizer": keras.optimizers.SGD(LR),
                "learning_rate_decay_fn": lambda lr, s: lr,
            },
            ValueError,
            "learning_rate_decay_fn",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "clip_gradients": 0.0},
            ValueError,
            "clip_gradients",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "clip_gradient_norm": -1.0},
            ValueError,
            "clip_gradient_norm",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "gradient_noise_scale": -1.0},
            ValueError,
            "gradient_noise_scale",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "summaries": ["loss", "lr"]},
            ValueError,
            "summaries",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "summaries": "loss"},
            TypeError,
            "summaries",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "increment_global_step": False},
            ValueError,
            "increment_global_step",
        ),
        (
            {
                "learning_rate": LR,
                "optimizer": "SGD",
                "gradient_transform": lambda p: p,
            },
            ValueError,
            "gradient_transform",
        ),
        (
            {"learning_rate": LR, "optimizer": "SGD", "bn_decay": 1.5},
            ValueError,
            "bn_decay",
        ),
    ],
)
def test_errors_are_one_line_and_name_the_argument(kwargs, error, argument):
    with pytest.raises(error) as info:
        optimize.optimize_loss(_model(), _loss, **kwargs)
    message = str(info.value)
    assert f"`{argument}" in message
    assert "\n" not in message


def test_step_owns_batch_norm_and_passes_bn_kwargs():
    """With a BN model the moving statistics learn (debiased: batch moments)."""
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(OUTPUTS),
        ]
    )
    step = optimize.optimize_loss(
        model,
        _loss,
        learning_rate=LR,
        optimizer="Momentum",
        clip_gradients=1.0,
        bn_decay=0.5,
        bn_audit="error",
    )
    x, y = _batches(steps=1)[0]
    _train(step, [(x, y)])
    bn = model.layers[0]
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), x.var(0), rtol=1e-4)
