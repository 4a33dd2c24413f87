"""Per-replica outputs into metrics: one reduction, in any trainer."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from tfloop import distribute, nonfinite
from tfloop.steps.batch import _split


def _sum_over_replicas(
    values: dict[str, tf.Tensor], strategy: tf.distribute.Strategy | None = None
) -> dict[str, tf.Tensor]:
    """Sums every value over all replicas, as one stacked vector (one reduction).

    Per-replica results of `strategy.run` are reduced with `strategy.reduce`
    (cross-replica context); plain tensors in a replica context (inside
    `strategy.run`: a Keras `train_step`, an Orbit step) are all-reduced, so
    every replica holds the totals. `MultiWorkerMirroredStrategy` cannot
    reduce a dict, hence the stacking.
    """
    keys = list(values)

    def stack(v):
        return tf.stack([tf.cast(v[key], tf.float32) for key in keys])

    if any(isinstance(v, tf.distribute.DistributedValues) for v in values.values()):
        strategy = strategy or tf.distribute.get_strategy()
        total = strategy.reduce(
            tf.distribute.ReduceOp.SUM, strategy.run(stack, args=(values,)), axis=None
        )
    else:
        total = stack(values)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            total = context.all_reduce(tf.distribute.ReduceOp.SUM, total)
    return dict(zip(keys, tf.unstack(total)))


def reduce_metrics(
    outputs: dict[str, tf.Tensor], strategy: tf.distribute.Strategy | None = None
) -> dict[str, tf.Tensor]:
    """Turns `replica_fn` outputs into the step's metrics, in any trainer.

    Every output of `TrainStep.replica_fn` and `EvalStep.replica_fn` is this
    replica's share of a global SUM: `loss` and `data_loss` (shares of the
    global-batch mean), `correct` and `count` (top-1 hits and examples, or
    their sample weights), `loss_sum` (eval). This function sums them over
    all replicas and workers (one reduction) and returns `loss`, `data_loss`
    (train) and `top1` = correct / count; for eval outputs `loss` is
    loss_sum / count. The summed `correct`, `count` (and `loss_sum`) come
    along, to accumulate exactly over many batches.

    Call it either on the per-replica results of `strategy.run` (cross-replica
    context, e.g. an Orbit `train_step` after `strategy.run`), or inside the
    replica function (a Keras `train_step` override: every replica then
    returns the same global values, so Keras' mean over replicas is right).
    Never average these outputs yourself: `fit`'s default mean halves the
    loss on 2 replicas.
    """
    totals = _sum_over_replicas(dict(outputs), strategy)
    sums = {k: totals[k] for k in ("correct", "count", "loss_sum") if k in totals}
    return {**_metrics(totals), **sums}


def _run_and_reduce(
    strategy: tf.distribute.Strategy,
    replica_fn: Callable,
    element,
    *,
    worker_local: bool = False,
) -> dict[str, tf.Tensor]:
    """Runs `replica_fn` on every replica; its outputs summed (one reduction).

    A plain (not distributed) `element` is split over the replicas: a global
    batch over all of them, a `worker_local` one over this worker's
    (`tfloop.distribute.split_batch`).

    The outputs travel as one stacked vector: one reduction per step however
    many there are (and `MultiWorkerMirroredStrategy` cannot reduce a dict).
    """
    keys: list[str] = []

    def stacked(*args):
        values = replica_fn(*args)
        keys[:] = values
        return tf.stack([tf.cast(values[key], tf.float32) for key in keys])

    distributed = any(
        isinstance(v, tf.distribute.DistributedValues) for v in tf.nest.flatten(element)
    )
    if (
        distributed
        and strategy is tf.distribute.get_strategy()
        and not (tf.distribute.has_strategy())
    ):
        raise ValueError(
            "The step got an element of a distributed dataset but runs on the "
            "default strategy: pass `strategy=` the strategy that distributed it."
        )
    element = _split(element)
    if not distributed:  # Each replica takes its slice.
        element = distribute.split_batch(strategy, element, worker_local=worker_local)
    per_replica = strategy.run(stacked, args=element)
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    return dict(zip(keys, tf.unstack(total)))


def _metrics(totals: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The step's metrics from summed outputs (see `reduce_metrics`)."""
    metrics = {}
    if "loss_sum" in totals:
        metrics["loss"] = tf.math.divide_no_nan(totals["loss_sum"], totals["count"])
    else:
        metrics["loss"] = totals["loss"]
    if "data_loss" in totals:
        metrics["data_loss"] = totals["data_loss"]
    metrics["top1"] = tf.math.divide_no_nan(totals["correct"], totals["count"])
    metrics.update({k: totals[k] for k in nonfinite.KEYS if k in totals})
    return metrics
