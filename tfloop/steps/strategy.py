"""Which strategy a step runs under."""

from __future__ import annotations

import keras
import tensorflow as tf


def _strategy_for(
    model: keras.Model, strategy: tf.distribute.Strategy | None
) -> tf.distribute.Strategy:
    """`strategy`, or the current one, or the one `model`'s variables live in."""
    owner = next(
        (
            v.value.distribute_strategy
            for v in model.weights
            if isinstance(getattr(v, "value", None), tf.distribute.DistributedValues)
        ),
        None,
    )
    if strategy is None:
        strategy = (
            tf.distribute.get_strategy() if tf.distribute.has_strategy() else owner
        )
        strategy = strategy or tf.distribute.get_strategy()
    if owner is not None and owner is not strategy:
        raise ValueError(
            f"`model` was built under {type(owner).__name__} but the step would "
            f"run under {type(strategy).__name__}: pass `strategy=` the strategy "
            "whose scope built the model."
        )
    return strategy
