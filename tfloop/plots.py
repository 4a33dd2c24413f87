"""Pictures of a run, drawn with matplotlib when it is installed (`tfloop[plot]`).

A picture is an extra: without matplotlib the run still succeeds and says in
one warning what it did not draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from absl import logging

ACCURACY_FILE = "accuracy.png"


def pyplot(path: str) -> Any | None:
    """matplotlib's `pyplot` (headless), or None with a warning naming `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        logging.warning(
            "matplotlib is not installed: no %s (pip install tfloop[plot])", path
        )
        return None
    return plt


def accuracy(
    results: Sequence[Any], path: str, *, title: str, moving_batches: int = 0
) -> bool:
    """Per-epoch train vs validation accuracy (moving averages vs recalibrated).

    `results` are `tfloop.runner.Validation`s, one per validation;
    `moving_batches`: the validation batches their moving-average numbers
    cover (0: all), said in the legend. Returns whether the picture was
    written.
    """
    plt = pyplot(path)
    if plt is None:
        return False
    from matplotlib import ticker

    epochs = [v.epoch for v in results]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(epochs, [v.train_top1 for v in results], marker="o", label="train")
    axes.plot(
        epochs,
        [v.moving_top1 for v in results],
        marker="s",
        label="validation, moving averages"
        + (f" (first {moving_batches} batches)" if moving_batches else ""),
    )
    axes.plot(
        epochs, [v.top1 for v in results], marker="^", label="validation, recalibrated"
    )
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel("epoch (0: before training)")
    axes.set_ylabel("top-1 accuracy")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
