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

`check_step` reads the flags on the host, which waits for the step to end.
A loop that should not wait after every step (asynchronous dispatch,
`TrainStep.run`) keeps the count on the device instead: `Tally.record` after
each call notes the calls with non-finite steps, `Tally.read` (one host read)
returns them only where the host acts anyway, e.g. before a log line or a
checkpoint, to stop or report each as `check_step` would have. A step after a non-finite one is an
ordinary step (the non-finite one changed nothing), so stopping at the next
read still names the first non-finite step, and the latest checkpoint is
still the last good one.

The optimizer update runs under `tf.cond` in cross-replica context, the way
Keras' `LossScaleOptimizer` skips its non-finite steps: a `cond` in replica
context cannot contain the optimizer's `merge_call`. The BN statistics update
takes the flag itself (`tfloop.bn.averaging._apply_updates(finite=...)`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping, Sequence

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


def is_nonfinite(metrics: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """1.0 if a step's flags say it was not applied, else 0.0 (no host read)."""
    flags = [metrics[key] for key in KEYS if key in metrics]
    if not flags:
        return tf.constant(0.0)
    return tf.cast(tf.add_n(flags) > 0, tf.float32)


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


@dataclasses.dataclass(frozen=True)
class Call:
    """One call of a step (steps `first..last`) that had non-finite steps."""

    first: int
    last: int
    steps: int  # How many of its steps were non-finite.
    first_nonfinite: int  # The first of them.
    flags: dict[str, int]  # Its flags, by `KEYS` (as a step reports them).

    def check(self, mode: str) -> bool:
        """`check_step` for the call's first non-finite step: raises in `stop` mode."""
        return check_step(self.first_nonfinite, self.flags, mode=mode)


class Tally:
    """Non-finite steps counted on the device, read on the host only when asked.

    `record(first, last, metrics)` after every call of a step (metrics as
    `TrainStep.run` returns them, for steps `first..last`) adds to the count
    and notes a call with non-finite steps, without a host read. `read()`
    returns those calls since the previous read and the run's count, in one
    host read.

    Args:
      count: an int64 `tf.Variable`, the run's non-finite steps: `record`
        adds to it, so with `optimizer.iterations` it gives the position in
        the run at any time (the caller checkpoints it).
      capacity: calls noted between two reads; beyond it a call is merged
        into the last one noted (its steps counted, its first step kept). A
        loop that reads every `n` calls at most loses nothing with `n`.

    Build it under the strategy's scope, as `count`.
    """

    def __init__(self, count: tf.Variable, *, capacity: int = 100):
        if capacity < 1:
            raise ValueError(f"`capacity` must be >= 1, got {capacity!r}.")
        self.count = count
        self.capacity = capacity
        # Rows: first, last, steps, first non-finite step, its flags.
        self._calls = tf.Variable(
            tf.zeros([capacity, 4 + len(KEYS)], tf.int64),
            trainable=False,
            name="nonfinite_calls",
        )
        self._noted = tf.Variable(0, dtype=tf.int64, trainable=False, name="noted")

    def record(self, first: int, last: int, metrics: Mapping[str, tf.Tensor]) -> None:
        """Adds the non-finite steps of one call, which ran steps `first..last`."""
        keys = (*KEYS, "nonfinite_steps", "nonfinite_first")
        self._record(
            tf.constant([first, last], tf.int64), {key: metrics[key] for key in keys}
        )

    @tf.function
    def _record(self, span: tf.Tensor, metrics: dict) -> None:
        steps = tf.cast(metrics["nonfinite_steps"], tf.int64)
        self.count.assign_add(steps)
        if steps > 0:
            flags = tf.cast(tf.stack([metrics[key] for key in KEYS]) > 0, tf.int64)
            first = span[0] + tf.cast(metrics["nonfinite_first"], tf.int64) - 1
            noted = tf.convert_to_tensor(self._noted)
            row = tf.minimum(noted, self.capacity - 1)
            calls = tf.convert_to_tensor(self._calls)
            merged = calls[row]  # When full: the last row absorbs the call.
            value = tf.where(
                noted < self.capacity,
                tf.concat([span, [steps, first], flags], 0),
                tf.concat(
                    [
                        [merged[0], span[1], merged[2] + steps, merged[3]],
                        tf.maximum(merged[4:], flags),
                    ],
                    0,
                ),
            )
            self._calls.assign(tf.tensor_scatter_nd_update(calls, [[row]], [value]))
            self._noted.assign(tf.minimum(noted + 1, self.capacity))

    def read(self) -> tuple[list[Call], int]:
        """The calls with non-finite steps since the previous read, and `count`."""
        values = self._take().numpy()
        rows = values[1:].reshape([-1, 4 + len(KEYS)])
        calls = [
            Call(
                first=int(row[0]),
                last=int(row[1]),
                steps=int(row[2]),
                first_nonfinite=int(row[3]),
                flags={key: int(flag) for key, flag in zip(KEYS, row[4:])},
            )
            for row in rows
        ]
        return calls, int(values[0])

    @tf.function
    def _take(self) -> tf.Tensor:
        noted = tf.convert_to_tensor(self._calls)[: self._noted]
        values = tf.concat(
            [[tf.cast(self.count, tf.int64)], tf.reshape(noted, [-1])], axis=0
        )
        with tf.control_dependencies([values]):
            self._noted.assign(0)
        return values


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
