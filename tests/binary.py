"""Test helper: the `tfloop-train` binary (or any command) in a subprocess."""

import os
import subprocess
import sys

TINY = {
    "model": "resnet_v1_small",
    "image_size": 32,
    "batch_size": 16,
    "train_examples": 64,
    "val_examples": 32,
    "steps_per_epoch": 4,
    "log_every": 2,
    "bn_recalibrate_batches": 2,
    "epochs": 1,
}


def command(**flags) -> list[str]:
    """The binary's command line: the tiny flags, overridden by `flags`."""
    values = {**TINY, **flags}
    return [sys.executable, "-m", "tfloop.train"] + [
        f"--{name}={value}" for name, value in values.items()
    ]


def run(**flags) -> subprocess.CompletedProcess:
    """Runs the binary to completion; fails the test if it fails."""
    return run_command(command(**flags))


def run_command(argv: list[str]) -> subprocess.CompletedProcess:
    """Runs `argv` (quiet TensorFlow); fails the test if it exits non-zero."""
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result
