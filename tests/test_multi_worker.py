"""Many machines: two worker processes on 127.0.0.1 under MultiWorkerMirroredStrategy.

Each worker is a fresh Python process with one CPU device (this directory's
conftest, which splits the CPU in two, is not loaded there) and a `TF_CONFIG`
naming both. The reference is the same training in this process, with the
two logical devices of the conftest under `MirroredStrategy`.
"""

from __future__ import annotations

import random
import re
import shutil
import sys
from pathlib import Path

import binary
import multi_worker_script
import numpy as np
import pytest
import tensorflow as tf
from test_data import _write_slim_tfrecord

_SCRIPT = Path(multi_worker_script.__file__)


def test_workers_match_one_process_with_two_devices(mirrored, tmp_path):
    workers = binary.start_workers(
        lambda i: [sys.executable, str(_SCRIPT), str(tmp_path / f"worker{i}.npz")],
        tmp_path,
    )
    try:  # The reference runs here while the workers start.
        reference = multi_worker_script.train(mirrored)
    finally:
        binary.wait_workers(workers)
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


# The binary's flags on a cluster: mid-epoch checkpoints at steps 2 and 4.
FLAGS = [
    "--strategy=multi_worker",
    "--model=tiny_bn_cnn",  # The model is not the point: see `tiny_train.py`.
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
COMMAND = [*binary.TINY_TRAIN, *FLAGS]


def _cluster(cwd: Path, model_dirs: list[Path], *extra: str) -> list[binary.Worker]:
    """The binary on two workers; worker i gets `--model_dir=model_dirs[i]`."""
    return binary.start_workers(
        lambda i: [*COMMAND, *extra, f"--model_dir={model_dirs[i]}"], cwd
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[list[str], list[Path]]:
    """One cluster run of `COMMAND`, never stopped: its stdouts and model dirs.

    Each worker gets its own `--model_dir`, so that what the non-chief writes
    there, if anything, is told apart from what the chief writes. The chief's
    is the reference of the interrupted runs.
    """
    cwd = tmp_path_factory.mktemp("uninterrupted")
    model_dirs = [cwd / f"model{i}" for i in range(2)]
    return binary.wait_workers(_cluster(cwd, model_dirs)), model_dirs


def test_binary_on_two_workers(uninterrupted, tmp_path):
    """The binary with `--strategy=multi_worker` on a 2-worker cluster."""
    outputs, (chief_dir, other_dir) = uninterrupted
    for output in outputs:
        precision = re.findall(
            r"^precision @ 1 = [0-9.]+ val loss = \S+$", output, re.MULTILINE
        )
        assert len(precision) == 2, output[-3000:]  # Before and after the epoch.
        assert binary.steps(output) == [1, 2, 3, 4, 5, 6], output[-3000:]
    checkpoints = sorted(p.name for p in (chief_dir / "checkpoints").iterdir())
    assert "checkpoint" in checkpoints and "ckpt-6.index" in checkpoints, checkpoints
    saved = tf.train.list_variables(str(chief_dir / "checkpoints"))
    assert any(name.startswith("bn/counts/") for name, _ in saved)  # BN state too.
    events = list((chief_dir / "summaries").glob("events.out.tfevents.*"))
    assert any(b"validation/top1" in e.read_bytes() for e in events), events
    written = list(other_dir.rglob("*")) if other_dir.exists() else []
    assert written == [], written
    # Resume on a shared model dir (a copy of the chief's): every worker
    # restores the chief's end-of-epoch checkpoint and continues with steps
    # 7-12 (a worker that restarted at step 1 would print "step 1" and train
    # half of each batch from scratch).
    model_dir = tmp_path / "model"
    shutil.copytree(chief_dir, model_dir)
    resumed = binary.wait_workers(_cluster(tmp_path, [model_dir] * 2, "--epochs=2"))
    for output in resumed:
        assert binary.steps(output) == list(range(7, 13)), output[-3000:]


def _kill_and_resume(tmp_path: Path, model_dir: Path, *extra: str) -> None:
    """Kills both workers after a mid-epoch checkpoint, then restarts both."""
    killed = _cluster(tmp_path / "killed", [model_dir] * 2, *extra)
    mid_epoch = random.choice([2, 4])
    binary.wait_for(
        lambda: binary.latest_checkpoint(model_dir) >= mid_epoch,
        [w.process for w in killed],
        f"ckpt-{mid_epoch}",
        binary.CLUSTER_TIMEOUT,
    )
    for worker in killed:
        worker.process.kill()
        worker.process.wait()
    resumed_from = binary.latest_checkpoint(model_dir)
    resumed = _cluster(tmp_path / "resumed", [model_dir] * 2, *extra)
    for output in binary.wait_workers(resumed):  # Each resumed where it left off.
        assert binary.steps(output) == list(range(resumed_from + 1, 7)), output[-3000:]


def test_two_workers_killed_mid_epoch_resume_bit_identical(uninterrupted, tmp_path):
    """Kill both workers after a mid-epoch checkpoint, restart both: as if never stopped.

    The reference is the uninterrupted cluster's chief.
    """
    model_dir = tmp_path / "model"
    _kill_and_resume(tmp_path, model_dir)
    _, (reference_dir, _) = uninterrupted
    binary.assert_same_checkpoints(
        str(model_dir / "checkpoints" / "ckpt-6"),
        str(reference_dir / "checkpoints" / "ckpt-6"),
    )


def test_workers_on_their_own_files_killed_mid_epoch_resume_bit_identical(tmp_path):
    """The same with 4 TFRecord files: each worker reads its own two.

    Each resumes from its own input position, checkpointed beside the shared
    checkpoint (a worker given another's would train on other examples).
    """
    _id_records(tmp_path / "data", files=4, per_file=12)
    extra = ["--dataset=tfrecord", f"--data_dir={tmp_path / 'data'}"]
    reference_dir, model_dir = tmp_path / "reference", tmp_path / "model"
    binary.wait_workers(
        _cluster(tmp_path / "uninterrupted", [reference_dir] * 2, *extra)
    )
    _kill_and_resume(tmp_path, model_dir, *extra)
    for index in range(2):
        own = model_dir / "checkpoints" / f"worker-{index}-of-2" / "ckpt-6.index"
        assert own.exists(), own
    binary.assert_same_checkpoints(
        str(model_dir / "checkpoints" / "ckpt-6"),
        str(reference_dir / "checkpoints" / "ckpt-6"),
    )


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
    workers = binary.start_workers(
        lambda i: [
            sys.executable,
            str(_SCRIPT),
            str(tmp_path / f"worker{i}.npz"),
            "epoch_ids",
            str(tmp_path / "data"),
        ],
        tmp_path,
    )
    binary.wait_workers(workers)
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
    workers = binary.start_workers(
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
        binary.wait_workers(workers)
    results = [dict(np.load(tmp_path / f"worker{i}.npz")) for i in range(2)]
    assert all(int(r.pop("num_replicas")) == 2 for r in results)
    for name, value in expected.items():
        for got in (*results, one_device):
            np.testing.assert_allclose(
                got[name], value, rtol=1e-5, atol=1e-5, err_msg=name
            )
    assert any("moving_variance" in name for name in expected)
