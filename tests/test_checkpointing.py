"""Runs that survive: kill, preemption and resume of `python -m tfloop.train`.

The reference is an uninterrupted run of the same command. Interrupted runs
are SIGKILLed (or sent SIGTERM) in subprocesses once a mid-epoch checkpoint
exists, run again, and every tensor of their final checkpoint must equal the
reference's bit for bit. The one exception is the serialized tf.data iterator
state: its bytes include prefetch buffers whose fill depends on timing; what
it yields is covered by every weight matching.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import binary
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfloop import checkpointing
from tfloop.errors import InputError, NonFiniteError

STEPS = 8
FLAGS = [
    "--model=tiny_bn_cnn",  # The model is not the point: see `tiny_train.py`.
    "--image_size=32",
    "--batch_size=8",
    "--train_examples=64",
    "--val_examples=8",
    f"--steps_per_epoch={STEPS}",
    "--epochs=1",
    "--log_every=1",
    "--bn_recalibrate_batches=1",
    "--checkpoint_every_steps=2",  # Mid-epoch checkpoints at steps 2, 4 and 6.
    "--deterministic",
]
# Counters of saves, not of training: a preempted run saves once more.
_SAVE_COUNTERS = ("save_counter/", "checkpointed_runs/")
TIMEOUT = 240


def _start(model_dir: Path, *extra: str) -> subprocess.Popen:
    argv = [*binary.TINY_TRAIN, *FLAGS, f"--model_dir={model_dir}"]
    return binary.start([*argv, *extra], model_dir.parent / f"{model_dir.name}.log")


def _finish(process: subprocess.Popen) -> int:
    return binary.finish(process, TIMEOUT)


def _log(model_dir: Path) -> str:
    return (model_dir.parent / f"{model_dir.name}.log").read_text(errors="replace")


def _wait_for(ready, process: subprocess.Popen, what: str) -> None:
    binary.wait_for(ready, [process], what, TIMEOUT)


def _assert_identical(path: str, reference: str) -> None:
    expected = binary.assert_same_checkpoints(path, reference, skip=_SAVE_COUNTERS)
    assert any("optimizer/_variables" in name for name in expected)  # Slots.


class _Reference:
    """The uninterrupted run, started at once and waited for when needed."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.process = _start(model_dir)

    def final_checkpoint(self) -> str:
        assert _finish(self.process) == 0, _log(self.model_dir)
        return str(self.model_dir / "checkpoints" / f"ckpt-{STEPS}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> _Reference:
    return _Reference(tmp_path_factory.mktemp("reference") / "model")


def test_preempted_then_killed_run_resumes_bit_identical(reference, tmp_path):
    """SIGTERM, resume, SIGKILL after a mid-epoch checkpoint, resume: as if never stopped."""
    model_dir = tmp_path / "model"
    checkpoints = model_dir / "checkpoints"
    # 1. SIGTERM once the run is under way: a checkpoint at the next step.
    process = _start(model_dir)
    _wait_for(lambda: "early Validation Step" in _log(model_dir), process, "training")
    process.send_signal(signal.SIGTERM)
    assert _finish(process) == 42, _log(model_dir)
    log = _log(model_dir)
    assert "Traceback" not in log
    saved = re.findall(
        r"^tfloop-train: preempted \(SIGTERM\): saved `(\S+)` after step (\d+); "
        r"run the same command to resume$",
        log,
        re.MULTILINE,
    )
    assert len(saved) == 1, log[-3000:]
    path, step = saved[0][0], int(saved[0][1])
    assert step == binary.steps(log)[-1] and path.endswith(f"ckpt-{step}")
    assert path == tf.train.latest_checkpoint(str(checkpoints))
    # 2. Resume, and SIGKILL at a random moment after a mid-epoch checkpoint.
    before = len(log)
    process = _start(model_dir)
    mid_epoch = random.choice([number for number in (2, 4, 6) if number > step])

    def latest() -> int:
        return binary.latest_checkpoint(model_dir)

    _wait_for(lambda: latest() >= mid_epoch, process, f"ckpt-{mid_epoch}")
    time.sleep(random.uniform(0.0, 0.3))
    process.send_signal(signal.SIGKILL)
    process.wait()
    log = _log(model_dir)
    assert binary.steps(log[before:])[0] == step + 1, log[before:][-3000:]
    killed_after = latest()
    # 3. Resume to the end.
    before = len(log)
    assert _finish(_start(model_dir)) == 0, _log(model_dir)
    assert binary.steps(_log(model_dir)[before:]) == list(
        range(killed_after + 1, STEPS + 1)
    )
    _assert_identical(str(checkpoints / f"ckpt-{STEPS}"), reference.final_checkpoint())


def test_model_dir_of_another_model_is_refused_untouched(reference):
    model_dir = Path(reference.final_checkpoint()).parent.parent
    before = {p: p.read_bytes() for p in sorted(model_dir.rglob("*")) if p.is_file()}
    process = _start(model_dir, "--model=inception_v1")
    assert _finish(process) == 1
    lines = [line for line in _log(model_dir).splitlines() if "tfloop-train:" in line]
    assert lines[-1] == (
        f"tfloop-train: `--model_dir`={model_dir} holds a run with "
        "--model=tiny_bn_cnn, not --model=inception_v1; use another --model_dir"
    )
    after = {p: p.read_bytes() for p in sorted(model_dir.rglob("*")) if p.is_file()}
    assert after == before


@pytest.mark.parametrize(
    "key, value", [("model", "resnet_v1_50"), ("num_classes", 5), ("image_size", 64)]
)
def test_every_remembered_flag_is_checked(key, value, tmp_path):
    metadata = {"model": "resnet_v1_small", "num_classes": 4, "image_size": 32}
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / checkpointing.METADATA_FILENAME).write_text(
        json.dumps(metadata)
    )
    checkpointing.check_compatible(str(tmp_path), metadata)
    with pytest.raises(InputError) as error:
        checkpointing.check_compatible(str(tmp_path), {**metadata, key: value})
    assert str(error.value) == (
        f"`--model_dir`={tmp_path} holds a run with --{key}={metadata[key]}, not "
        f"--{key}={value}; use another --model_dir"
    )


