"""Non-finite steps are never applied; the binary stops (or skips) and never saves NaN."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import binary
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import ops

import tfloop
from tfloop import nonfinite, runner
from tfloop.config import TrainConfig
from tfloop.errors import NonFiniteError

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def _model():
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )


def _batch(seed: int, nan_at: int | None = None):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(8, 6, 6, 2)).astype("float32")
    if nan_at is not None:
        images[nan_at, 0, 0, 0] = np.nan
    return tf.constant(images), tf.constant(rng.integers(0, 3, 8), tf.int32)


def _build(strategy, optimizer, on_nonfinite):
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = _model()
        optimizer = optimizer()
    step = tfloop.make_train_step(
        model, optimizer, LOSS, strategy=strategy, on_nonfinite=on_nonfinite
    )
    return model, optimizer, step


def _state(model, optimizer) -> list[np.ndarray]:
    variables = model.variables + optimizer.variables
    variables += tfloop.bn.state(model).counts
    return [np.array(v.numpy()) for v in variables]


def _distribute(strategy, batch):
    return strategy.experimental_distribute_values_from_function(
        lambda context: tuple(
            tf.split(value, context.num_replicas_in_sync)[
                context.replica_id_in_sync_group
            ]
            for value in batch
        )
    )


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(0.01),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("replicas", [1, 2])
def test_nonfinite_step_changes_nothing_and_finite_steps_match(
    name, replicas, mirrored
):
    """A NaN on one replica's shard: no weight, slot, iteration or BN statistic moves.

    The finite steps around it equal, bit for bit, the same steps of a step
    built without `on_nonfinite` (which never skips anything).
    """
    strategy = mirrored if replicas == 2 else tf.distribute.get_strategy()
    model, optimizer, step = _build(strategy, OPTIMIZERS[name], "skip")
    plain_model, plain_optimizer, plain_step = _build(strategy, OPTIMIZERS[name], None)
    metrics = step(_distribute(strategy, _batch(0)))
    plain_step(_distribute(strategy, _batch(0)))
    assert [float(metrics[key]) for key in nonfinite.KEYS] == [0.0, 0.0, 0.0]
    before = _state(model, optimizer)
    # Example 7 lies in the last replica's shard; the decision is global.
    metrics = step(_distribute(strategy, _batch(1, nan_at=7)))
    # Loss and gradients: the one replica that saw the NaN. BN moments are
    # checked after the fused reduction, where every replica sees it.
    assert [float(metrics[key]) for key in nonfinite.KEYS] == [1.0, 1.0, replicas]
    assert nonfinite.describe(metrics) == "loss and gradients and BN statistics"
    after = _state(model, optimizer)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert int(optimizer.iterations.numpy()) == 1
    step(_distribute(strategy, _batch(2)))
    plain_step(_distribute(strategy, _batch(2)))
    for got, expected in zip(
        _state(model, optimizer), _state(plain_model, plain_optimizer)
    ):
        np.testing.assert_array_equal(got, expected)


def test_check_step_stops_or_counts():
    bad = {"nonfinite_loss": 0.0, "nonfinite_gradients": 2.0, "nonfinite_bn": 0.0}
    assert nonfinite.check_step(3, {"nonfinite_loss": 0.0}, mode="stop")
    assert not nonfinite.check_step(3, bad, mode="skip")
    with pytest.raises(NonFiniteError, match=r"^step 3: non-finite gradients; stopped"):
        nonfinite.check_step(3, bad, mode="stop")


def test_nonfinite_variables_are_named():
    good = tf.Variable([1.0, 2.0], name="good")
    bad = tf.Variable([1.0, np.inf], name="bad")
    count = tf.Variable(3, name="count")
    assert nonfinite.nonfinite_variables([good, bad, count]) == ["bad:0"]


# --------------------------------------------------------------------------
# The binary with a learning rate of 1e6.

TINY = [
    "--model=resnet_v1_small",
    "--image_size=32",
    "--batch_size=8",
    "--train_examples=64",
    "--val_examples=8",
    "--steps_per_epoch=8",
    "--epochs=1",
    "--log_every=1",
    "--bn_recalibrate_batches=1",
    "--checkpoint_every_steps=1",
    "--learning_rate=1e6",
]


def _run(model_dir: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "tfloop.train", *TINY, f"--model_dir={model_dir}"]
    return binary.run_command([*argv, *args], check=False, timeout=300)


def _assert_all_checkpoints_finite(model_dir: Path) -> list[int]:
    """Every tensor of every checkpoint left is finite; returns their numbers."""
    numbers = []
    for index in sorted((model_dir / "checkpoints").glob("ckpt-*.index")):
        reader = tf.train.load_checkpoint(str(index.with_suffix("")))
        for name, dtype in reader.get_variable_to_dtype_map().items():
            if dtype.is_floating:
                assert np.isfinite(reader.get_tensor(name)).all(), (index.name, name)
        numbers.append(int(index.name.split("-")[1].split(".")[0]))
    return numbers


@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_learning_rate_1e6_never_writes_a_nonfinite_checkpoint(optimizer, tmp_path):
    result = _run(tmp_path, f"--optimizer={optimizer}")
    numbers = _assert_all_checkpoints_finite(tmp_path)
    assert "Traceback" not in result.stderr
    steps = [int(s) for s in re.findall(r"^step (\d+), ", result.stdout, re.MULTILINE)]
    if result.returncode == 0:  # Huge but finite all the way.
        assert numbers[-1] == 8
        return
    assert result.returncode == 1, result.stderr[-3000:]
    stop = re.findall(r"^tfloop-train: (.*)$", result.stderr, re.MULTILINE)
    assert len(stop) == 1, result.stderr[-3000:]
    match = re.match(r"step (\d+): non-finite (loss|gradients|BN statistics)", stop[0])
    if match:  # A train step: it printed no step line, the last good one is saved.
        assert int(match.group(1)) == steps[-1] + 1
        assert numbers[-1] == steps[-1]
    else:  # Validation after the epoch: refused, the mid-epoch checkpoints stay.
        assert re.match(r"validation after step 8: non-finite", stop[0]), stop
        assert numbers[-1] == 7


def test_skip_counts_skipped_steps_in_log_and_tensorboard(tmp_path):
    result = _run(tmp_path, "--optimizer=SGD", "--on_nonfinite=skip")
    _assert_all_checkpoints_finite(tmp_path)
    skipped = re.findall(
        r"step (\d+) skipped: non-finite .* \((\d+) skipped so far\)", result.stderr
    )
    assert skipped, result.stderr[-3000:]
    assert [int(count) for _, count in skipped] == list(range(1, len(skipped) + 1))
    events = b"".join(p.read_bytes() for p in (tmp_path / "summaries").glob("events*"))
    assert b"nonfinite_steps" in events


# --------------------------------------------------------------------------
# Read on the host only where it acts: no sync after every step.


def _loop_metrics(steps=0.0, first=0, loss=0.0, gradients=0.0, bn=0.0):
    """Metrics of a `TrainStep.run` call, as `Tally.record` takes them."""
    return {
        "nonfinite_loss": tf.constant(loss),
        "nonfinite_gradients": tf.constant(gradients),
        "nonfinite_bn": tf.constant(bn),
        "nonfinite_steps": tf.constant(steps),
        "nonfinite_first": tf.constant(first, tf.int32),
    }


def test_tally_notes_calls_with_nonfinite_steps_on_the_device():
    count = tf.Variable(0, dtype=tf.int64)
    tally = nonfinite.Tally(count)
    tally.record(1, 3, _loop_metrics())  # All finite.
    tally.record(4, 6, _loop_metrics(steps=2.0, first=2, gradients=2.0))  # 5 and 6.
    tally.record(7, 7, _loop_metrics(steps=1.0, first=1, loss=1.0, bn=2.0))
    assert int(count.numpy()) == 3  # Counted on the device at once.
    calls, total = tally.read()
    assert total == 3
    assert [(c.first, c.last, c.steps, c.first_nonfinite) for c in calls] == [
        (4, 6, 2, 5),
        (7, 7, 1, 7),
    ]
    assert [nonfinite.describe(c.flags) for c in calls] == [
        "gradients",
        "loss and BN statistics",
    ]
    assert not calls[0].check("skip")
    with pytest.raises(NonFiniteError, match=r"^step 5: non-finite gradients; stopped"):
        calls[0].check("stop")
    assert tally.read() == ([], 3)  # A read starts afresh; the run's count stays.


def test_tally_merges_calls_beyond_its_capacity():
    tally = nonfinite.Tally(tf.Variable(0, dtype=tf.int64), capacity=1)
    tally.record(1, 1, _loop_metrics(steps=1.0, first=1, loss=1.0))
    tally.record(2, 2, _loop_metrics(steps=1.0, first=1, bn=1.0))
    calls, total = tally.read()
    assert total == 2
    assert [(c.first, c.last, c.steps, c.first_nonfinite) for c in calls] == [
        (1, 2, 2, 1)
    ]
    assert nonfinite.describe(calls[0].flags) == "loss and BN statistics"


def _config(**overrides):
    tiny = {
        "model": "resnet_v1_small",
        "image_size": 32,
        "batch_size": 16,
        "train_examples": 64,
        "val_examples": 16,
        "steps_per_epoch": 10,
        "epochs": 1,
        "log_every": 5,
        "bn_recalibrate_batches": 1,
    }
    return TrainConfig(**{**tiny, **overrides})


@pytest.fixture
def host_reads(monkeypatch):
    """Counts the device-to-host reads of eager tensors (`numpy()`, `float()`...)."""
    reads = []
    read = ops._EagerTensorBase._numpy

    def counted(tensor):
        reads.append(1)
        return read(tensor)

    monkeypatch.setattr(ops._EagerTensorBase, "_numpy", counted)
    return reads


def _epoch_reads(host_reads, steps: int) -> int:
    """Host reads of the second epoch of `steps` steps with no step line inside."""
    run = runner._Run(_config(steps_per_epoch=steps, log_every=1000))
    try:
        run.train_epoch(1)  # Traces everything.
        before = len(host_reads)
        run.train_epoch(2)
        return len(host_reads) - before
    finally:
        run.close()


def test_steps_between_read_points_make_no_host_read(host_reads):
    """`--on_nonfinite=stop`: 8 steps read the device as often as 2 steps do."""
    assert _epoch_reads(host_reads, 8) == _epoch_reads(host_reads, 2)


def _with_nan_batches(run, nan_steps: list[int], steps: int) -> None:
    """The run's next `steps` batches, with a NaN pixel at `nan_steps` (1-based)."""
    batches = [next(run.train_iterator) for _ in range(steps)]
    images = np.stack([b[0].numpy() for b in batches])
    labels = np.stack([b[1].numpy() for b in batches])
    for step in nan_steps:
        images[step - 1, 0, 0, 0, 0] = np.nan
    run.train_iterator = iter(tf.data.Dataset.from_tensor_slices((images, labels)))


