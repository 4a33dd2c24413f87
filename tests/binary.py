"""Test helpers: the `tfloop-train` binary (or any command) in subprocesses.

Also the clusters of worker processes on 127.0.0.1 (`TF_CONFIG`, free ports)
and what the tests read back: step lines of a log, checkpoint tensors.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import tfloop

# The model is not the point of the tests that run the binary at this size.
TINY = {
    "model": "tiny_bn_cnn",
    "image_size": 32,
    "batch_size": 16,
    "train_examples": 64,
    "val_examples": 32,
    "steps_per_epoch": 4,
    "log_every": 2,
    "bn_recalibrate_batches": 2,
    "epochs": 1,
}
TFLOOP_ROOT = str(Path(tfloop.__file__).parent.parent)
# The binary with one more `--model`, `tiny_bn_cnn`: see `tiny_train.py`.
TINY_TRAIN = [sys.executable, str(Path(__file__).with_name("tiny_train.py"))]
CLUSTER_TIMEOUT = 300  # Seconds a cluster's workers may take; all are killed past it.


def tiny_bn_cnn(
    num_classes: int, *, image_size: int | None = None, bn_decay: float = 0.997
) -> keras.Model:
    """Conv-BN-ReLU twice, pool, logits: BN state to train, save and restore, cheaply.

    For tests of the binary where the model is not the point (a tenth of
    `resnet_v1_small`'s tracing and step time). Named layers: weight paths do
    not depend on what the process built before.
    """
    inputs = keras.Input((image_size, image_size, 3))
    x = inputs
    for i, filters in enumerate((8, 16), start=1):
        x = keras.layers.Conv2D(filters, 3, strides=2, use_bias=False, name=f"conv{i}")(
            x
        )
        x = keras.layers.BatchNormalization(momentum=bn_decay, name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="tiny_bn_cnn")


def env(**extra: str) -> dict[str, str]:
    """This process's environment, quiet TensorFlow, and the tfloop it imports.

    The tfloop this process imports comes first on `PYTHONPATH`, wherever it
    was imported from, so that a subprocess started elsewhere imports it too.
    """
    return dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(
            [TFLOOP_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        **extra,
    )


def command(**flags) -> list[str]:
    """The binary's command line (`TINY_TRAIN`): the tiny flags, overridden by `flags`."""
    values = {**TINY, **flags}
    return TINY_TRAIN + [f"--{name}={value}" for name, value in values.items()]


def run(**flags) -> subprocess.CompletedProcess:
    """Runs the binary to completion; fails the test if it fails."""
    return run_command(command(**flags))


def run_command(
    argv: list[str], *, check: bool = True, timeout: float = 600, **kwargs
) -> subprocess.CompletedProcess:
    """Runs `argv` (quiet TensorFlow, this tfloop); with `check`, fails the test
    if it exits non-zero. `kwargs` go to `subprocess.run` (`env`, `cwd`)."""
    kwargs.setdefault("env", env())
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if check:
        assert result.returncode == 0, (
            f"exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def start(argv: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Starts `argv` with stdout and stderr appended to the file `log` (pipes can fill)."""
    kwargs.setdefault("env", env())
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **kwargs,
        )


def finish(process: subprocess.Popen, timeout: float) -> int:
    """Waits for `process` (killing it past `timeout` seconds); its exit code."""
    try:
        return process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for(ready: Callable[[], bool], processes, what: str, timeout: float) -> None:
    """Polls `ready()` while every one of `processes` runs; fails past `timeout`."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert all(p.poll() is None for p in processes), f"a run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


def steps(log: str) -> list[int]:
    """The step numbers of the binary's `step N, loss = ...` lines in `log`."""
    return [int(s) for s in re.findall(r"^step (\d+), ", log, re.MULTILINE)]


def latest_checkpoint(model_dir: Path) -> int:
    """The number of the latest checkpoint in `model_dir`, 0 for none."""
    path = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
    return 0 if path is None else int(path.rsplit("-", 1)[1])


def checkpoint_tensors(path: str, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint `path` but those whose names start with `skip`.

    Never the serialized tf.data iterator state: its bytes include prefetch
    buffers whose fill depends on timing.
    """
    reader = tf.train.load_checkpoint(path)
    return {
        name: reader.get_tensor(name)
        for name in reader.get_variable_to_shape_map()
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
        and "ITERATOR_STATE" not in name
        and not name.startswith(skip)
    }


def assert_same_checkpoints(path: str, reference: str, skip: tuple[str, ...] = ()):
    """Every tensor of `path` equals `reference`'s bit for bit (BN counts included)."""
    got = checkpoint_tensors(path, skip)
    expected = checkpoint_tensors(reference, skip)
    assert set(got) == set(expected)
    assert any(name.startswith("bn/counts/") for name in expected)
    differ = [n for n in expected if not np.array_equal(got[n], expected[n])]
    assert differ == [], differ
    return expected


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Worker:
    """One worker process; its stdout and stderr go to files (pipes can fill)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, name: str):
        self.stdout, self.stderr = cwd / f"{name}.out", cwd / f"{name}.err"
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.process = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL
            )
        self.timed_out = False


def start_workers(
    args_of_worker: Callable[[int], list[str]], cwd: Path, num_workers: int = 2
) -> list[Worker]:
    """Starts the workers of one cluster; `args_of_worker(i)` is worker i's argv.

    Each gets a `TF_CONFIG` naming all of them, on free ports of 127.0.0.1.
    """
    cwd.mkdir(parents=True, exist_ok=True)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(num_workers)]}
    return [
        Worker(
            args_of_worker(index),
            env(
                TF_CONFIG=json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                )
            ),
            cwd,
            f"worker{index}",
        )
        for index in range(num_workers)
    ]


def wait_workers(workers: list[Worker], timeout: float = CLUSTER_TIMEOUT) -> list[str]:
    """Waits for every worker (killing all past `timeout`); returns their stdouts.

    Fails the test if any worker failed, with the end of its stderr.
    """
    deadline = time.monotonic() + timeout
    for worker in workers:
        try:
            worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.timed_out = True
            worker.process.kill()
            worker.process.wait()
    for index, worker in enumerate(workers):
        stderr = worker.stderr.read_text(errors="replace")
        traceback = stderr.rfind("Traceback")
        assert worker.process.returncode == 0, (
            f"worker {index} "
            + (f"timed out after {timeout} s" if worker.timed_out else "failed")
            + f" (exit {worker.process.returncode}):\n"
            + stderr[traceback if traceback >= 0 else -3000 :][-6000:]
        )
    return [worker.stdout.read_text(errors="replace") for worker in workers]
