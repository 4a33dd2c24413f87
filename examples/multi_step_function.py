"""Several train steps per `tf.function` call, on two replicas.

    python examples/multi_step_function.py --train_steps=200 --steps_per_call=10

One Python call runs `--steps_per_call` steps inside the graph (fewer host
round trips), each `strategy.run(step.replica_fn, ...)`. What tfloop adds:
the BN statistics are updated once per step from the global batch (one fused
all-reduce), identical on both replicas, and validation follows a precise-BN
recalibration.
"""

import common
import keras
import tensorflow as tf
from absl import app, flags

import tfloop
from tfloop import distribute

flags.DEFINE_integer("train_steps", 200, "Optimizer steps.")
flags.DEFINE_integer("steps_per_call", 10, "Steps per tf.function call.")
FLAGS = flags.FLAGS


def main(_):
    strategy = distribute.make_strategy("mirrored", num_cpu_devices=2)
    with strategy.scope():
        model = common.model()
        optimizer = keras.optimizers.Adam(1e-3)
    step = tfloop.make_train_step(model, optimizer, common.LOSS, strategy=strategy)
    eval_step = tfloop.make_eval_step(model, common.LOSS, strategy=strategy)
    train_data, calib_data, val_data = common.datasets()
    iterator = iter(strategy.experimental_distribute_dataset(train_data.repeat()))

    @tf.function
    def train_steps(iterator, count):
        for _ in tf.range(count - 1):
            strategy.run(step.replica_fn, args=next(iterator))
        # The last step's metrics, reduced over the replicas.
        return tfloop.reduce_metrics(
            strategy.run(step.replica_fn, args=next(iterator)), strategy
        )

    for _ in range(FLAGS.train_steps // FLAGS.steps_per_call):
        sums = train_steps(iterator, tf.constant(FLAGS.steps_per_call))
        print(
            f"step {int(optimizer.iterations.numpy())}, "
            f"loss = {float(sums['loss']):.2f}, "
            f"training_acc = {float(sums['top1']):.4f}"
        )
    tfloop.bn.recalibrate(model, calib_data, num_batches=50, strategy=strategy)
    result = tfloop.evaluate(
        eval_step, strategy.experimental_distribute_dataset(val_data)
    )
    print(f"precision @ 1 = {result['top1']:.4f} val loss = {result['loss']:.2f}")


if __name__ == "__main__":
    app.run(main)