@pytest.mark.parametrize("steps_per_loop", [1, 3])
def test_stop_names_the_first_nonfinite_step_between_step_lines(steps_per_loop, capsys):
    """Step 2 is non-finite, the next step line is step 5: the error names step 2.

    With 3 steps per loop, step 2 is not the last of its call (1-3).
    """
    run = runner._Run(_config(steps_per_loop=steps_per_loop))
    try:
        _with_nan_batches(run, [2, 4], steps=10)
        with pytest.raises(
            NonFiniteError,
            match=r"^step 2: non-finite loss and gradients and BN statistics; "
            r"stopped before applying it \(the latest checkpoint",
        ):
            run.train_epoch(1)
        assert "step 5," not in capsys.readouterr().out  # Stopped before the line.
        assert int(run.train_step.optimizer.iterations.numpy()) == 3  # 1, 3, 5.
    finally:
        run.close()


@pytest.mark.parametrize(
    ("steps_per_loop", "where"),
    [(1, ["step 2", "step 4"]), (3, ["1 of steps 1-3", "1 of steps 4-5"])],
)
def test_skip_reports_each_call_as_a_check_after_it_would(
    steps_per_loop, where, caplog
):
    """Steps 2 and 4 are skipped; both are reported at step 5, as they were per call."""
    run = runner._Run(_config(on_nonfinite="skip", steps_per_loop=steps_per_loop))
    try:
        _with_nan_batches(run, [2, 4], steps=10)
        run.train_epoch(1)
        assert int(run.skipped.numpy()) == 2
        assert int(run.train_step.optimizer.iterations.numpy()) == 8
        assert run.global_step == 10
    finally:
        run.close()
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    what = "loss and gradients and BN statistics"
    assert skipped == [
        f"{where[0]} skipped: non-finite {what} (1 skipped so far)",
        f"{where[1]} skipped: non-finite {what} (2 skipped so far)",
    ]
