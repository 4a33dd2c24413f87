"""One batch in a step: elements, label layouts, per-example losses, top-1.

Shared by the train and eval steps, so both read elements, labels and
sample weights the same way and refuse the same mistakes.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def _correct_and_count(
    labels: tf.Tensor, logits: tf.Tensor, sample_weight: tf.Tensor | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """Top-1 hits and example count (both weighted by `sample_weight`, if any).

    Labels may be sparse ids of shape `(B,)` or `(B, 1)`, or one-hot `(B, C)`.
    """
    labels = _sparse_labels(labels, logits)
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int64)
    hits = tf.cast(tf.equal(predictions, tf.cast(labels, tf.int64)), tf.float32)
    if sample_weight is None:
        return tf.reduce_sum(hits), tf.cast(tf.size(hits), tf.float32)
    weights = tf.reshape(tf.cast(sample_weight, tf.float32), tf.shape(hits))
    return tf.reduce_sum(hits * weights), tf.reduce_sum(weights)


def _sparse_labels(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Class ids from sparse `(B,)` / `(B, 1)` or one-hot `(B, C)` labels."""
    classes = logits.shape[-1]
    if labels.shape.rank == logits.shape.rank:
        if labels.shape[-1] == 1 and classes != 1:
            return tf.squeeze(labels, -1)
        if labels.shape[-1] != classes:
            raise ValueError(
                f"`labels` of shape {labels.shape} match neither sparse ids "
                f"(batch,) / (batch, 1) nor one-hot (batch, {classes}) for "
                f"logits of shape {logits.shape}."
            )
        return tf.argmax(labels, axis=-1)
    if labels.shape.rank != logits.shape.rank - 1:
        raise ValueError(
            f"`labels` of shape {labels.shape} do not fit logits of shape "
            f"{logits.shape}: expected sparse ids (batch,) or one-hot labels."
        )
    return labels


def _split(element) -> tuple[tf.Tensor, ...]:
    """`(images, labels)` or `(images, labels, sample_weight)`, as tensors."""
    if not isinstance(element, (tuple, list)) or len(element) not in (2, 3):
        raise ValueError(
            "A dataset element must be `(images, labels)` or "
            f"`(images, labels, sample_weight)`, got {type(element).__name__}."
        )
    return tuple(element)


def _as_tensors(*values):
    """Tensors from numpy inputs too (eager debugging: `run_functions_eagerly`)."""
    return tf.nest.map_structure(
        lambda v: None if v is None else tf.convert_to_tensor(v), values
    )


def _per_example(
    loss_fn: LossFn, labels, logits, sample_weight: tf.Tensor | None = None
) -> tf.Tensor:
    """`loss_fn`'s per-example losses in float32, times `sample_weight` if given.

    The label layout is checked first, so that a mismatch is named here
    rather than deep inside the loss.
    """
    _sparse_labels(labels, logits)
    per_example = loss_fn(labels, tf.cast(logits, tf.float32))
    batch = logits.shape[:1]
    if per_example.shape.rank == 0 or not per_example.shape[:1].is_compatible_with(
        batch
    ):
        raise ValueError(
            f"`loss_fn` must return per-example losses of shape {batch}, got "
            f"shape {per_example.shape}; build Keras losses with `reduction=None`."
        )
    per_example = tf.cast(per_example, tf.float32)
    if sample_weight is None:
        return per_example
    weights = tf.cast(sample_weight, tf.float32)
    shape = tf.concat([[-1], tf.ones([per_example.shape.rank - 1], tf.int32)], 0)
    return per_example * tf.reshape(weights, shape)
