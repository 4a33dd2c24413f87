"""What the binary shows on the terminal: the slim-era lines and a progress bar.

The slim-era lines (`step 50, loss = 0.80, training_acc = 0.5938`, ...) are a
contract: old and new logs compare line by line, so they are printed exactly
as before whether or not a progress bar is shown. The bar (Keras' `Progbar`:
steps, loss, top-1, images/s, ETA) appears only when stdout is a terminal; in a
log file or a pipe it would be noise, so there it does not exist at all.

On a terminal both share stdout: `say` wipes the bar's line before printing a
slim line, and the bar redraws itself below it on its next update.
"""

from __future__ import annotations

import sys
import time

import keras

# Validation with moving averages is called stale when its loss exceeds the
# recalibrated one by more than this factor (and 0.05 in absolute terms).
_STALE_RATIO = 1.2
_STALE_MARGIN = 0.05

# The bar reads the step's metrics (a host sync) at most this often.
_REFRESH_SECONDS = 0.2

# The bar currently drawn on the terminal, if any (one at a time).
_live: EpochBar | None = None


def say(line: str) -> None:
    """Prints one of the fixed log lines, on a line of its own (unbuffered)."""
    if _live is not None:
        _live._clear()
    print(line, flush=True)


def stale_line(moving_loss: float, loss: float) -> str | None:
    """The `BN statistics were stale: ...` line, or None if they were not.

    Stale means: validation loss with the moving averages is over 1.2 times,
    and 0.05 more than, the loss after recalibration.
    """
    if moving_loss > max(_STALE_RATIO * loss, loss + _STALE_MARGIN):
        return (
            f"BN statistics were stale: val loss {moving_loss:.2f} with "
            f"moving averages, {loss:.2f} after recalibration"
        )
    return None


class EpochBar:
    """A Keras `Progbar` over one epoch's steps, drawn only on a terminal.

    Args:
      steps: steps in the epoch.
      batch_size: global batch size (for images/s).
      title: printed above the bar, e.g. `Epoch 2/5`.
      interactive: draw the bar; None: only if stdout is a terminal.
    """

    def __init__(
        self,
        *,
        steps: int,
        batch_size: int,
        title: str,
        interactive: bool | None = None,
    ):
        global _live
        if interactive is None:
            interactive = hasattr(sys.stdout, "isatty") and sys.stdout.isatty()
        self._steps = steps
        self._batch_size = batch_size
        self._bar = None
        self._start = time.perf_counter()
        self._last_refresh = float("-inf")
        if interactive:
            print(title, flush=True)
            self._bar = keras.utils.Progbar(
                steps, stateful_metrics=["loss", "top1", "images/s"]
            )
            _live = self

    def update(self, step: int, metrics: dict) -> None:
        """Shows step `step` (1-based) of the epoch with the step's metrics.

        Reads the metrics (a host sync) only when the bar is due for a
        redraw, so the training loop keeps running ahead of the device.
        """
        if self._bar is None:
            return
        now = time.perf_counter()
        if step < self._steps and now - self._last_refresh < _REFRESH_SECONDS:
            return
        self._last_refresh = now
        self._bar.update(
            step,
            [
                ("loss", float(metrics["loss"])),
                ("top1", float(metrics["top1"])),
                ("images/s", step * self._batch_size / max(now - self._start, 1e-9)),
            ],
        )
        if step >= self._steps:
            self.close()

    def close(self) -> None:
        """Stops drawing (the finished bar stays on screen)."""
        global _live
        if _live is self:
            _live = None

    def _clear(self) -> None:
        """Wipes the bar's line so a slim line starts at column 0."""
        sys.stdout.write("\r\x1b[K")
        self._last_refresh = float("-inf")  # Redraw below the line next time.
