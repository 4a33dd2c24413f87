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


def test_two_workers_killed_mid_epoch_resume_bit_identical(uninterrupted, tmp_path):
    """Kill both workers after a mid-epoch checkpoint, restart both: as if never stopped.

    The reference is the uninterrupted cluster's chief.
    """
    model_dir = tmp_path / "model"
    killed = _cluster(tmp_path / "killed", [model_dir] * 2)
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
    outputs = binary.wait_workers(_cluster(tmp_path / "resumed", [model_dir] * 2))
    for output in outputs:  # Every worker resumed where the checkpoint left off.
        assert binary.steps(output) == list(range(resumed_from + 1, 7)), output[-3000:]
    _, (reference_dir, _) = uninterrupted
    binary.assert_same_checkpoints(
        str(model_dir / "checkpoints" / "ckpt-6"),
        str(reference_dir / "checkpoints" / "ckpt-6"),
    )
