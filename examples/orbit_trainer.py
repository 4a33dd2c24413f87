"""tfloop's steps inside Orbit (TF Model Garden's trainer library), on two replicas.

    pip install --no-deps tf-models-official==2.20.0 tf-keras==2.21.0
    python examples/orbit_trainer.py --train_steps=200 --steps_per_loop=50

An `orbit.StandardTrainer` whose `train_step` runs `step.replica_fn` under
`strategy.run`, an `orbit.StandardEvaluator` over `make_eval_step`'s
`replica_fn`, and an `orbit.Controller` that runs `--steps_per_loop` steps per
`tf.function` call and evaluates every `--eval_interval` steps. What tfloop
adds to Orbit: BN statistics owned by the step (global-batch, zero-debiased,
identical on every replica) and a precise-BN recalibration in
`eval_begin`, so every evaluation describes the current weights.
"""

import common
import keras
import orbit
import tensorflow as tf
from absl import app, flags

import tfloop
from tfloop import distribute

flags.DEFINE_integer("train_steps", 200, "Optimizer steps.")
flags.DEFINE_integer("steps_per_loop", 50, "Steps per tf.function call.")
flags.DEFINE_integer("eval_interval", 100, "Steps between evaluations.")
FLAGS = flags.FLAGS


class Trainer(orbit.StandardTrainer):
    """Orbit trainer over a tfloop train step."""

    def __init__(self, strategy, step, dataset):
        self.strategy = strategy
        self.step = step
        with strategy.scope():
            self.loss = keras.metrics.Mean("loss")
            self.top1 = keras.metrics.Mean("top1")
        super().__init__(strategy.experimental_distribute_dataset(dataset))

    def train_loop_begin(self):
        self.loss.reset_state()
        self.top1.reset_state()

    def train_step(self, iterator):
        images, labels = next(iterator)
        # Inside Orbit's tf.function: `replica_fn` in replica context, here
        # in cross-replica context; reduce_metrics gives the global values.
        sums = tfloop.reduce_metrics(
            self.strategy.run(self.step.replica_fn, args=(images, labels)),
            self.strategy,
        )
        self.loss.update_state(sums["loss"])
        self.top1.update_state(sums["top1"])

    def train_loop_end(self):
        return {"loss": self.loss.result(), "top1": self.top1.result()}


class Evaluator(orbit.StandardEvaluator):
    """Orbit evaluator over a tfloop eval step, after precise BN."""

    def __init__(self, strategy, step, dataset, calib_data):
        self.strategy = strategy
        self.step = step  # Not `eval_step`: that is Orbit's method below.
        self.calib_data = calib_data
        with strategy.scope():
            self.sums = {
                key: keras.metrics.Sum(key, dtype="float64")
                for key in ("loss_sum", "correct", "count")
            }
        super().__init__(strategy.experimental_distribute_dataset(dataset))

    def eval_begin(self):
        # Eager, before Orbit's evaluation loop: statistics for these weights.
        tfloop.bn.recalibrate(
            self.step.model,
            self.calib_data,
            num_batches=50,
            strategy=self.strategy,
        )
        for metric in self.sums.values():
            metric.reset_state()

    def eval_step(self, iterator):
        images, labels = next(iterator)
        sums = tfloop.reduce_metrics(
            self.strategy.run(self.step.replica_fn, args=(images, labels)),
            self.strategy,
        )
        for key, metric in self.sums.items():
            metric.update_state(tf.cast(sums[key], tf.float64))

    def eval_end(self):
        count = self.sums["count"].result()
        return {
            "loss": self.sums["loss_sum"].result() / count,
            "top1": self.sums["correct"].result() / count,
        }


def main(_):
    strategy = distribute.make_strategy("mirrored", num_cpu_devices=2)
    with strategy.scope():
        model = common.model()
        optimizer = keras.optimizers.Adam(1e-3)
    step = tfloop.make_train_step(model, optimizer, common.LOSS, strategy=strategy)
    eval_step = tfloop.make_eval_step(model, common.LOSS, strategy=strategy)
    train_data, calib_data, val_data = common.datasets()

    evaluator = Evaluator(strategy, eval_step, val_data, calib_data)
    controller = orbit.Controller(
        strategy=strategy,
        trainer=Trainer(strategy, step, train_data.repeat()),
        evaluator=evaluator,
        global_step=optimizer.iterations.value,  # The tf.Variable under Keras 3.
        steps_per_loop=FLAGS.steps_per_loop,
    )
    controller.train_and_evaluate(
        train_steps=FLAGS.train_steps,
        eval_steps=-1,
        eval_interval=FLAGS.eval_interval,
    )
    result = {key: float(value) for key, value in evaluator.eval_end().items()}
    print(f"global step {int(optimizer.iterations.numpy())}")
    print(f"precision @ 1 = {result['top1']:.4f} val loss = {result['loss']:.2f}")


if __name__ == "__main__":
    app.run(main)
