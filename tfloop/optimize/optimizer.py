"""optimize_loss's `optimizer` and `learning_rate`: one Keras optimizer from either.

Why this module exists: `optimize_loss` accepted an optimizer name, class,
factory `f(learning_rate)` or instance, plus a rate and a decay function of
the global step. Keras 3 wants one optimizer instance holding its rate or
schedule, built under the strategy's scope. `OPTIMIZER_CLS_NAMES` is also the
name table of the binary's `--optimizer` (`tfloop.optimizers` adds slim's
knobs on top; `tfloop.schedules` builds slim's decay schedules).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from tfloop.schedules import Schedule

__all__ = ["OPTIMIZER_CLS_NAMES", "Schedule"]


#: Optimizer names, as in `tf.contrib.layers.OPTIMIZER_CLS_NAMES`, mapped to
#: Keras 3 factories `f(learning_rate=...)`. `Momentum` keeps contrib's choice
#: of momentum 0.9 (TF1's `MomentumOptimizer` itself had no default); for
#: another value pass `keras.optimizers.SGD(lr, momentum=m)`. Keras' momentum
#: applies the learning rate before accumulating, which differs from
#: `tf.compat.v1.train.MomentumOptimizer` only while the rate changes.
OPTIMIZER_CLS_NAMES: dict[str, Callable[..., keras.optimizers.Optimizer]] = {
    "SGD": keras.optimizers.SGD,
    "Momentum": functools.partial(keras.optimizers.SGD, momentum=0.9),
    "Adam": keras.optimizers.Adam,
    "AdamW": keras.optimizers.AdamW,
    "RMSProp": keras.optimizers.RMSprop,
    "Adagrad": keras.optimizers.Adagrad,
    "Ftrl": keras.optimizers.Ftrl,
}


def _named(name: str) -> Callable[..., keras.optimizers.Optimizer] | None:
    """The factory of an `OPTIMIZER_CLS_NAMES` name, case-insensitive; None if unknown."""
    factories = {key.lower(): f for key, f in OPTIMIZER_CLS_NAMES.items()}
    return factories.get(name.lower())


class _DecayFnSchedule(Schedule):
    """`learning_rate_decay_fn(lr, global_step)` as a Keras schedule.

    Keras calls the schedule with `optimizer.iterations` on every step, which
    is what optimize_loss did with `global_step` once per graph. Not
    serializable (`get_config` raises), since it wraps a Python function.
    """

    def __init__(self, learning_rate: float | Schedule, decay_fn: Callable):
        self.learning_rate = learning_rate
        self.decay_fn = decay_fn

    def __call__(self, step):
        if isinstance(self.learning_rate, Schedule):
            base = self.learning_rate(step)
        else:
            base = tf.constant(self.learning_rate, tf.float32)
        value = self.decay_fn(base, tf.convert_to_tensor(step))
        if callable(value):  # `tf.compat.v1.train.*_decay` when run eagerly.
            value = value()
        return tf.cast(value, tf.float32)


def _check_learning_rate(learning_rate: Any) -> None:
    if isinstance(learning_rate, bool) or not isinstance(
        learning_rate, (int, float, Schedule)
    ):
        raise TypeError(
            "`learning_rate` must be a float or a keras LearningRateSchedule, "
            f"got {type(learning_rate).__name__}."
        )
    if not isinstance(learning_rate, Schedule) and learning_rate < 0:
        raise ValueError(f"`learning_rate` must be >= 0, got {learning_rate!r}.")


def _optimizer_factory(optimizer: Any) -> tuple[Callable, bool]:
    """The factory for a name, class or function; True if it takes the rate by position."""
    if isinstance(optimizer, str):
        factory = _named(optimizer)
        if factory is None:
            raise ValueError(
                f"`optimizer` name {optimizer!r} is unknown; use one of "
                f"{list(OPTIMIZER_CLS_NAMES)}, a Keras optimizer class or instance."
            )
        return factory, False
    if isinstance(optimizer, type) and issubclass(
        optimizer, keras.optimizers.Optimizer
    ):
        return optimizer, False
    if callable(optimizer) and not isinstance(optimizer, type):
        return optimizer, True  # optimize_loss's `lambda lr: Optimizer(lr, ...)`.
    raise TypeError(
        "`optimizer` must be a name, a keras.optimizers.Optimizer class, "
        f"instance or factory, got {optimizer!r}."
    )


def _make_optimizer(
    optimizer: Any,
    learning_rate: float | Schedule | None,
    decay_fn: Callable | None,
    strategy: tf.distribute.Strategy,
) -> keras.optimizers.Optimizer:
    """Checks an optimizer instance, or builds one under `strategy.scope()`.

    The scope matters: a Keras optimizer binds to the strategy current at its
    construction, and its slot variables must be mirrored like the model's.
    """
    if isinstance(optimizer, keras.optimizers.Optimizer):
        if learning_rate is not None or decay_fn is not None:
            # optimize_loss silently ignored `learning_rate` here; refuse
            # rather than guess which of the two rates the caller meant.
            raise ValueError(
                "`learning_rate` and `learning_rate_decay_fn` must be None when "
                "`optimizer` is an optimizer instance; give the instance the rate "
                "or schedule."
            )
        return optimizer
    factory, positional = _optimizer_factory(optimizer)
    rate = learning_rate
    if learning_rate is None:
        if decay_fn is not None:
            raise ValueError("`learning_rate_decay_fn` needs a `learning_rate`.")
        if not positional:
            raise ValueError(
                f"`learning_rate` is required when `optimizer` is {optimizer!r}."
            )
    else:
        _check_learning_rate(learning_rate)
        if decay_fn is not None:
            rate = _DecayFnSchedule(learning_rate, decay_fn)
    with strategy.scope():
        if rate is None:
            built = factory()
        elif positional:
            built = factory(rate)
        else:
            built = factory(learning_rate=rate)
    if not isinstance(built, keras.optimizers.Optimizer):
        raise TypeError(
            f"`optimizer` factory returned {type(built).__name__}, not a "
            "keras.optimizers.Optimizer."
        )
    return built
