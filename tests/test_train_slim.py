"""The `tfloop-train` binary with slim's flags, end to end in subprocesses."""

import pathlib
import re
import sys

import binary
import numpy as np
import pytest
import tensorflow as tf
from slim_reference import slim_tensors, tfloop_path, write_slim_checkpoint

import tfloop
from tfloop import runner
from tfloop.config import TrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--image_size=32",
    "--batch_size=8",
    "--train_examples=32",
    "--val_examples=16",
    "--steps_per_epoch=4",
    "--bn_recalibrate_batches=1",
]
STEP = re.compile(r"^step (\d+), loss = \d+\.\d{2}, training_acc = [01]\.\d{4}$")
PRECISION = re.compile(r"^precision @ 1 = [01]\.\d{4} val loss = \d+\.\d{2}$")


def _run(module, *args):
    return binary.run_command(
        [sys.executable, "-m", module, *args], timeout=300, cwd=ROOT
    )


def _restore(model, directory):
    path = tf.train.latest_checkpoint(directory)
    tf.train.Checkpoint(model=model).read(path).expect_partial()


def test_finetune_flagfile_loads_slim_checkpoint_and_resumes_its_own(tmp_path):
    """Logits excluded, only Logits and Mixed_5c train; a rerun resumes instead."""
    imagenet = tfloop.models.get("inception_v1", num_classes=1001)
    tensors = slim_tensors("inception_v1", imagenet, np.random.default_rng(0))
    prefix = write_slim_checkpoint(tmp_path / "inception_v1.ckpt", tensors)
    model_dir = tmp_path / "run"
    flags = [
        "--flagfile=flags/finetune_inception_v1.flags",
        f"--checkpoint_path={prefix}",
        f"--model_dir={model_dir}",
        *TINY,
        "--steps_per_epoch=2",
        "--epochs=1",
        "--log_every_n_steps=1",
    ]
    first = _run("tfloop.train", *flags)
    assert "Fine-tuning from" in first.stderr
    steps = [int(m[1]) for m in map(STEP.match, first.stdout.splitlines()) if m]
    assert steps == [1, 2]
    model = tfloop.models.get("inception_v1", num_classes=4)
    _restore(model, model_dir / "checkpoints")
    trained = ("InceptionV1/Mixed_5c/", "InceptionV1/Logits/")
    for v in model.weights:
        name = next((n for n in tensors if tfloop_path(n) == v.path), None)
        if name is None or name.startswith(trained):
            continue
        np.testing.assert_array_equal(v.numpy(), tensors[name], err_msg=name)
    mixed_5c = "InceptionV1/Mixed_5c/Branch_0/Conv2d_0a_1x1/weights"
    kernel = model.get_layer("Mixed_5c_Branch_0_Conv2d_0a_1x1").kernel.numpy()
    assert not np.array_equal(kernel, tensors[mixed_5c])
    # The model dir has a checkpoint now: a bad --checkpoint_path is not read.
    again = _run(
        "tfloop.train", *flags[:1], "--checkpoint_path=/nonexistent", *flags[2:]
    )
    assert "Restored" in again.stderr and "Fine-tuning from" not in again.stderr


def _learning_rates(summaries):
    rates = {}
    for path in tf.io.gfile.glob(f"{summaries}/events.*"):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "learning_rate":
                    rates[event.step] = float(tf.make_ndarray(value.tensor))
    return rates


def test_slim_knobs_schedule_max_steps_and_averaged_export(tmp_path):
    model_dir = tmp_path / "run"
    flags = [
        "--model=resnet_v1_small",
        *TINY,
        f"--model_dir={model_dir}",
        "--epochs=3",
        "--max_number_of_steps=6",
        "--log_every_n_steps=1",
        "--optimizer=momentum",
        "--momentum=0.5",
        "--learning_rate=0.1",
        "--learning_rate_decay_type=exponential",
        "--learning_rate_decay_factor=0.5",
        "--num_epochs_per_decay=0.5",
        "--warmup_epochs=0.5",
        "--label_smoothing=0.1",
        "--weight_decay=0.001",
        "--moving_average_decay=0.9",
    ]
    result = _run("tfloop.train", *flags)
    lines = result.stdout.splitlines()
    assert [int(m[1]) for m in map(STEP.match, lines) if m] == [1, 2, 3, 4, 5, 6]
    assert lines.count("Validation Step") == 2  # Stopped in epoch 2 of 3.
    # slim: 0.1 * 0.5 ** floor(step / decay_steps), decay_steps = int(4 * 0.5);
    # warm-up over ceil(0.5 * 4) steps.
    expected = {s: 0.1 * 0.5 ** (s // 2) * min(1.0, (s + 1) / 2) for s in range(6)}
    rates = _learning_rates(model_dir / "summaries")
    assert rates.keys() == expected.keys()
    for step, rate in expected.items():
        assert rates[step] == pytest.approx(rate, rel=1e-6)
    # The averaged model (recalibrated BN) was exported after validation:
    # evaluating the export prints the last validation line again.
    evaluated = _run(
        "tfloop.eval",
        "--model=resnet_v1_small",
        *TINY,
        f"--model_dir={model_dir}",
        "--moving_average_decay=0.9",
    )
    last = [line for line in lines if PRECISION.match(line)][-1]
    assert [
        line for line in evaluated.stdout.splitlines() if PRECISION.match(line)
    ] == [last]
    raw = tfloop.models.get("resnet_v1_small", num_classes=4)
    averaged = tfloop.models.get("resnet_v1_small", num_classes=4)
    _restore(raw, model_dir / "checkpoints")
    _restore(averaged, model_dir / "averaged")
    assert not np.array_equal(raw.weights[0].numpy(), averaged.weights[0].numpy())


def test_run_wires_weight_decay_and_label_smoothing():
    """In process: the run's model and loss carry the slim knobs' values."""
    config = TrainConfig(
        model="resnet_v1_small",
        batch_size=8,
        train_examples=16,
        val_examples=8,
        steps_per_epoch=1,
        weight_decay=0.01,
        label_smoothing=0.2,
    )
    run = runner._Run(config)
    try:
        model = run.model
        # slim's l2_regularizer: weight_decay * sum(w ** 2) / 2 per conv kernel.
        kernels = [v.numpy() for v in model.weights if v.path.endswith("/kernel")]
        expected = (
            0.01 * sum(float(np.sum(k.astype(np.float64) ** 2)) for k in kernels) / 2
        )
        assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-5)
        logits = np.array([[2.0, 0.0, -1.0, 0.5]], np.float32)
        target = np.array([1 - 0.2 + 0.05, 0.05, 0.05, 0.05])
        log_softmax = logits[0] - np.log(np.sum(np.exp(logits[0])))
        loss = run.train_step.loss_fn(np.array([0]), logits)
        assert float(loss[0]) == pytest.approx(-np.sum(target * log_softmax), rel=1e-5)
    finally:
        run.close()
