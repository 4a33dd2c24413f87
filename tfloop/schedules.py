"""Learning-rate schedules of slim's `train_image_classifier.py`, as Keras schedules.

Why this module exists: a slim command line sets its learning rate with
`--learning_rate_decay_type`, `--learning_rate_decay_factor`,
`--num_epochs_per_decay` and `--end_learning_rate`; slim's
`_configure_learning_rate` turned them into TF1 decay ops on `global_step`.
Here they become Keras `LearningRateSchedule`s (`ExponentialDecay`,
`PolynomialDecay`, `CosineDecay`), which the optimizer evaluates on its own
`iterations` every step: a checkpoint of the optimizer resumes the schedule
where it stopped, and the step's `learning_rate` summary records it.

Slim's formulas, with `decay_steps = int(steps_per_epoch *
num_epochs_per_decay)` (slim: `int(num_samples_per_epoch *
num_epochs_per_decay / batch_size)`) and `step` the global step:

- `exponential`: lr * factor ** floor(step / decay_steps) (staircase).
- `fixed`: lr.
- `polynomial`: end + (lr - end) * (1 - min(step, decay_steps) / decay_steps)
  (power 1, no cycle).
- `cosine` (not in slim): end + (lr - end) * (1 + cos(pi * min(step, total)
  / total)) / 2 over the whole run (`total_steps`).

`warmup_epochs` (not in slim) multiplies the first `warmup_steps` steps by
(step + 1) / warmup_steps: a linear ramp to the schedule's own value, which
is then the slim formula at the same global step.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

__all__ = ["DECAY_TYPES", "LinearWarmup", "learning_rate_schedule"]

Schedule = keras.optimizers.schedules.LearningRateSchedule

#: Slim's `--learning_rate_decay_type` values, plus `cosine`.
DECAY_TYPES = ("exponential", "fixed", "polynomial", "cosine")


@keras.saving.register_keras_serializable(package="tfloop")
class LinearWarmup(Schedule):
    """`schedule(step) * min(1, (step + 1) / warmup_steps)`: linear warm-up.

    Serializable (`get_config`), so an optimizer holding it can be saved.
    """

    def __init__(self, schedule: float | Schedule, warmup_steps: int):
        if warmup_steps < 1:
            raise ValueError(f"`warmup_steps` must be >= 1, got {warmup_steps!r}.")
        self.schedule = schedule
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if isinstance(self.schedule, Schedule):
            value = tf.cast(self.schedule(step), tf.float32)
        else:
            value = tf.constant(self.schedule, tf.float32)
        ramp = tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))
        return value * ramp

    def get_config(self) -> dict:
        schedule = self.schedule
        if isinstance(schedule, Schedule):
            schedule = keras.optimizers.schedules.serialize(schedule)
        return {"schedule": schedule, "warmup_steps": self.warmup_steps}

    @classmethod
    def from_config(cls, config: dict) -> LinearWarmup:
        schedule = config["schedule"]
        if isinstance(schedule, dict):
            schedule = keras.optimizers.schedules.deserialize(schedule)
        return cls(schedule, config["warmup_steps"])


def _check(name: str, value: float, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"`{name}` must be {rule}, got {value!r}.")


def learning_rate_schedule(
    *,
    learning_rate: float,
    decay_type: str,
    steps_per_epoch: int,
    decay_factor: float = 0.94,
    num_epochs_per_decay: float = 2.0,
    end_learning_rate: float = 0.0001,
    warmup_epochs: float = 0.0,
    total_steps: int | None = None,
) -> float | Schedule:
    """The learning rate of slim's flags: a float (`fixed`) or a Keras schedule.

    Args:
      learning_rate: the initial rate (slim's `--learning_rate`), >= 0.
      decay_type: one of `DECAY_TYPES`.
      steps_per_epoch: optimizer steps per epoch (global batches), >= 1.
      decay_factor: `exponential`'s factor per decay period, > 0.
      num_epochs_per_decay: the decay period (`exponential`) or length
        (`polynomial`) in epochs.
      end_learning_rate: where `polynomial` and `cosine` end, >= 0.
      warmup_epochs: epochs of linear warm-up, >= 0 (0: none).
      total_steps: the run's length in steps; required by `cosine`.

    Raises:
      ValueError: naming the argument, e.g. a decay period under one step.
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(
            f"`decay_type` must be one of {list(DECAY_TYPES)}, got {decay_type!r}."
        )
    _check("learning_rate", learning_rate, learning_rate >= 0, ">= 0")
    _check("steps_per_epoch", steps_per_epoch, steps_per_epoch >= 1, ">= 1")
    _check("warmup_epochs", warmup_epochs, warmup_epochs >= 0, ">= 0")
    _check("end_learning_rate", end_learning_rate, end_learning_rate >= 0, ">= 0")
    schedule: float | Schedule = learning_rate
    decay_steps = int(steps_per_epoch * num_epochs_per_decay)
    if decay_type in ("exponential", "polynomial") and decay_steps < 1:
        raise ValueError(
            f"`num_epochs_per_decay`={num_epochs_per_decay!r} is under one step "
            f"at {steps_per_epoch} steps per epoch."
        )
    if decay_type == "exponential":
        _check("decay_factor", decay_factor, decay_factor > 0, "> 0")
        schedule = keras.optimizers.schedules.ExponentialDecay(
            learning_rate, decay_steps, decay_factor, staircase=True
        )
    elif decay_type == "polynomial":
        schedule = keras.optimizers.schedules.PolynomialDecay(
            learning_rate, decay_steps, end_learning_rate, power=1.0, cycle=False
        )
    elif decay_type == "cosine":
        if total_steps is None or total_steps < 1:
            raise ValueError(
                f"`cosine` decays over the run: `total_steps` must be >= 1, "
                f"got {total_steps!r}."
            )
        if learning_rate > 0:
            schedule = keras.optimizers.schedules.CosineDecay(
                learning_rate, total_steps, alpha=end_learning_rate / learning_rate
            )
    warmup_steps = math.ceil(warmup_epochs * steps_per_epoch)
    if warmup_steps:
        schedule = LinearWarmup(schedule, warmup_steps)
    return schedule
