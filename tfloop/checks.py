"""Checks of what users hand tfloop: arguments of the steps, and the binary's inputs.

Why this module exists: a wrong shape or a bad flag that TensorFlow only
notices deep inside a traced step ends in a dozen frames of traceback, or
worse, in a wrong number with no error (a `loss_fn` that already averages
over the batch is averaged again; logits with the wrong number of classes
broadcast). Each check here fails early with one sentence naming the
offending value and what was expected: `ValueError` for the public API,
`tfloop.errors.InputError` (printed as one line by `tfloop-train`) for the
binary's flags, files and environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator

import tensorflow as tf

from tfloop.errors import InputError

# --------------------------------------------------------------------------
# Arguments of the steps (at trace time, on static shapes).


def check_logits(logits: tf.Tensor, labels: tf.Tensor) -> None:
    """Fails unless `labels` are class ids [B] or one-hot [B, C] for `logits` [B, C]."""
    logits_shape, labels_shape = logits.shape, labels.shape
    if labels_shape.rank == logits_shape.rank:
        classes, label_classes = logits_shape[-1], labels_shape[-1]
        if None not in (classes, label_classes) and classes != label_classes:
            raise ValueError(
                f"one-hot `labels` have {label_classes} classes but the model's "
                f"logits have {classes} (last dimension); expected the same number."
            )
    elif labels_shape.rank != logits_shape.rank - 1:
        raise ValueError(
            f"expected `labels` of shape {logits_shape[:-1]} (class ids) or "
            f"{logits_shape} (one-hot) for logits of shape {logits_shape}, got "
            f"labels of shape {labels_shape}."
        )


def check_per_example(per_example: tf.Tensor, logits: tf.Tensor) -> None:
    """Fails unless `loss_fn` returned one loss per example."""
    batch = logits.shape[:1]
    if per_example.shape.rank == 0 or not per_example.shape[:1].is_compatible_with(
        batch
    ):
        raise ValueError(
            f"`loss_fn` must return per-example losses of shape {batch}, got shape "
            f"{per_example.shape}; build Keras losses with `reduction=None`."
        )