def _dense(units: int) -> keras.Model:
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(units)])


def test_checkpoint_of_another_model_without_metadata_is_refused(tmp_path):
    """Model dirs from before the metadata file: the restore itself is checked."""
    tf.train.CheckpointManager(
        tf.train.Checkpoint(model=_dense(4)), str(tmp_path / "checkpoints"), 1
    ).save()
    with pytest.raises(
        InputError, match=r"checkpoint `\S+ckpt-1` does not fit this run"
    ):
        checkpointing.Checkpoints(
            model_dir=str(tmp_path),
            items={"model": _dense(5)},
            metadata={},
            strategy=tf.distribute.get_strategy(),
            chief=True,
            guarded=[],
        )


_KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import keras, tensorflow as tf
    from tensorflow.python.checkpoint import checkpoint_management
    from tfloop import checkpointing

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    checkpoints = checkpointing.Checkpoints(
        model_dir=sys.argv[1], items={"model": model}, metadata={"model": "dense"},
        strategy=tf.distribute.get_strategy(), chief=True, guarded=model.variables)
    checkpoints.save(1)
    model.layers[0].kernel.assign(tf.ones([3, 2]))

    def killed(*args, **kwargs):  # The data of ckpt-2 is written; die now.
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_management.update_checkpoint_state_internal = killed
    checkpoints.save(2)
    """
)


def test_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    result = binary.run_command(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path)],
        check=False,
        timeout=TIMEOUT,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    directory = str(tmp_path / "checkpoints")
    assert any(
        p.name.startswith("ckpt-2") for p in (tmp_path / "checkpoints").iterdir()
    )
    latest = tf.train.latest_checkpoint(directory)
    assert latest.endswith("ckpt-1")
    model = _dense(2)
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    # The state of step 1, not the ones assigned before the killed save.
    assert not np.array_equal(model.layers[0].kernel.numpy(), np.ones([3, 2]))


def test_each_worker_resumes_its_own_input_position_and_only_its_own(tmp_path):
    """Worker items restore with their shared checkpoint; another sharding is refused."""

    def checkpoints(iterator, worker):
        return checkpointing.Checkpoints(
            model_dir=str(tmp_path),
            items={"model": _dense(3)},
            metadata={},
            strategy=tf.distribute.get_strategy(),
            chief=True,
            guarded=[],
            worker_items={"train_data": iterator},
            worker=worker,
        )

    numbers = tf.data.Dataset.range(100)
    iterator = iter(numbers)
    next(iterator), next(iterator)
    checkpoints(iterator, (1, 2)).save(2)
    assert (tmp_path / "checkpoints" / "worker-1-of-2" / "ckpt-2.index").exists()
    resumed = iter(numbers)
    checkpoints(resumed, (1, 2))
    assert int(next(resumed)) == 2
    with pytest.raises(
        InputError,
        match=r"^checkpoint `\S+ckpt-2` holds no input position of worker 1 of 3 "
        r"\(no `\S+worker-1-of-3/ckpt-2`\): resume with the workers that wrote it$",
    ):
        checkpoints(iter(numbers), (1, 3))


def test_a_preemption_checkpoint_is_written_only_after_its_check(tmp_path):
    """`after_step(check=)`: a check that raises leaves no checkpoint behind."""
    model = _dense(3)
    checkpoints = checkpointing.Checkpoints(
        model_dir=str(tmp_path),
        items={"model": model},
        metadata={},
        strategy=tf.distribute.get_strategy(),
        chief=True,
        guarded=[],
    )

    def stop():
        raise NonFiniteError("step 2: non-finite loss")

    checkpoints.after_step(3, check=stop)  # No SIGTERM: nothing happens.
    # What `PreemptionCheckpointHandler` calls once SIGTERM has arrived:
    with pytest.raises(NonFiniteError, match="step 2"):
        checkpoints._save_preempted()
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")) is None
    checkpoints.after_step(4, check=lambda: None)
    checkpoints._save_preempted()
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-4")
    checkpoints.close()
