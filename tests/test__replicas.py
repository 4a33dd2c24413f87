"""Summing per-replica outputs, in replica and in cross-replica context."""

import tensorflow as tf

from tfloop._replicas import sum_over_replicas


def _outputs():
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    value = tf.cast(replica, tf.float32) + 1.0  # 1 on replica 0, 2 on replica 1.
    return {"loss": value, "count": 10.0 * value}


def test_cross_replica_sums(mirrored):
    sums = sum_over_replicas(mirrored.run(tf.function(_outputs)), mirrored)
    assert float(sums["loss"]) == 3.0 and float(sums["count"]) == 30.0


def test_replica_context_gives_every_replica_the_sums(mirrored):
    per_replica = mirrored.run(tf.function(lambda: sum_over_replicas(_outputs())))
    for sums in mirrored.experimental_local_results(per_replica):
        assert float(sums["loss"]) == 3.0 and float(sums["count"]) == 30.0


def test_one_device_is_the_identity():
    sums = sum_over_replicas({"loss": tf.constant(1.5), "count": tf.constant(4.0)})
    assert float(sums["loss"]) == 1.5 and float(sums["count"]) == 4.0
