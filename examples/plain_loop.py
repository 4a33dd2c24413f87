"""tfloop's steps in a plain Python loop.

    python examples/plain_loop.py --train_steps=200

What tfloop adds: the step owns the BN statistics (zero-debiased, updated once
per step from the global batch), validation follows a precise-BN
recalibration, and `tfloop.bn.staleness` says how stale the moving averages
were.
"""

import common
import keras
from absl import app, flags

import tfloop

flags.DEFINE_integer("train_steps", 200, "Optimizer steps.")
FLAGS = flags.FLAGS


def main(_):
    model = common.model()
    step = tfloop.make_train_step(model, keras.optimizers.Adam(1e-3), common.LOSS)
    eval_step = tfloop.make_eval_step(model, common.LOSS)
    train_data, calib_data, val_data = common.datasets()

    for images, labels in train_data.repeat().take(FLAGS.train_steps):
        metrics = step((images, labels))
    print(f"step {FLAGS.train_steps}, loss = {float(metrics['loss']):.2f}")
    worst = max(
        tfloop.bn.staleness(model, next(iter(val_data))), key=lambda s: s.mean_shift
    )
    print(f"stalest BN layer {worst.layer}: mean shift {worst.mean_shift:.2f}")
    tfloop.bn.recalibrate(model, calib_data, num_batches=50)
    result = tfloop.evaluate(eval_step, val_data)
    print(f"precision @ 1 = {result['top1']:.4f} val loss = {result['loss']:.2f}")


if __name__ == "__main__":
    app.run(main)
