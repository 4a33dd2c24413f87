"""Many machines: two worker processes on 127.0.0.1 under MultiWorkerMirroredStrategy.

Each worker is a fresh Python process with one CPU device (this directory's
conftest, which splits the CPU in two, is not loaded there) and a `TF_CONFIG`
naming both. The reference is the same training in this process, with the
two logical devices of the conftest under `MirroredStrategy`.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import multi_worker_script
import numpy as np
import pytest
import tensorflow as tf
from test_data import _write_slim_tfrecord

import tfloop

TIMEOUT = 300  # Seconds the workers of a cluster may take; all are killed past it.
_SCRIPT = Path(multi_worker_script.__file__)
_TFLOOP_ROOT = str(Path(tfloop.__file__).parent.parent)


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (bound to port 0, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class _Worker:
    """One worker process; its stdout and stderr go to files (pipes can fill)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, name: str):
        self.stdout, self.stderr = cwd / f"{name}.out", cwd / f"{name}.err"
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.process = subprocess.Popen(
                argv, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL
            )
        self.timed_out = False


def _start_workers(
    args_of_worker: Callable[[int], list[str]], cwd: Path, num_workers: int = 2
) -> list[_Worker]:
    """Starts the workers of one cluster; `args_of_worker(i)` is worker i's argv."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(num_workers)]}
    workers = []
    for index in range(num_workers):
        env = dict(os.environ)
        env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        # The tfloop this process imports, wherever it was imported from.
        env["PYTHONPATH"] = os.pathsep.join(
            [_TFLOOP_ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        env["TF_CONFIG"] = json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        )
        workers.append(_Worker(args_of_worker(index), env, cwd, f"worker{index}"))
    return workers


def _wait(workers: list[_Worker]) -> list[str]:
    """Waits for every worker (killing all on timeout); returns their stdouts."""
    deadline = time.monotonic() + TIMEOUT
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
            + (f"timed out after {TIMEOUT} s" if worker.timed_out else "failed")
            + f" (exit {worker.process.returncode}):\n"
            + stderr[traceback if traceback >= 0 else -3000 :][-6000:]
        )
    return [worker.stdout.read_text(errors="replace") for worker in workers]


def test_workers_match_one_process_with_two_devices(mirrored, tmp_path):
    workers = _start_workers(
        lambda i: [sys.executable, str(_SCRIPT), str(tmp_path / f"worker{i}.npz")],
        tmp_path,
    )
    try:  # The reference runs here while the workers start.
        reference = multi_worker_script.train(mirrored)
    finally:
        _wait(workers)
    results = [dict(np.load(tmp_path / f"worker{i}.npz")) for i in range(2)]
    assert all(int(r.pop("num_replicas")) == 2 for r in results)
    assert set(results[0]) == set(results[1]) == set(reference)
    assert sum(name.startswith("bn_count") for name in reference) == 2
    for name, expected in reference.items():
        np.testing.assert_array_equal(results[0][name], results[1][name], name)
        np.testing.assert_allclose(
            results[0][name], expected, rtol=1e-5, atol=1e-6, err_msg=name
        )
    # Every worker took one step per global batch, no more, no fewer.
    assert int(reference["bn_count_0"]) == multi_worker_script.STEPS


def test_binary_on_two_workers(tmp_path):
    """`python -m tfloop.train --strategy=multi_worker` on a 2-worker cluster.

    Each worker gets its own `--model_dir`, so that what the non-chief writes
    there, if anything, is told apart from what the chief writes.
    """
    flags = [
        "--strategy=multi_worker",
        "--model=resnet_v1_small",
        "--image_size=32",
        "--batch_size=8",
        "--epochs=1",
        "--steps_per_epoch=3",
        "--train_examples=64",
        "--bn_recalibrate_batches=2",
        "--val_examples=64",  # 8 validation batches, not 64: saves ~25 s.
        "--log_every=1",
    ]
    model_dirs = [tmp_path / f"model{i}" for i in range(2)]
    workers = _start_workers(
        lambda i: (
            [sys.executable, "-m", "tfloop.train", *flags]
            + [f"--model_dir={model_dirs[i]}"]
        ),
        tmp_path,
    )
    outputs = _wait(workers)
    for output in outputs:
        precision = re.findall(
            r"^precision @ 1 = [0-9.]+ val loss = \S+$", output, re.MULTILINE
        )
        assert len(precision) == 2, output[-3000:]  # Before and after the epoch.
    chief_dir, other_dir = model_dirs
    checkpoints = sorted(p.name for p in (chief_dir / "checkpoints").iterdir())
    assert "checkpoint" in checkpoints and "ckpt-3.index" in checkpoints, checkpoints
    saved = tf.train.list_variables(str(chief_dir / "checkpoints"))
    assert any(name.startswith("bn/counts/") for name, _ in saved)  # BN state too.
    events = list((chief_dir / "summaries").glob("events.out.tfevents.*"))
    assert any(b"validation/top1" in e.read_bytes() for e in events), events
    written = list(other_dir.rglob("*")) if other_dir.exists() else []
    assert written == [], written
    # Resume on a shared model dir: every worker restores the chief's
    # checkpoint and continues with steps 4-6 (a worker that restarted at
    # step 1 would print "step 1" and train half of each batch from scratch).
    resumed = _wait(
        _start_workers(
            lambda i: (
                [sys.executable, "-m", "tfloop.train", *flags]
                + ["--epochs=2", f"--model_dir={chief_dir}"]
            ),
            tmp_path,
        )
    )
    for output in resumed:
        steps = re.findall(r"^step (\d+), ", output, re.MULTILINE)
        assert steps == ["4", "5", "6"], output[-3000:]


@pytest.mark.parametrize("files", [0, 4])
def test_two_workers_killed_mid_epoch_resume_bit_identical(files, tmp_path):
    """Kill both workers after a mid-epoch checkpoint, restart both: as if never stopped.

    The reference is a cluster running the same command uninterrupted. With
    4 TFRecord files each worker reads its own two, and resumes from its own
    input position (a worker given another's would train on other examples).
    """
    data_flags = []
    if files:
        _id_records(tmp_path / "data", files=files, per_file=12)
        data_flags = ["--dataset=tfrecord", f"--data_dir={tmp_path / 'data'}"]
    flags = [
        *data_flags,
        "--strategy=multi_worker",
        "--model=resnet_v1_small",
        "--image_size=32",
        "--batch_size=8",
        "--train_examples=48",
        "--val_examples=8",
        "--steps_per_epoch=6",
        "--epochs=1",
        "--log_every=1",
        "--bn_recalibrate_batches=1",
        "--checkpoint_every_steps=2",
        "--deterministic",
    ]

    def cluster(model_dir: Path, name: str) -> list[_Worker]:
        cwd = tmp_path / name
        cwd.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "tfloop.train", *flags]
        return _start_workers(lambda i: [*command, f"--model_dir={model_dir}"], cwd)

    reference_dir, model_dir = tmp_path / "reference", tmp_path / "model"
    _wait(cluster(reference_dir, "reference"))
    killed = cluster(model_dir, "killed")
    mid_epoch = random.choice([2, 4])

    def latest() -> int:
        path = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
        return 0 if path is None else int(path.rsplit("-", 1)[1])

    deadline = time.monotonic() + TIMEOUT
    while latest() < mid_epoch and time.monotonic() < deadline:
        assert all(w.process.poll() is None for w in killed), "a worker ended"
        time.sleep(0.02)
    for worker in killed:
        worker.process.kill()
        worker.process.wait()
    resumed_from = latest()
    assert resumed_from >= mid_epoch, f"no ckpt-{mid_epoch} after {TIMEOUT} s"
    outputs = _wait(cluster(model_dir, "resumed"))
    for output in outputs:  # Every worker resumed where the checkpoint left off.
        steps = [int(s) for s in re.findall(r"^step (\d+), ", output, re.MULTILINE)]
        assert steps == list(range(resumed_from + 1, 7)), output[-3000:]
    got = tf.train.load_checkpoint(str(model_dir / "checkpoints" / "ckpt-6"))
    expected = tf.train.load_checkpoint(str(reference_dir / "checkpoints" / "ckpt-6"))
    names = [
        name
        for name in expected.get_variable_to_shape_map()
        if name != "_CHECKPOINTABLE_OBJECT_GRAPH"
        and "ITERATOR_STATE" not in name  # Its bytes hold timing-dependent buffers.
    ]
    assert any(name.startswith("bn/counts/") for name in names)
    if files:  # Each worker's own position, beside the shared checkpoint.
        for index in range(2):
            own = model_dir / "checkpoints" / f"worker-{index}-of-2" / "ckpt-6.index"
            assert own.exists(), own
    differ = [
        name
        for name in names
        if not np.array_equal(got.get_tensor(name), expected.get_tensor(name))
    ]
    assert differ == [], differ


def _id_records(data_dir: Path, files: int, per_file: int) -> list[list[int]]:
    """Train TFRecords whose labels are example ids; returns each file's ids."""
    data_dir.mkdir()
    ids = np.arange(files * per_file).reshape(files, per_file).tolist()
    image = np.zeros((8, 8, 3), np.uint8)
    for index, own in enumerate(ids):
        name = f"train-{index:05d}-of-{files:05d}"
        _write_slim_tfrecord(data_dir / name, [(image, i) for i in own])
    _write_slim_tfrecord(data_dir / "validation-00000-of-00001", [(image, 0)] * 4)
    classes = files * per_file
    (data_dir / "labels.txt").write_text("".join(f"{i}:c{i}\n" for i in range(classes)))
    return ids


def _epoch_ids(tmp_path: Path, files: int) -> tuple[list[list[int]], list[list[int]]]:
    """`files` TFRecord files of 6 examples on 2 workers, batch 4: one epoch.

    Returns the ids in each file and the ids each worker read, in order.
    """
    file_ids = _id_records(tmp_path / "data", files=files, per_file=6)
    workers = _start_workers(
        lambda i: [
            sys.executable,
            str(_SCRIPT),
            str(tmp_path / f"worker{i}.npz"),
            "epoch_ids",
            str(tmp_path / "data"),
        ],
        tmp_path,
    )
    _wait(workers)
    read = []
    for index in range(2):
        result = np.load(tmp_path / f"worker{index}.npz")
        assert result["shard"].tolist() == [index, 2]
        read.append(result["ids"].tolist())
    return file_ids, read


def test_workers_read_their_own_files_and_an_epoch_sees_each_example_once(tmp_path):
    """4 TFRecord files on 2 workers: worker i reads files i and i + 2 only."""
    file_ids, read = _epoch_ids(tmp_path, files=4)
    for index, ids in enumerate(read):
        assert set(ids) == set(file_ids[index] + file_ids[index + 2])  # All its own.
    assert sorted(read[0] + read[1]) == list(range(24))  # Every example once.


def test_uneven_files_take_the_same_steps_and_the_smaller_share_repeats(tmp_path):
    """3 files on 2 workers: 12 and 6 examples; an epoch is 18 // 4 = 4 steps each.

    Worker 1 reads its 6 examples, then 2 of its next pass; no worker waits.
    """
    file_ids, read = _epoch_ids(tmp_path, files=3)
    assert [len(ids) for ids in read] == [8, 8]  # 4 steps of 2 examples.
    assert len(set(read[0])) == 8 and set(read[0]) <= set(file_ids[0] + file_ids[2])
    assert set(read[1][:6]) == set(file_ids[1]) and set(read[1][6:]) <= set(file_ids[1])


def _stock_keras_steps() -> dict[str, np.ndarray]:
    """`multi_worker_script`'s steps on one device, in plain Keras and TF.

    Each step normalizes with, and moves the BN statistics towards, the
    moments of the whole global batch (stock Keras BN, momentum 0.99).
    """
    model = multi_worker_script.build_model()
    optimizer = tf.keras.optimizers.SGD(0.1)
    for images, labels in multi_worker_script.global_batches():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                multi_worker_script.LOSS(labels, model(images, training=True))
            )
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(gradients, model.trainable_variables)
    return {variable.path: variable.numpy() for variable in model.weights}


def test_worker_local_batches_update_as_one_device_on_the_global_batch(tmp_path):
    """Each worker feeds only its own (different) half: the global-batch update."""
    workers = _start_workers(
        lambda i: [
            sys.executable,
            str(_SCRIPT),
            str(tmp_path / f"worker{i}.npz"),
            "worker_batches",
        ],
        tmp_path,
    )
    try:  # The reference runs here while the workers start.
        expected = _stock_keras_steps()
        one_device = multi_worker_script.train(
            tf.distribute.get_strategy(), **multi_worker_script.WORKER_BATCH_STEP
        )
    finally:
        _wait(workers)
    results = [dict(np.load(tmp_path / f"worker{i}.npz")) for i in range(2)]
    assert all(int(r.pop("num_replicas")) == 2 for r in results)
    for name, value in expected.items():
        for got in (*results, one_device):
            np.testing.assert_allclose(
                got[name], value, rtol=1e-5, atol=1e-5, err_msg=name
            )
    assert any("moving_variance" in name for name in expected)
