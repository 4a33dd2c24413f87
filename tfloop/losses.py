"""The classification loss of slim's `train_image_classifier.py`, label smoothing included.

Slim's loss was `tf.losses.softmax_cross_entropy(onehot_labels, logits,
label_smoothing=s)`, which trains against `onehot * (1 - s) + s / num_classes`.
Keras' `CategoricalCrossentropy(label_smoothing=s)` smooths the same way; this
module feeds it the dataset's integer labels, one-hot encoded, and returns
per-example losses as tfloop's steps expect.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

__all__ = ["classification_loss"]


def classification_loss(
    num_classes: int, *, label_smoothing: float = 0.0
) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """`loss(labels, logits)`: per-example softmax cross-entropy on integer labels.

    Args:
      num_classes: the number of logits (the one-hot depth).
      label_smoothing: slim's `--label_smoothing`, in [0, 1); 0 is the plain
        sparse cross-entropy.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(
            f"`label_smoothing` must be in [0, 1), got {label_smoothing!r}."
        )
    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None
        )
    smoothed = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=label_smoothing, reduction=None
    )

    def loss(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
        onehot = tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=logits.dtype)
        return smoothed(onehot, logits)

    return loss
