"""The binary's trusted validation: recalibrate, validate, and a cheap stale check.

Validation with recalibrated BN statistics is the number to trust; validation
with the moving averages only answers "were they stale?" (the `stale` line).
A second full validation for that answer costs as much as the first (about
5% of an epoch of the main command, `benchmarks/trust_cost.py`). Instead, the
moving averages are first tried on a few validation batches, compared with
the recalibrated statistics on the same batches, and the full validation
with the moving averages runs only when those batches say "stale" or come
half-way to it (`_MARGIN`). Stale averages are far off (val
loss 1.38 against 0.05 in the classic case), so a few batches tell them
apart; whenever the line is printed, its numbers come from the full
validation set, as before.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tfloop import bn, steps

# Moving averages are stale when their validation loss exceeds the
# recalibrated one by this factor and by `STALE_GAP`.
STALE_RATIO = 1.2
STALE_GAP = 0.05
# The quick check: this many validation batches; the full validation with
# moving averages runs when they are half-way to stale there.
CHECK_BATCHES = 2
_MARGIN = 0.5


@dataclasses.dataclass(frozen=True)
class Check:
    """A validation with recalibrated statistics and the stale check.

    `moving_loss` and `moving_top1` come from the moving averages on all
    validation batches when `full_check` (then `stale` is decided on them),
    else on the first `CHECK_BATCHES` (clearly not stale there).
    """

    loss: float
    top1: float
    moving_loss: float
    moving_top1: float
    stale: bool
    full_check: bool


def is_stale(moving_loss: float, loss: float, *, margin: float = 1.0) -> bool:
    """The stale rule: moving-average loss over 1.2 times, and 0.05 more than, `loss`.

    `margin` < 1 scales the excess allowed (0.5: half-way to stale).
    """
    excess = max((STALE_RATIO - 1.0) * loss, STALE_GAP)
    return moving_loss > loss + margin * excess


def validate(
    eval_step: steps.EvalStep,
    val_data,
    val_head,
    recalibrate,
) -> Check:
    """Validates after `recalibrate()`; checks whether the moving averages were stale.

    Args:
      eval_step: the eval step of the model.
      val_data: the (distributed) validation set.
      val_head: its first `CHECK_BATCHES` batches, as a (distributed) dataset.
      recalibrate: sets the model's BN statistics to precise ones (e.g. a
        `tfloop.bn.recalibrate` call); the moving averages are restored only
        for the full stale check, and the precise statistics afterwards.
    """
    model = eval_step.model
    moving_head = steps.evaluate(eval_step, val_head)
    moving_statistics = _statistics(model)
    recalibrate()
    result = steps.evaluate(eval_step, val_data)
    head = steps.evaluate(eval_step, val_head)
    full_check = is_stale(moving_head["loss"], head["loss"], margin=_MARGIN)
    moving = moving_head
    if full_check:
        precise = _statistics(model)
        _assign(model, moving_statistics)
        moving = steps.evaluate(eval_step, val_data)
        _assign(model, precise)
    return Check(
        loss=result["loss"],
        top1=result["top1"],
        moving_loss=moving["loss"],
        moving_top1=moving["top1"],
        stale=full_check and is_stale(moving["loss"], result["loss"]),
        full_check=full_check,
    )


def _variables(model: keras.Model) -> list[tf.Variable]:
    """What recalibration changes: moving statistics and update counts."""
    moving = [
        variable
        for layer in bn.layers(model)
        for variable in (layer.moving_mean, layer.moving_variance)
    ]
    return moving + list(bn.state(model).variables)


def _statistics(model: keras.Model) -> list[np.ndarray]:
    # Every replica holds the same statistics (the step keeps them so).
    return [variable.numpy() for variable in _variables(model)]


def _assign(model: keras.Model, values: list[np.ndarray]) -> None:
    for variable, value in zip(_variables(model), values):
        variable.assign(value)
