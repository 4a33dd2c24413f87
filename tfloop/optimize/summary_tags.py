"""The names `optimize_loss(summaries=...)` accepts (optimize_loss's `OPTIMIZER_SUMMARIES`).

The train step writes them from inside its graph (`gradients` writes the
gradient ones, `step` the `loss` and `learning_rate`); the binary's host-side
summaries are `tfloop.summaries`.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["OPTIMIZER_SUMMARIES"]

#: What `summaries` may ask for (optimize_loss's `OPTIMIZER_SUMMARIES`). Tags:
#: `loss`, `learning_rate`, `gradients/<path>` (histograms),
#: `gradient_norm/<path>`, and `global_norm/gradient_norm` (before clipping)
#: plus `global_norm/clipped_gradient_norm` (when clipping).
OPTIMIZER_SUMMARIES = (
    "loss",
    "learning_rate",
    "gradients",
    "gradient_norm",
    "global_gradient_norm",
)
_GRADIENT_SUMMARIES = frozenset({"gradients", "gradient_norm", "global_gradient_norm"})


def _check_summaries(summaries: Iterable[str] | None) -> frozenset[str]:
    if summaries is None:
        return frozenset()
    if isinstance(summaries, str):
        raise TypeError(
            f"`summaries` must be a list of names, got the string {summaries!r}."
        )
    summaries = frozenset(summaries)
    unknown = sorted(summaries - set(OPTIMIZER_SUMMARIES))
    if unknown:
        raise ValueError(
            f"`summaries` has unknown name(s) {unknown}; "
            f"use {list(OPTIMIZER_SUMMARIES)}."
        )
    return summaries
