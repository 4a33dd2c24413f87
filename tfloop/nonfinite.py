"""Non-finite losses, gradients and BN statistics: stop the run, or skip the step.

Why this module exists: one NaN in a step poisons every weight, optimizer slot
and BN moving statistic it reaches, and every checkpoint written after it (a
learning rate of 1e6 used to write a checkpoint full of NaN BN statistics and
exit 0). A train step built with `on_nonfinite` therefore decides, from a
finiteness flag all-reduced over the replicas (every replica takes the same
decision), whether to apply its updates at all: a skipped step changes no
weight, optimizer slot, optimizer `iterations` or BN statistic. The step
reports what was non-finite (`nonfinite_loss`, `nonfinite_gradients`,
`nonfinite_bn`: replicas that saw it); `check_step` turns that into a
`NonFiniteError` (`stop`) or a count (`skip`).

The optimizer update runs under `tf.cond` in cross-replica context, the way
Keras' `LossScaleOptimizer` skips its non-finite steps: a `cond` in replica
context cannot contain the optimizer's `merge_call`. The BN statistics update
takes the flag itself (`tfloop.bn.averaging._apply_updates(finite=...)`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import keras
import tensorflow as tf

from tfloop.errors import NonFiniteError

MODES = ("stop", "skip")
"""`on_nonfinite` values: `stop` ends the run at the first non-finite step
(which is not applied), `skip` leaves such steps out and counts them."""

# What the step's flags name, in their order.
_KINDS = (
    ("nonfinite_loss", "loss"),
    ("nonfinite_gradients", "gradients"),
    ("nonfinite_bn", "BN statistics"),
)
KEYS = tuple(key for key, _ in _KINDS)


def _any_nonfinite(tensors: Iterable) -> tf.Tensor:
    """1.0 if any of `tensors` holds a NaN or Inf, else 0.0 (float32 scalar)."""
    checks = [
        tf.reduce_all(tf.math.is_finite(getattr(t, "values", t)))
        for t in tensors
        if t is not None
    ]
    if not checks:
        return tf.constant(0.0)
    return 1.0 - tf.cast(tf.reduce_all(tf.stack(checks)), tf.float32)


def step_flags(
    loss: tf.Tensor, gradients: Sequence, moments: Iterable[tf.Tensor]
) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
    """This replica's flags, and whether the step is finite on every replica.

    Runs in replica context; one all-reduce of three numbers per step.
    """
    local = tf.stack(
        [_any_nonfinite([loss]), _any_nonfinite(gradients), _any_nonfinite(moments)]
    )
    context = tf.distribute.get_replica_context()
    total = local
    if context is not None and context.num_replicas_in_sync > 1:
        total = context.all_reduce(tf.distribute.ReduceOp.SUM, local)
    flags = dict(zip(KEYS, tf.unstack(local)))
    return flags, tf.equal(tf.reduce_sum(total), 0.0)


def apply_if(
    finite: tf.Tensor | None,
    optimizer: keras.optimizers.Optimizer,
    grads_and_vars: Sequence[tuple],
) -> None:
    """`optimizer.apply_gradients(grads_and_vars)` only when `finite` (or None).

    Keras' `LossScaleOptimizer._tf_apply` pattern: a strategy that needs
    `merge_call` gets the `cond` in cross-replica context, with the update
    run on every replica inside its true branch.
    """
    grads_and_vars = list(grads_and_vars)
    if finite is None:
        optimizer.apply_gradients(grads_and_vars)
    elif tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(finite, lambda: _apply(optimizer, grads_and_vars), _nothing)
    else:
        tf.distribute.get_replica_context().merge_call(
            functools.partial(_cross_replica_cond, optimizer=optimizer),
            args=(finite, grads_and_vars),
        )


def _apply(optimizer: keras.optimizers.Optimizer, pairs) -> None:
    optimizer.apply_gradients(pairs)


def _nothing() -> None:
    """The branch of a skipped step."""


def _cross_replica_cond(strategy, finite, pairs, *, optimizer) -> None:
    """In cross-replica context: the update on every replica if `finite`."""
    first = strategy.experimental_local_results(finite)[0]
    tf.cond(
        first,
        lambda: strategy.extended.call_for_each_replica(
            functools.partial(_apply, optimizer), args=(pairs,)
        ),
        _nothing,
    )


def describe(metrics: dict) -> str:
    """What was non-finite in a step's metrics, e.g. `loss and gradients`."""
    kinds = [kind for key, kind in _KINDS if float(metrics.get(key, 0.0)) > 0]
    return " and ".join(kinds)


def check_step(step: int, metrics: dict, *, mode: str) -> bool:
    """Host side, after a step: False if it was skipped; raises in `stop` mode."""
    what = describe(metrics)
    if not what:
        return True
    if mode == "stop":
        raise NonFiniteError(
            f"step {step}: non-finite {what}; stopped before applying it "
            "(the latest checkpoint is the last good one; lower --learning_rate "
            "or use --on_nonfinite=skip)"
        )
    return False


def nonfinite_variables(variables: Iterable) -> list[str]:
    """Names of the floating-point `variables` that hold a NaN or Inf.

    One host sync for all of them (a checkpoint guards about a thousand).
    """
    floats = [v for v in variables if tf.as_dtype(v.dtype).is_floating]
    if not floats:
        return []
    finite = tf.stack(
        [tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v))) for v in floats]
    ).numpy()
    return [v.name for v, ok in zip(floats, finite) if not ok]
