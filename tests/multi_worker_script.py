"""One worker of `tests/test_multi_worker.py`: trains a few steps, dumps the weights.

    TF_CONFIG='{"cluster": ..., "task": ...}' python multi_worker_script.py OUT.npz
    ... multi_worker_script.py OUT.npz worker_batches
    ... multi_worker_script.py OUT.npz epoch_ids DATA_DIR

Runs `train` under `MultiWorkerMirroredStrategy` through tfloop's public API
and saves every model weight and BN update count to OUT.npz (`worker_batches`:
each worker feeds only its own half of every global batch). The test imports
this module too and runs `train` under a one-process `MirroredStrategy`, for
the reference, so both see the same model, data and steps. `epoch_ids` saves
the labels of one epoch of the binary's training input instead. Importing it
configures no device.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import tfloop
from tfloop import bn, distribute, runner
from tfloop.config import TrainConfig

GLOBAL_BATCH = 16
STEPS = 3
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def global_batches() -> tf.data.Dataset:
    """STEPS deterministic global batches; each one's second half is shifted by +5.

    With DATA sharding over 2 replicas, replica (worker) 1 gets the second
    half of every global batch: its inputs differ from replica 0's.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS, GLOBAL_BATCH, 8, 8, 3)).astype("float32")
    x[:, GLOBAL_BATCH // 2 :] += 5.0
    y = rng.integers(0, 4, size=(STEPS, GLOBAL_BATCH))
    return tf.data.Dataset.from_tensor_slices(
        (x.reshape(-1, 8, 8, 3), y.reshape(-1))
    ).batch(GLOBAL_BATCH)


def build_model() -> keras.Model:
    """Conv -> BN -> ReLU -> Conv -> BN -> pool -> Dense, deterministic weights."""
    # Named layers: weight paths do not depend on what the process built before.
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="conv1"),
            keras.layers.BatchNormalization(name="bn1"),
            keras.layers.ReLU(name="relu"),
            keras.layers.Conv2D(4, 3, name="conv2"),
            keras.layers.BatchNormalization(name="bn2"),
            keras.layers.GlobalAveragePooling2D(name="pool"),
            keras.layers.Dense(4, name="logits"),
        ],
        name="net",
    )
    rng = np.random.default_rng(1)
    for variable in model.trainable_weights:
        variable.assign(0.3 * rng.normal(size=variable.shape).astype("float32"))
    return model


def train(
    strategy: tf.distribute.Strategy, *, worker_batches: bool = False, **step_args
) -> dict[str, np.ndarray]:
    """STEPS SGD steps on `global_batches()`; returns weights and BN counts.

    With `worker_batches` each worker feeds the step only its own part of
    every global batch (worker i the i-th), as when it reads its own files.
    `step_args` go to `make_train_step`. Values are those of this process's
    first replica.
    """
    with strategy.scope():
        model = build_model()
        optimizer = keras.optimizers.SGD(0.1)
    step = tfloop.make_train_step(
        model,
        optimizer,
        LOSS,
        strategy=strategy,
        worker_batches=worker_batches,
        **step_args,
    )
    if worker_batches:
        index, count = distribute.input_worker(strategy)
        size = GLOBAL_BATCH // count
        own = slice(index * size, (index + 1) * size)
        batches = global_batches().map(lambda x, y: (x[own], y[own]))
    else:
        batches = distribute.distribute(strategy, global_batches())
    for element in batches:
        step(element)
    results = {variable.path: variable.numpy() for variable in model.weights}
    for i, count in enumerate(bn.state(model).counts):
        results[f"bn_count_{i}"] = count.numpy()
    return results


WORKER_BATCH_STEP = {"sync_bn": True, "bn_averaging": "plain"}
"""Step arguments under which a step equals stock Keras on the global batch."""


def epoch_ids(data_dir: str) -> dict[str, np.ndarray]:
    """Labels of one epoch of the binary's training input on this worker.

    The test's TFRecords label each example with its own id.
    """
    config = TrainConfig(
        model="resnet_v1_small",
        dataset="tfrecord",
        data_dir=data_dir,
        strategy="multi_worker",
        image_size=32,
        batch_size=4,
        bn_recalibrate_batches=0,
    )
    run = runner._Run(config)
    try:
        labels = [
            next(run.train_iterator)[1].numpy() for _ in range(run.steps_per_epoch)
        ]
    finally:
        run.close()
    return {"ids": np.concatenate(labels), "shard": np.array(run.shard)}


def main(out: str, mode: str = "", *args: str) -> None:
    if mode == "epoch_ids":
        results = epoch_ids(*args)
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        if mode == "worker_batches":
            results = train(strategy, worker_batches=True, **WORKER_BATCH_STEP)
        else:
            results = train(strategy)
        results["num_replicas"] = np.array(strategy.num_replicas_in_sync)
    np.savez(out, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
