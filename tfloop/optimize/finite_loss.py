"""`check_numerics` on the loss: refuse a non-finite loss before any weight update.

Why this module exists: slim's `create_train_op(check_numerics=True)` put a
`check_numerics` op on the loss, which in TF1 graphs ran before the train op.
In a `tf.function` a plain check is not ordered before the optimizer's
writes, so the check here gates the backward pass itself. (`tfloop.nonfinite`
is the other policy: skip or stop without raising inside the step.)
"""

from __future__ import annotations

import functools

import tensorflow as tf

from tfloop import steps

_LOSS_MESSAGE = "tfloop.optimize_loss: the loss is inf or nan"


@tf.custom_gradient
def _finite_loss(per_example: tf.Tensor):
    """Identity that raises on a non-finite loss *before* any weight update.

    A plain `check_numerics` is not ordered before the optimizer's writes in a
    `tf.function`; here the backward pass, hence every gradient, waits for it.
    """
    checked = tf.debugging.check_numerics(per_example, _LOSS_MESSAGE)

    def grad(upstream):
        with tf.control_dependencies([checked]):
            return tf.identity(upstream)

    return checked, grad


def _checked_loss_fn(loss_fn: steps.LossFn) -> steps.LossFn:
    @functools.wraps(loss_fn)
    def checked_loss_fn(labels, logits):
        return _finite_loss(loss_fn(labels, logits))

    return checked_loss_fn
