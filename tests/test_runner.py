"""The training run of the binary: steps per loop, dtype policies."""

import dataclasses
import logging
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfloop
from tfloop import checks, errors, runner
from tfloop.config import TrainConfig

TINY = TrainConfig(
    model="resnet_v1_small",
    image_size=32,
    batch_size=16,
    train_examples=128,
    val_examples=32,
    steps_per_epoch=5,
    epochs=2,
    log_every=2,
    bn_recalibrate_batches=2,
    steps_per_loop=1,
)


@pytest.mark.parametrize(
    ("first", "last", "steps_per_loop", "log_every", "save_every"),
    [
        (1, 10, 1, 3, 0),
        (1, 10, 4, 3, 0),
        (6, 13, 100, 4, 0),
        (3, 3, 8, 50, 0),
        (1, 128, 16, 50, 0),
        (1, 40, 16, 50, 7),
    ],
)
def test_loops_cover_every_step_once_and_end_at_log_and_save_points(
    first, last, steps_per_loop, log_every, save_every
):
    loops = runner._loops(
        first, last, steps_per_loop=steps_per_loop, boundaries=(log_every, save_every)
    )
    steps = [step for a, b in loops for step in range(a, b + 1)]
    assert steps == list(range(first, last + 1))
    assert all(1 <= b - a + 1 <= steps_per_loop for a, b in loops)
    ends = {b for _, b in loops}
    # Every log (and checkpoint) point ends a loop, and a loop ends only at
    # such a point, at the last step, or when it is full.
    points = {s for s in steps if s % log_every == 0}
    if save_every:
        points |= {s for s in steps if s % save_every == 0}
    assert points <= ends
    for a, b in loops:
        assert b in points or b == last or b - a + 1 == steps_per_loop


def _fixed_lines(capsys, config):
    capsys.readouterr()
    results = runner.train(config)
    return capsys.readouterr().out.splitlines(), results


def test_steps_per_loop_prints_the_same_lines_and_numbers(capsys):
    one, results_one = _fixed_lines(capsys, TINY)
    looped, results_looped = _fixed_lines(
        capsys, TrainConfig(**{**TINY.__dict__, "steps_per_loop": 3})
    )
    # Loops of 3 steps (bit-identical to single steps) print every line,
    # numbers included, exactly as single steps do.
    assert one == looped
    assert [line.split(",")[0] for line in one if line.startswith("step ")] == [
        "step 2",
        "step 4",
        "step 6",
        "step 8",
        "step 10",
    ]
    assert results_one == results_looped


def test_mixed_precision_builds_the_model_under_its_policy_only(capsys):
    config = TrainConfig(
        **{**TINY.__dict__, "epochs": 1, "mixed_precision": "mixed_bfloat16"}
    )
    run = runner._Run(config)
    try:
        assert run.model.dtype_policy.name == "mixed_bfloat16"
        assert keras.mixed_precision.global_policy().name == "float32"
        mixed = runner._Run(
            TrainConfig(**{**TINY.__dict__, "mixed_precision": "mixed_float16"})
        )
        assert isinstance(
            mixed.train_step.optimizer, keras.optimizers.LossScaleOptimizer
        )
        mixed.close()
    finally:
        run.close()


def _keras_loss_and_top1(model, batches):
    """Mean cross-entropy and top-1 over `batches`, with Keras and numpy alone."""
    losses, hits = [], []
    for images, labels in batches:
        logits = model(images, training=False)
        losses.append(
            keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True
            ).numpy()
        )
        hits.append(np.argmax(logits.numpy(), -1) == labels.numpy())
    return np.concatenate(losses).mean(), np.concatenate(hits).mean()


def test_stale_check_uses_the_first_batches_and_validation_all(capsys):
    # 4 validation batches of 16; the moving averages are checked on 1.
    config = TrainConfig(
        **{**TINY.__dict__, "val_examples": 64, "bn_stale_check_batches": 1}
    )
    run = runner._Run(config)
    try:
        run.train_epoch(1)
        last = tfloop.bn.layers(run.model)[-1]  # Made surely stale:
        last.moving_mean.assign(last.moving_mean + 3.0)
        last.moving_variance.assign(last.moving_variance * 0.01)
        batches = list(run.val_data)
        assert len(batches) == 4
        moving = _keras_loss_and_top1(run.model, batches[:1])
        capsys.readouterr()
        result = run.validate(epoch=0)
        out = capsys.readouterr().out
        recalibrated_head = _keras_loss_and_top1(run.model, batches[:1])
        recalibrated = _keras_loss_and_top1(run.model, batches)
    finally:
        run.close()
    np.testing.assert_allclose(
        (result.moving_loss, result.moving_top1), moving, rtol=1e-5
    )
    np.testing.assert_allclose((result.loss, result.top1), recalibrated, rtol=1e-5)
    assert (
        f"BN statistics were stale: val loss {moving[0]:.2f} with moving averages, "
        f"{recalibrated_head[0]:.2f} after recalibration"
    ) in out


def _worker(index: int, count: int):
    """A stand-in strategy of worker `index` of a `count`-worker cluster."""
    spec = tf.train.ClusterSpec({"worker": [f"127.0.0.1:{i}" for i in range(count)]})
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        spec, task_type="worker", task_id=index
    )
    return types.SimpleNamespace(cluster_resolver=resolver)


@pytest.mark.parametrize(
    ("files", "why"),
    [
        (0, "it is generated, not read from files"),
        (1, "1 file(s) for 2 workers (file sharding needs one each)"),
    ],
)
def test_too_few_files_are_not_sharded_and_one_line_says_why(
    files, why, tmp_path, caplog
):
    for index in range(files):
        (tmp_path / f"train-{index:05d}-of-{files:05d}").write_bytes(b"")
    config = dataclasses.replace(
        TINY,
        dataset="tfrecord" if files else "shapes",
        data_dir=str(tmp_path),
    )
    with caplog.at_level(logging.INFO):
        assert runner._file_shard(config, _worker(1, 2)) is None
    lines = [
        r.getMessage() for r in caplog.records if "share of each" in r.getMessage()
    ]
    assert len(lines) == 1 and why in lines[0], lines


def test_one_file_per_worker_is_sharded_silently(tmp_path, caplog):
    for index in range(3):
        (tmp_path / f"train-{index:05d}-of-00003").write_bytes(b"")
    config = dataclasses.replace(TINY, dataset="tfrecord", data_dir=str(tmp_path))
    with caplog.at_level(logging.INFO):
        assert runner._file_shard(config, _worker(2, 3)) == (2, 3)
    assert not [r for r in caplog.records if "share of each" in r.getMessage()]
    assert runner._file_shard(config, _worker(0, 1)) is None  # One worker.


def test_a_worker_whose_files_hold_less_than_its_batch_is_refused():
    checks.check_worker_files(8, [4, 4])
    with pytest.raises(
        errors.InputError,
        match=r"^worker 1's training files hold 3 examples, fewer than its batch "
        r"of 4 \(`--batch_size`=8 over 2 workers\)",
    ):
        checks.check_worker_files(8, [5, 3])
