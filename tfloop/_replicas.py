"""Summing a step's per-replica outputs over all replicas (private).

Stands in for the public `tfloop.reduce_metrics` until it lands; callers use
only `sum_over_replicas`, so swapping it is a one-line change each.
"""

from __future__ import annotations

import tensorflow as tf


def sum_over_replicas(
    outputs: dict, strategy: tf.distribute.Strategy | None = None
) -> dict[str, tf.Tensor]:
    """Sums every output of `replica_fn` over all replicas.

    Without `strategy`: called in replica context (a Keras `train_step`,
    inside `strategy.run`); one fused all-reduce gives every replica the
    global sums. With `strategy`: called in cross-replica context on the
    per-replica values `strategy.run` returned. A train step's `loss` and
    `data_loss` are shares of the global mean, so their sum is the global
    mean; `correct / count` is the global top-1.
    """
    keys = sorted(outputs)
    if strategy is not None:
        return {
            key: strategy.reduce(tf.distribute.ReduceOp.SUM, outputs[key], axis=None)
            for key in keys
        }
    stacked = tf.stack([tf.cast(outputs[key], tf.float32) for key in keys])
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        stacked = context.all_reduce(tf.distribute.ReduceOp.SUM, stacked)
    return dict(zip(keys, tf.unstack(stacked)))
