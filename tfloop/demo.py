"""`tfloop-train --compare_bn`: the classic BN symptom and its fix, side by side.

Runs the same training (same data, seed and weights) four ways and compares
validation loss per epoch:

- `naive`: stock Keras BN at the model's decay (slim's 0.9997 for
  Inception v1), statistics left to the layers, no recalibration: the
  hand-written loop of the original report.
- `decay 0.99`: the same with the usual advice, a faster decay.
- `debiased`: tfloop's zero-debiased averages, no recalibration.
- `tfloop`: tfloop's defaults (debiased averages, and precise-BN
  recalibration before every validation).

Writes `compare_bn.md` (the table) and, with matplotlib installed
(`pip install tfloop[plot]`), `compare_bn.png` into `--model_dir` (default:
the current directory).
"""

from __future__ import annotations

import dataclasses
import os

from tfloop import plots
from tfloop.config import TrainConfig
from tfloop.runner import Validation, train

VARIANTS = ("naive", "decay 0.99", "debiased", "tfloop")


def _variant(config: TrainConfig, name: str) -> TrainConfig:
    base = dataclasses.replace(config, model_dir=None)
    if name == "naive":
        return dataclasses.replace(base, stock_bn=True, bn_recalibrate_batches=0)
    if name == "decay 0.99":
        return dataclasses.replace(
            base, stock_bn=True, bn_decay=0.99, bn_recalibrate_batches=0
        )
    if name == "debiased":
        return dataclasses.replace(
            base, bn_averaging="debias", bn_recalibrate_batches=0
        )
    return base


def table(results: dict[str, list[Validation]]) -> str:
    """Markdown table: validation loss and top-1 per epoch and variant."""
    names = list(results)
    lines = [
        "| epoch | " + " | ".join(f"{n} loss | {n} top-1" for n in names) + " |",
        "|---" * (1 + 2 * len(names)) + "|",
    ]
    for row in zip(*results.values()):
        cells = [f"{v.loss:.2f} | {v.top1:.3f}" for v in row]
        lines.append(f"| {row[0].epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, list[Validation]], path: str, title: str) -> bool:
    pyplot = plots.pyplot(path)
    if pyplot is None:
        return False
    from matplotlib import ticker

    figure, axes = pyplot.subplots(figsize=(6, 4))
    for name, rows in results.items():
        axes.plot(
            [v.epoch for v in rows], [v.loss for v in rows], marker="o", label=name
        )
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes.set_xlabel("epoch (0: before training)")
    axes.set_ylabel("validation loss")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return True


def compare_bn(config: TrainConfig) -> dict[str, list[Validation]]:
    """Runs every variant of `VARIANTS` on `config`; writes the table and plot."""
    results = {}
    for name in VARIANTS:
        print(f"== {name} ==", flush=True)
        results[name] = train(_variant(config, name))
    out_dir = config.model_dir or "."
    os.makedirs(out_dir, exist_ok=True)
    text = table(results)
    with open(os.path.join(out_dir, "compare_bn.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text, flush=True)
    title = f"{config.model}, BN decay {config.bn_decay or 'slim default'}"
    _plot(results, os.path.join(out_dir, "compare_bn.png"), title)
    return results
