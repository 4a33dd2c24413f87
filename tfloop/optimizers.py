"""Keras optimizers from the optimizer flags of slim's `train_image_classifier.py`.

Slim's `_configure_optimizer` read `--momentum`, `--rmsprop_decay`,
`--rmsprop_momentum`, `--opt_epsilon`, `--adam_beta1` and `--adam_beta2`, and
ignored the ones the chosen optimizer does not take. Here a knob given to an
optimizer that does not use it is an error: a slim command line that set it
expected it to matter. Unset knobs keep Keras' defaults (slim's own defaults,
e.g. `opt_epsilon=1.0`, are listed in the README's migration table).

`--moving_average_decay` becomes Keras' weight EMA (`use_ema=True`,
`ema_momentum=decay`): the optimizer keeps an average of every trainable
variable, updated after each step (a copy at the first step, then
`average = decay * average + (1 - decay) * variable`), and checkpointed with
the optimizer. `tfloop.ema` validates and exports with it.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tfloop import schedules
from tfloop.config import TrainConfig
from tfloop.optimize.optimizer import OPTIMIZER_CLS_NAMES, _named
from tfloop.schedules import Schedule

__all__ = ["KNOBS", "from_config", "make_optimizer"]

#: slim flag -> {optimizer name (lower case): the Keras argument it sets}.
KNOBS: dict[str, dict[str, str]] = {
    "momentum": {"momentum": "momentum"},
    "rmsprop_decay": {"rmsprop": "rho"},
    "rmsprop_momentum": {"rmsprop": "momentum"},
    "opt_epsilon": {
        "adam": "epsilon",
        "adamw": "epsilon",
        "rmsprop": "epsilon",
        "adagrad": "epsilon",
    },
    "adam_beta1": {"adam": "beta_1", "adamw": "beta_1"},
    "adam_beta2": {"adam": "beta_2", "adamw": "beta_2"},
}


def make_optimizer(
    name: str,
    learning_rate: float | Schedule,
    *,
    moving_average_decay: float | None = None,
    **knobs: float | None,
) -> keras.optimizers.Optimizer:
    """Builds optimizer `name` (see `OPTIMIZER_CLS_NAMES`) with slim's knobs.

    Call it under `strategy.scope()` when training distributed.

    Args:
      name: an optimizer name, case-insensitive (`momentum`, `rmsprop`, ...).
      learning_rate: a float or a Keras schedule.
      moving_average_decay: if set, in (0, 1): keep an EMA of the weights.
      **knobs: the keys of `KNOBS`; None leaves Keras' default.

    Raises:
      ValueError: an unknown name, or a knob the optimizer does not take,
        named as its flag.
    """
    factory = _named(name)
    if factory is None:
        raise ValueError(
            f"`optimizer` {name!r} is unknown; use one of {list(OPTIMIZER_CLS_NAMES)}."
        )
    kwargs: dict[str, Any] = {}
    for knob, value in knobs.items():
        if knob not in KNOBS:
            raise TypeError(f"Unknown optimizer knob `{knob}`; use {list(KNOBS)}.")
        if value is None:
            continue
        argument = KNOBS[knob].get(name.lower())
        if argument is None:
            raise ValueError(
                f"--{knob}={value} does not apply to --optimizer={name}; it sets "
                f"--optimizer={'/'.join(KNOBS[knob])} only."
            )
        kwargs[argument] = value
    if moving_average_decay is not None:
        if not 0.0 < moving_average_decay < 1.0:
            raise ValueError(
                f"`moving_average_decay` must be in (0, 1), got {moving_average_decay!r}."
            )
        kwargs.update(use_ema=True, ema_momentum=moving_average_decay)
    return factory(learning_rate=learning_rate, **kwargs)


def from_config(
    config: TrainConfig, *, steps_per_epoch: int, strategy: tf.distribute.Strategy
) -> keras.optimizers.Optimizer:
    """The binary's optimizer: `config`'s schedule, knobs and weight EMA.

    Built under `strategy.scope()`. `cosine` decays over the whole run: the
    `epochs`, or `max_number_of_steps` if sooner.
    """
    total_steps = config.epochs * steps_per_epoch
    if config.max_number_of_steps:
        total_steps = min(total_steps, config.max_number_of_steps)
    learning_rate = schedules.learning_rate_schedule(
        learning_rate=config.learning_rate,
        decay_type=config.learning_rate_decay_type,
        steps_per_epoch=steps_per_epoch,
        decay_factor=config.learning_rate_decay_factor,
        num_epochs_per_decay=config.num_epochs_per_decay,
        end_learning_rate=config.end_learning_rate,
        warmup_epochs=config.warmup_epochs,
        total_steps=max(1, total_steps),
    )
    with strategy.scope():
        return make_optimizer(
            config.optimizer,
            learning_rate,
            moving_average_decay=config.moving_average_decay,
            **{knob: getattr(config, knob) for knob in KNOBS},
        )
