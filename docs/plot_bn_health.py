"""Draws BN-health curves from the event files of `tfloop-train` runs.

    python docs/plot_bn_health.py OUT.png LABEL=MODEL_DIR [LABEL=MODEL_DIR ...]

Per run, against the training step: the worst layer's mean shift
(`bn_health/worst_mean_shift`: moving mean vs a validation batch's mean, in
batch standard deviations) and |log variance ratio|
(`bn_health/worst_log_variance_ratio`). `docs/bn_health.png` in the README was made by the
commands in `docs/bn_health.md`.
"""

import sys

import matplotlib

matplotlib.use("Agg")
import tensorflow as tf
from matplotlib import pyplot
from tensorboard.backend.event_processing import event_accumulator


def _scalars(model_dir):
    accumulator = event_accumulator.EventAccumulator(
        f"{model_dir}/summaries", size_guidance={"tensors": 0}
    )
    accumulator.Reload()
    curves = {}
    for tag in accumulator.Tags()["tensors"]:
        events = accumulator.Tensors(tag)
        values = [tf.make_ndarray(event.tensor_proto) for event in events]
        if values[0].ndim == 0 and values[0].dtype.kind == "f":  # Scalars only.
            curves[tag] = ([event.step for event in events], [float(v) for v in values])
    return curves


def main(out, *runs):
    figure, (shift_axes, ratio_axes) = pyplot.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        label, model_dir = run.split("=", 1)
        scalars = _scalars(model_dir)
        line = shift_axes.plot(
            *scalars["bn_health/worst_mean_shift"], marker="o", label=label
        )[0]
        ratio_axes.plot(
            *scalars["bn_health/worst_log_variance_ratio"],
            marker="o",
            color=line.get_color(),
            label=label,
        )
    shift_axes.set_yscale("log")
    shift_axes.set_xlabel("training step")
    shift_axes.set_ylabel("worst BN layer: mean shift (batch std)")
    shift_axes.set_title("bn_health/worst_mean_shift")
    shift_axes.legend()
    ratio_axes.set_yscale("log")
    ratio_axes.set_xlabel("training step")
    ratio_axes.set_ylabel("worst BN layer: |log variance ratio|")
    ratio_axes.set_title("bn_health/worst_log_variance_ratio")
    ratio_axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)


if __name__ == "__main__":
    main(*sys.argv[1:])
