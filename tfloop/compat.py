"""A `tf.compat.v1` train op that cannot forget the batch-norm updates.

Why this module exists: in TF1 graph code, batch normalization layers do not
update their moving mean and variance as a side effect of the forward pass.
They put the assign ops into the `tf.compat.v1.GraphKeys.UPDATE_OPS`
collection and rely on the training code to run them. A train op made by hand,

    train_op = optimizer.minimize(loss)

never depends on that collection, so `session.run(train_op)` never runs the
updates: the moving statistics stay at their initial values (mean 0,
variance 1), training accuracy looks fine, and inference mode (which uses the
moving statistics) is at chance. TF-Slim's `create_train_op` fixed this by
making the train op depend on `UPDATE_OPS`; `create_train_op` below mirrors
`tf_slim.training.create_train_op` (plus `clip_gradient_norm` from
`slim.learning.create_train_op`) for graph code that runs on TF 2, where
`tf_slim` and `tf.compat.v1.layers` are no longer available.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import tensorflow as tf
from absl import logging

__all__ = ["create_train_op"]

GradsAndVars = list[tuple[Any, Any]]

#: Sentinel for `global_step`: get or create the graph's global step.
_USE_GLOBAL_STEP: Any = object()


def _check_graph_mode(total_loss: Any) -> None:
    """Raise if called eagerly: collections and sessions only exist in graphs."""
    if tf.executing_eagerly():
        raise RuntimeError(
            "`create_train_op` is for tf.compat.v1 graph code: build `total_loss` "
            "inside `with tf.Graph().as_default():`, not in eager mode "
            f"(got `total_loss` of type {type(total_loss).__name__})."
        )


def _resolve_update_ops(update_ops: Iterable[Any] | None) -> list[Any]:
    """Return the update ops to run, warning (as slim does) about missing ones.

    `None` means the whole `UPDATE_OPS` collection. An explicit list is used as
    given (`[]` deliberately runs none); like slim, it only logs a warning when
    it leaves out part of the collection, since that is the classic way to get
    frozen batch-norm statistics.
    """
    collection = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
    if update_ops is None:
        return list(collection)
    update_ops = list(update_ops)
    missing = {id(op) for op in collection} - {id(op) for op in update_ops}
    if missing:
        logging.warning(
            "`update_ops` passed to create_train_op leaves out %d of the %d ops "
            "in GraphKeys.UPDATE_OPS; those (e.g. batch-norm moving averages) "
            "will not run.",
            len(missing),
            len(collection),
        )
    return update_ops


def _resolve_variables(variables_to_train: Sequence[Any] | None) -> list[Any]:
    """Default to all trainable variables; reject non-trainable ones."""
    trainable = tf.compat.v1.trainable_variables()
    if variables_to_train is None:
        variables = list(trainable)
    else:
        variables = list(variables_to_train)
        trainable_refs = {v.ref() for v in trainable}
        for var in variables:
            if not (getattr(var, "trainable", False) or var.ref() in trainable_refs):
                raise ValueError(
                    f"`variables_to_train` contains {var.name}, which is not a "
                    "trainable variable."
                )
    if not variables:
        raise ValueError("`variables_to_train` is empty: there is nothing to train.")
    return variables


def _clip_gradient_norms(grads_and_vars: GradsAndVars, max_norm: float) -> GradsAndVars:
    """Clip each gradient to norm `max_norm` on its own (slim's per-tensor clip)."""
    clipped = []
    for grad, var in grads_and_vars:
        if isinstance(grad, tf.IndexedSlices):
            values = tf.clip_by_norm(grad.values, max_norm)
            grad = tf.IndexedSlices(values, grad.indices, grad.dense_shape)
        elif grad is not None:
            grad = tf.clip_by_norm(grad, max_norm)
        clipped.append((grad, var))
    return clipped


def _add_gradient_summaries(grads_and_vars: GradsAndVars) -> None:
    """Add a histogram and a norm summary per gradient, as slim does."""
    for grad, var in grads_and_vars:
        if grad is None:
            logging.info("Var %s has no gradient", var.op.name)
            continue
        values = grad.values if isinstance(grad, tf.IndexedSlices) else grad
        tf.compat.v1.summary.histogram(var.op.name + "/gradient", values)
        tf.compat.v1.summary.scalar(
            var.op.name + "/gradient_norm", tf.linalg.global_norm([values])
        )


def create_train_op(
    total_loss: tf.Tensor,
    optimizer: tf.compat.v1.train.Optimizer,
    *,
    global_step: Any = _USE_GLOBAL_STEP,
    update_ops: Iterable[Any] | None = None,
    variables_to_train: Sequence[Any] | None = None,
    transform_grads_fn: Callable[[GradsAndVars], GradsAndVars] | None = None,
    clip_gradient_norm: float = 0,
    summarize_gradients: bool = False,
    gate_gradients: int = tf.compat.v1.train.Optimizer.GATE_OP,
    aggregation_method: Any = None,
    colocate_gradients_with_ops: bool = False,
    check_numerics: bool = True,
) -> tf.Tensor:
    """Return a tensor that runs the update ops, applies gradients, gives the loss.

    Mirrors `tf_slim.training.create_train_op` (and `clip_gradient_norm` of
    `slim.learning.create_train_op`) for `tf.compat.v1` graph code.

    Args:
      total_loss: Scalar loss tensor of the current graph.
      optimizer: A `tf.compat.v1.train.Optimizer` (not a Keras optimizer).
      global_step: Variable to increment on each step. By default the graph's
        global step, created if missing; `None` increments nothing.
      update_ops: Ops to run before the loss is computed. `None` (default)
        means the `tf.compat.v1.GraphKeys.UPDATE_OPS` collection, which is
        where batch-norm moving-average updates live. A list that leaves out
        part of the collection is used as given, with a warning (as in slim).
      variables_to_train: Variables to update; default all trainable variables.
      transform_grads_fn: Maps the list of `(gradient, variable)` pairs to a new
        one, e.g. to scale gradients. Runs before `clip_gradient_norm`.
      clip_gradient_norm: If > 0, clip each gradient to this norm separately
        (`tf.clip_by_norm` per tensor, not a global norm), as slim does.
      summarize_gradients: Add histogram and norm summaries per gradient.
      gate_gradients: Passed to `optimizer.compute_gradients`.
      aggregation_method: Passed to `optimizer.compute_gradients`.
      colocate_gradients_with_ops: Passed to `optimizer.compute_gradients`.
      check_numerics: Fail the step if the loss is inf or NaN.

    Returns:
      A tensor whose evaluation runs the update ops, then the gradient update
      (and global-step increment), and returns the value of `total_loss` for
      that step (computed before the variables change). It is also added to the
      `tf.compat.v1.GraphKeys.TRAIN_OP` collection.

    Raises:
      RuntimeError: If called in eager mode.
      TypeError: If `optimizer` is not a `tf.compat.v1.train.Optimizer`.
      ValueError: If `variables_to_train` is empty or not all trainable.
    """
    _check_graph_mode(total_loss)
    if not isinstance(optimizer, tf.compat.v1.train.Optimizer):
        raise TypeError(
            "`optimizer` must be a tf.compat.v1.train.Optimizer, got "
            f"{type(optimizer).__name__}."
        )
    if global_step is _USE_GLOBAL_STEP:
        global_step = tf.compat.v1.train.get_or_create_global_step()

    update_ops = _resolve_update_ops(update_ops)
    if update_ops:
        # The loss (hence its gradients and the train op) waits for the updates.
        with tf.control_dependencies(update_ops):
            barrier = tf.no_op(name="update_barrier")
        with tf.control_dependencies([barrier]):
            total_loss = tf.identity(total_loss)

    grads = optimizer.compute_gradients(
        total_loss,
        _resolve_variables(variables_to_train),
        gate_gradients=gate_gradients,
        aggregation_method=aggregation_method,
        colocate_gradients_with_ops=colocate_gradients_with_ops,
    )
    if transform_grads_fn is not None:
        grads = transform_grads_fn(grads)
    if clip_gradient_norm > 0:
        with tf.name_scope("clip_grads"):
            grads = _clip_gradient_norms(grads, clip_gradient_norm)
    if summarize_gradients:
        with tf.name_scope("summarize_grads"):
            _add_gradient_summaries(grads)
    grad_updates = optimizer.apply_gradients(grads, global_step=global_step)

    with tf.name_scope("train_op"):
        if check_numerics:
            total_loss = tf.debugging.check_numerics(
                total_loss, "LossTensor is inf or nan"
            )
        with tf.control_dependencies([grad_updates]):
            train_op = tf.identity(total_loss)

    tf.compat.v1.add_to_collection(tf.compat.v1.GraphKeys.TRAIN_OP, train_op)
    return train_op
