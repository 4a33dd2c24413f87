"""Strategies for one device, many local devices, and many machines.

Kept apart from the steps: a step takes any `tf.distribute.Strategy`; this
module only builds the three the binary offers and answers "am I the chief".
"""

from __future__ import annotations

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")


def split_cpu(num_devices: int) -> None:
    """Splits the CPU into `num_devices` logical devices (before TF starts).

    Lets `MirroredStrategy` run the multi-replica path on a machine without
    GPUs. Must run before TensorFlow initializes its devices.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = tf.config.get_logical_device_configuration(cpu)
    if existing is not None and len(existing) == num_devices:
        return
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
    )


def make_strategy(name: str, *, num_cpu_devices: int = 0) -> tf.distribute.Strategy:
    """Returns the strategy called `name` (see `STRATEGIES`).

    `mirrored` uses every local GPU, or with `num_cpu_devices` > 0 that many
    logical CPU devices. `multi_worker` reads the cluster from `TF_CONFIG`.
    """
    if name not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {list(STRATEGIES)}, got {name!r}.")
    if name == "default":
        return tf.distribute.get_strategy()
    if num_cpu_devices > 0:
        split_cpu(num_cpu_devices)
    if name == "mirrored":
        if num_cpu_devices > 0:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
            return tf.distribute.MirroredStrategy(devices[:num_cpu_devices])
        return tf.distribute.MirroredStrategy()
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one worker that writes checkpoints and summaries."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def input_worker(strategy: tf.distribute.Strategy) -> tuple[int, int]:
    """`(index, count)` of this worker among the workers that read input.

    The chief, if the cluster has one, is worker 0, then the `worker` tasks
    in order: the order in which `MultiWorkerMirroredStrategy` numbers its
    replicas, so worker i holds replicas `i * local .. (i + 1) * local - 1`.
    One process (no cluster) is worker 0 of 1.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 0, 1
    spec = resolver.cluster_spec().as_dict()
    chiefs = len(spec.get("chief", ()))
    index = resolver.task_id + (chiefs if resolver.task_type == "worker" else 0)
    return index, chiefs + len(spec.get("worker", ()))


def worker_values(strategy: tf.distribute.Strategy, value: int) -> list[int]:
    """Every worker's `value`, in worker order (one all-reduce).

    For numbers each worker finds on its own, e.g. the examples in its
    files, that all workers must agree on (the steps of an epoch).
    """
    index, count = input_worker(strategy)
    if count == 1:
        return [value]
    local = strategy.num_replicas_in_sync // count
    # Each local replica contributes the worker's value at its index; float64
    # holds integers exactly far beyond any example count.
    vector = tf.one_hot(index, count, dtype=tf.float64) * value
    total = strategy.reduce(
        tf.distribute.ReduceOp.SUM,
        strategy.experimental_distribute_values_from_function(lambda _: vector),
        axis=None,
    )
    return [round(v / local) for v in total.numpy()]


def distribute(
    strategy: tf.distribute.Strategy, dataset: tf.data.Dataset
) -> tf.distribute.DistributedDataset:
    """Splits each global batch of `dataset` over the replicas of `strategy`.

    Every worker builds the same pipeline and keeps its own share of each
    batch (DATA sharding), so generated data and files shard alike.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def split_batch(
    strategy: tf.distribute.Strategy, element, *, worker_local: bool = False
):
    """Splits one batch `(images, labels[, weights])` into per-replica shards.

    For a batch read from a plain iterator, which (unlike the iterator of a
    distributed dataset) `tf.train.Checkpoint` can save; a train step does
    this itself with any batch that is not already distributed. A global
    batch (every worker reads the same batches) is split over all replicas
    of the cluster: replica i gets the i-th slice (the first
    `batch % replicas` slices one example more, as `tf.data`'s rebatching).
    A `worker_local` batch (each worker reads its own files, see
    `input_worker`) is split the same way over this worker's replicas only.
    Works eagerly and inside a `tf.function`.
    """
    workers = input_worker(strategy)[1] if worker_local else 1
    count = strategy.num_replicas_in_sync // workers
    if count == 1:
        return element

    def shard(value):
        def piece(context: tf.distribute.ValueContext):
            # Replicas of one worker are numbered consecutively.
            index = context.replica_id_in_sync_group % count
            batch = tf.shape(value)[0]
            size = batch // count + tf.cast(index < batch % count, tf.int32)
            start = index * (batch // count) + tf.minimum(index, batch % count)
            return value[start : start + size]

        return strategy.experimental_distribute_values_from_function(piece)

    # Like an element of a distributed dataset: a structure of per-replica values.
    return tf.nest.map_structure(shard, element)
