"""Label smoothing against slim's formula (softmax_cross_entropy), in float64."""

import numpy as np
import pytest

from tfloop import losses


def _numpy_loss(labels, logits, num_classes, smoothing):
    onehot = np.eye(num_classes)[labels]
    target = onehot * (1 - smoothing) + smoothing / num_classes
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -(target * log_softmax).sum(axis=1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.4])
def test_per_example_loss_is_slims(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 5)).astype(np.float32)
    labels = np.array([0, 4, 2, 2, 1, 3])
    loss = losses.classification_loss(5, label_smoothing=smoothing)(labels, logits)
    expected = _numpy_loss(labels, logits.astype(np.float64), 5, smoothing)
    assert loss.shape == (6,)
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5)


def test_smoothing_out_of_range_is_named():
    with pytest.raises(
        ValueError, match=r"`label_smoothing` must be in \[0, 1\), got 1.0"
    ):
        losses.classification_loss(4, label_smoothing=1.0)
