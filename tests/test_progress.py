"""Progress bar on a terminal only; the slim-era lines unchanged either way."""

import io
import os
import pty
import re
import subprocess
import sys

import binary
import pytest

from tfloop import progress

SLIM_STEP = re.compile(r"^step \d+, loss = \d+\.\d{2}, training_acc = [01]\.\d{4}$")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _shown(text):
    """What a terminal shows at the end of each line: after the last `\\r`."""
    return [line.rsplit("\r", 1)[-1].replace("\x1b[K", "") for line in text.split("\n")]


def _epoch(interactive, monkeypatch):
    monkeypatch.setattr(progress, "_REFRESH_SECONDS", 0.0)  # Draw every step.
    bar = progress.EpochBar(
        steps=4, batch_size=8, title="Epoch 1/1", interactive=interactive
    )
    for step in range(1, 5):
        bar.update(step, {"loss": 1.5 - 0.1 * step, "top1": 0.25 * step})
        if step == 2:
            progress.say("step 2, loss = 1.30, training_acc = 0.5000")
    progress.say("Validation Step")


def test_bar_on_a_terminal_leaves_slim_lines_whole(monkeypatch):
    out = _Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    _epoch(None, monkeypatch)
    shown = _shown(out.getvalue())
    assert shown[0] == "Epoch 1/1"
    assert "step 2, loss = 1.30, training_acc = 0.5000" in shown
    assert "Validation Step" in shown
    final = next(line for line in shown if "4/4" in line)
    # Stateful metrics: the last step's values, not an average.
    assert "loss: 1.1000" in final and "top1: 1.0000" in final
    assert "images/s:" in final
    assert progress._live is None  # Finished bars are no longer wiped.


def test_no_bar_when_stdout_is_not_a_terminal(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    _epoch(None, monkeypatch)
    assert out.getvalue() == (
        "step 2, loss = 1.30, training_acc = 0.5000\nValidation Step\n"
    )


@pytest.mark.parametrize(
    ("moving", "recalibrated", "stale"),
    [(1.38, 0.05, True), (0.30, 0.26, False), (0.11, 0.05, True), (0.09, 0.05, False)],
)
def test_stale_line_rule(moving, recalibrated, stale):
    line = progress.stale_line(moving, recalibrated)
    # Written out: over 1.2 times and 0.05 more than the recalibrated loss.
    assert (
        (line is not None)
        == (moving > 1.2 * recalibrated and moving > recalibrated + 0.05)
        == stale
    )
    if stale:
        assert line == (
            f"BN statistics were stale: val loss {moving:.2f} with moving "
            f"averages, {recalibrated:.2f} after recalibration"
        )


def test_binary_on_a_terminal_draws_bars_and_keeps_slim_lines(tmp_path):
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        binary.command(bn_recalibrate_batches=1),
        stdout=secondary,
        stderr=subprocess.DEVNULL,
        cwd=os.getcwd(),
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # The child closed the terminal.
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert process.wait(timeout=300) == 0
    shown = _shown(b"".join(chunks).decode().replace("\r\n", "\n"))
    slim = [
        line
        for line in shown
        if SLIM_STEP.match(line)
        or line in ("early Validation Step", "Validation Step")
        or line.startswith("precision @ 1 = ")
    ]
    assert [re.sub(r"\d", "#", line) for line in slim] == [
        "early Validation Step",
        "precision @ # = #.#### val loss = #.##",
        "step #, loss = #.##, training_acc = #.####",
        "step #, loss = #.##, training_acc = #.####",
        "Validation Step",
        "precision @ # = #.#### val loss = #.##",
    ]
    assert "Epoch 1/1" in shown
    assert any("4/4" in line and "images/s:" in line for line in shown)
