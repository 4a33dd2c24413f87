"""`optimize_loss(summaries=...)`: tags, values and dashboards of the step's summaries."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from optimize_reference import (
    B0,
    LR,
    W0,
    _batches,
    _clip_global,
    _global_norm,
    _grads,
    _loss,
    _model,
    _numpy_loss,
    _plugins,
    _read_events,
    _train,
)

from tfloop import optimize


def test_summaries_are_written_with_the_right_tags_and_values(tmp_path):
    batches = _batches(steps=2)
    model = _model()
    kernel_path = model.layers[0].kernel.path
    step = optimize.optimize_loss(
        model,
        _loss,
        learning_rate=LR,
        optimizer="SGD",
        clip_gradients=0.5,
        summaries=optimize.OPTIMIZER_SUMMARIES,
    )
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        _train(step, batches)
    writer.flush()
    events = _read_events(tmp_path)
    assert set(events) == {
        "loss",
        "learning_rate",
        "global_norm/gradient_norm",
        "global_norm/clipped_gradient_norm",
        f"gradient_norm/{kernel_path}",
        f"gradient_norm/{model.layers[0].bias.path}",
        f"gradients/{kernel_path}",
        f"gradients/{model.layers[0].bias.path}",
    }
    assert _plugins(tmp_path) == {
        tag: {"histograms" if tag.startswith("gradients/") else "scalars"}
        for tag in events
    }
    params = [W0.copy(), B0.copy()]
    for t, (x, y) in enumerate(batches):
        grads = _grads(*params, x, y)
        clipped = _clip_global(grads, 0.5)
        np.testing.assert_allclose(
            events["loss"][t], _numpy_loss(*params, x, y), rtol=1e-5
        )
        np.testing.assert_allclose(events["learning_rate"][t], LR, rtol=1e-6)
        np.testing.assert_allclose(
            events["global_norm/gradient_norm"][t], _global_norm(grads), rtol=1e-5
        )
        np.testing.assert_allclose(
            events["global_norm/clipped_gradient_norm"][t], 0.5, rtol=1e-5
        )
        np.testing.assert_allclose(
            events[f"gradient_norm/{kernel_path}"][t],
            np.linalg.norm(clipped[0]),
            rtol=1e-5,
        )
        # tf.summary.histogram's tensor: 30 rows of (left edge, right edge,
        # count), spanning [min, max] of the (clipped) gradient's entries.
        histogram = events[f"gradients/{kernel_path}"][t]
        assert histogram.shape == (30, 3)
        assert histogram[:, 2].sum() == clipped[0].size
        np.testing.assert_allclose(
            [histogram[0, 0], histogram[-1, 1]],
            [clipped[0].min(), clipped[0].max()],
            rtol=1e-5,
        )
        counts, edges = np.histogram(clipped[0], bins=30)
        np.testing.assert_array_equal(histogram[:, 2], counts)
        np.testing.assert_allclose(histogram[:, 0], edges[:-1], rtol=1e-5, atol=1e-7)
        params = [p - LR * g for p, g in zip(params, clipped)]


def test_no_summaries_without_a_writer_or_request(tmp_path):
    step = optimize.optimize_loss(_model(), _loss, learning_rate=LR, optimizer="SGD")
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        _train(step, _batches(steps=1))
    writer.flush()
    assert _read_events(tmp_path) == {}
