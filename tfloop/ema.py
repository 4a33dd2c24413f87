"""Evaluate and export a model with its exponential moving average of weights.

Why this module exists: slim's `--moving_average_decay` trained with an EMA
of the weights and evaluated the averaged network. Keras' optimizers keep
such an average (`use_ema=True`; `tfloop.optimizers.make_optimizer`), but
`finalize_variable_values()` overwrites the weights for good, and it leaves
the BN moving statistics as they are. Those statistics were accumulated
under the raw weights of each step, so they do not describe the averaged
network (averaging them alongside the weights, as slim did, does not either:
a layer's statistics are not linear in the weights upstream). pycls
recalibrates BN for the averaged weights; so does tfloop: inside
`averaged_weights(...)` the model holds the averages, and a
`tfloop.bn.recalibrate` there computes the statistics of the averaged
network. On exit, the raw weights and the training statistics come back, so
training continues exactly where it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from tfloop import bn

__all__ = ["averaged_weights"]


def _pairs(optimizer: keras.optimizers.Optimizer) -> list[tuple]:
    """(model variable, its average) for every variable the optimizer averages."""
    if not getattr(optimizer, "use_ema", False):
        raise ValueError(
            "`optimizer` keeps no weight average; build it with use_ema=True "
            "(--moving_average_decay)."
        )
    if not optimizer.built:
        raise ValueError("`optimizer` is not built yet: it has no averages.")
    # Keras keeps the averages in the order of the variables it was built with.
    return [
        (variable, average)
        for variable, average in zip(
            optimizer._trainable_variables, optimizer._model_variables_moving_average
        )
        if average is not None
    ]


@contextlib.contextmanager
def averaged_weights(
    model: keras.Model, optimizer: keras.optimizers.Optimizer
) -> Iterator[bool]:
    """Inside, `model` holds the optimizer's averaged weights; restored on exit.

    Everything the block may change is put back on exit, exceptions included:
    the weights, and every BN layer's moving statistics and tfloop update
    count (so a `tfloop.bn.recalibrate` inside is undone too). Before the
    optimizer's first step there is no average yet (Keras' average starts as
    a copy at step 1): the weights stay, and the block gets False.

    Yields:
      True if the averaged weights are in, False before the first step.
    """
    pairs = _pairs(optimizer)
    if int(optimizer.iterations.numpy()) == 0:
        yield False
        return
    layers = bn.layers(model)
    counts = bn.state(model).counts
    saved = {
        "weights": [variable.numpy() for variable, _ in pairs],
        "statistics": [
            (layer.moving_mean.numpy(), layer.moving_variance.numpy())
            for layer in layers
        ],
        "counts": [count.numpy() for count in counts],
    }
    try:
        for variable, average in pairs:
            variable.assign(average.numpy())
        yield True
    finally:
        for (variable, _), value in zip(pairs, saved["weights"]):
            variable.assign(value)
        for layer, (mean, variance) in zip(layers, saved["statistics"]):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)
        for count, value in zip(counts, saved["counts"]):
            count.assign(value)
