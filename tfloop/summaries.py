"""TensorBoard summaries of a training run, written from the host.

The train step writes what only it sees (loss, learning rate, global gradient
norm) from inside its graph (`tfloop.optimize_loss(summaries=...)`). This
module writes the rest, under the tags below, to the default `tf.summary`
writer (the caller opens `MODEL_DIR/summaries` and sets the step):

| tag                                   | what                                       |
|---------------------------------------|--------------------------------------------|
| `train/top1`, `train/images_per_second` | at every `--log_every` step              |
| `validation/loss`, `validation/top1`  | after BN recalibration (what is printed)   |
| `validation/moving_loss`, `validation/moving_top1` | moving averages, first `--bn_stale_check_batches` batches |
| `bn_health/mean_shift`, `bn_health/log_variance_ratio` | histograms over BN layers |
| `bn_health/worst_mean_shift`, `bn_health/worst_log_variance_ratio` | their maxima |
| `bn_health/worst_layer`               | text: the layer with the largest mean shift |

BN health is `tfloop.bn.staleness` of the moving averages against a
validation batch, measured before recalibration, so the curves show
staleness appear (fast-changing weights, slow averages) and vanish.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from tfloop.bn import Staleness


def train(*, step: int, top1: float, images_per_second: float) -> None:
    """Training accuracy of step `step` and throughput since the last call."""
    tf.summary.scalar("train/top1", top1, step=step)
    tf.summary.scalar("train/images_per_second", images_per_second, step=step)


def validation(*, moving: dict[str, float], recalibrated: dict[str, float]) -> None:
    """Validation loss and top-1 with the moving averages and after recalibration."""
    tf.summary.scalar("validation/loss", recalibrated["loss"])
    tf.summary.scalar("validation/top1", recalibrated["top1"])
    tf.summary.scalar("validation/moving_loss", moving["loss"])
    tf.summary.scalar("validation/moving_top1", moving["top1"])


def bn_health(report: Sequence[Staleness]) -> None:
    """Per-layer staleness as histograms, and its worst layer as scalars."""
    if not report:
        return
    shifts = np.array([r.mean_shift for r in report])
    ratios = np.array([r.log_variance_ratio for r in report])
    tf.summary.histogram("bn_health/mean_shift", shifts)
    tf.summary.histogram("bn_health/log_variance_ratio", ratios)
    tf.summary.scalar("bn_health/worst_mean_shift", shifts.max())
    tf.summary.scalar("bn_health/worst_log_variance_ratio", ratios.max())
    tf.summary.text("bn_health/worst_layer", report[int(shifts.argmax())].layer)
