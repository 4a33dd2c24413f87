"""`tfloop.eval`: a checkpoint's numbers against numpy on the model's logits."""

import sys

import binary
import numpy as np
import pytest
import tensorflow as tf
from slim_reference import slim_tensors, write_slim_checkpoint

import tfloop
from tfloop import data
from tfloop import eval as tfloop_eval
from tfloop.config import TrainConfig

CONFIG = {
    "model": "resnet_v1_small",
    "image_size": 32,
    "batch_size": 16,
    "val_examples": 40,  # Two full batches and a partial one.
    "seed": 3,
}


def _numpy_metrics(model, config, max_batches=None):
    """Loss, top-1 and top-5 of `model` on the validation split, in float64."""
    dataset, _ = data.load(
        "shapes",
        split="validation",
        data_dir=None,
        image_size=config.image_size,
        batch_size=config.batch_size,
        seed=config.seed,
        num_examples=config.val_examples,
    )
    logits, labels = [], []
    for images, y in dataset.take(max_batches or -1):
        logits.append(model(images, training=False).numpy().astype(np.float64))
        labels.append(y.numpy())
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rank = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(axis=1)
    return {
        "loss": -log_softmax[np.arange(len(labels)), labels].mean(),
        "top1": (rank < 1).mean(),
        "recall_5": (rank < 5).mean(),
    }


def test_own_checkpoint_with_recall_at_5(tmp_path, capsys):
    model = tfloop.models.get("resnet_v1_small", num_classes=8, image_size=32)
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(model=model), tmp_path / "checkpoints", max_to_keep=1
    )
    manager.save(checkpoint_number=7)
    config = TrainConfig(num_classes=8, model_dir=str(tmp_path), **CONFIG)
    result = tfloop_eval.evaluate_checkpoint(config)
    expected = _numpy_metrics(model, config)
    for key in ("loss", "top1", "recall_5"):
        assert result[key] == pytest.approx(expected[key], rel=1e-5), key
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"precision @ 1 = {expected['top1']:.4f} val loss = {expected['loss']:.2f}",
        f"recall @ 5 = {expected['recall_5']:.4f}",
    ]


def test_slim_checkpoint_without_recall_for_4_classes(tmp_path, capsys):
    model = tfloop.models.get("resnet_v1_small", num_classes=4, image_size=32)
    tensors = slim_tensors("resnet_v1_small", model, np.random.default_rng(0))
    prefix = write_slim_checkpoint(tmp_path / "model.ckpt-10", tensors)
    tfloop.models.load_slim_checkpoint(model, prefix)
    config = TrainConfig(checkpoint_path=str(tmp_path), **CONFIG)  # A directory.
    result = tfloop_eval.evaluate_checkpoint(config, max_num_batches=2)
    expected = _numpy_metrics(model, config, max_batches=2)
    for key in ("loss", "top1"):
        assert result[key] == pytest.approx(expected[key], rel=1e-5), key
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("precision @ 1 = ")


def test_missing_or_mismatched_checkpoint_is_named(tmp_path):
    with pytest.raises(ValueError, match="needs --checkpoint_path or --model_dir"):
        tfloop_eval.evaluate_checkpoint(TrainConfig(**CONFIG))
    with pytest.raises(ValueError, match="No checkpoint in"):
        tfloop_eval.evaluate_checkpoint(TrainConfig(model_dir=str(tmp_path), **CONFIG))
    model = tfloop.models.get("resnet_v1_small", num_classes=4)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    config = TrainConfig(num_classes=6, checkpoint_path=path, **CONFIG)
    with pytest.raises(
        ValueError, match="does not fit `resnet_v1_small` with 6 classes"
    ):
        tfloop_eval.evaluate_checkpoint(config)


def test_train_binary_mode_eval_prints_the_same_line(tmp_path):
    """`tfloop-train --mode=eval` is the same evaluation as `tfloop-eval`."""
    model = tfloop.models.get("resnet_v1_small", num_classes=4, image_size=32)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    expected = _numpy_metrics(model, TrainConfig(**CONFIG))
    flags = [f"--{key}={value}" for key, value in CONFIG.items()]
    result = binary.run_command(
        [sys.executable, "-m", "tfloop.train", "--mode=eval", *flags]
        + [f"--checkpoint_path={path}"],
        timeout=300,
    )
    assert result.stdout.splitlines() == [
        f"precision @ 1 = {expected['top1']:.4f} val loss = {expected['loss']:.2f}"
    ]
