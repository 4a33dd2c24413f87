"""TensorBoard summaries: read back from the event files."""

import collections
import re

import binary
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

import tfloop
from tfloop import summaries
from tfloop.bn import Staleness


def _events(logdir):
    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={"tensors": 0}
    )
    accumulator.Reload()
    values = collections.defaultdict(list)
    for tag in accumulator.Tags()["tensors"]:
        for event in accumulator.Tensors(tag):
            values[tag].append((event.step, tf.make_ndarray(event.tensor_proto)))
    return values


def test_bn_health_histograms_and_worst_layer(tmp_path):
    rng = np.random.default_rng(0)
    shifts, ratios = rng.uniform(0, 3, 7), rng.uniform(0, 2, 7)
    report = [
        Staleness(f"model/bn_{i}", float(s), float(r), 0.0)
        for i, (s, r) in enumerate(zip(shifts, ratios))
    ]
    with tf.summary.create_file_writer(str(tmp_path)).as_default(step=5):
        summaries.bn_health(report)
    values = _events(tmp_path)
    np.testing.assert_allclose(values["bn_health/worst_mean_shift"][0][1], shifts.max())
    np.testing.assert_allclose(
        values["bn_health/worst_log_variance_ratio"][0][1], ratios.max()
    )
    assert (
        values["bn_health/worst_layer"][0][1] == f"model/bn_{shifts.argmax()}".encode()
    )
    # Histogram buckets: (left, right, count); all 7 layers counted.
    buckets = values["bn_health/mean_shift"][0][1]
    assert buckets[:, 2].sum() == 7
    assert buckets[0, 0] == pytest.approx(shifts.min())
    assert buckets[-1, 1] == pytest.approx(shifts.max())


def test_binary_writes_every_curve(tmp_path):
    model_dir = tmp_path / "run"
    result = binary.run(epochs=2, model_dir=model_dir)
    assert "\x1b" not in result.stdout and "━" not in result.stdout  # No bar.
    values = _events(model_dir / "summaries")
    printed = re.findall(r"precision @ 1 = (\S+) val loss = (\S+)", result.stdout)
    assert len(printed) == 3
    # The recalibrated curves are what the binary printed.
    assert [step for step, _ in values["validation/top1"]] == [0, 4, 8]
    for (_, top1), (_, loss), (text_top1, text_loss) in zip(
        values["validation/top1"], values["validation/loss"], printed
    ):
        assert f"{float(top1):.4f}" == text_top1 and f"{float(loss):.2f}" == text_loss
    assert len(values["validation/moving_loss"]) == 3
    assert len(values["validation/moving_top1"]) == 3
    # One gradient norm, loss and learning rate per step; top-1 and images/s per
    # logged step.
    for tag in ("global_norm/gradient_norm", "loss", "learning_rate"):
        assert [step for step, _ in values[tag]] == list(range(8)), tag
    assert all(float(norm) > 0 for _, norm in values["global_norm/gradient_norm"])
    assert [step for step, _ in values["train/top1"]] == [2, 4, 6, 8]
    assert all(float(v) > 0 for _, v in values["train/images_per_second"])
    # BN health once per validation, over every BN layer of the model.
    layers = len(tfloop.bn.layers(binary.tiny_bn_cnn(4, image_size=32)))
    for _, buckets in values["bn_health/mean_shift"]:
        assert buckets[:, 2].sum() == layers
    assert len(values["bn_health/worst_log_variance_ratio"]) == 3
    assert (model_dir / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
