"""tfloop's steps in a plain Python loop.

    python examples/plain_loop.py --train_steps=200

What tfloop adds: the step owns the BN statistics (zero-debiased, updated once
per step from the global batch), validation follows a precise-BN
recalibration, and `tfloop.bn.staleness` says how stale the moving averages
were.
"""

import keras
from absl import app, flags

import tfloop

flags.DEFINE_integer("train_steps", 200, "Optimizer steps.")
flags.DEFINE_integer("image_size", 32, "Input height and width.")
flags.DEFINE_integer("num_examples", 4096, "Size of the train split (1/8 validation).")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
FLAGS = flags.FLAGS


def main(_):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None
    )
    model = tfloop.models.get(
        "resnet_v1_small", num_classes=4, image_size=FLAGS.image_size
    )
    step = tfloop.make_train_step(model, keras.optimizers.Adam(1e-3), loss_fn)
    eval_step = tfloop.make_eval_step(model, loss_fn)
    load = {
        "data_dir": None,
        "image_size": FLAGS.image_size,
        "batch_size": FLAGS.batch_size,
        "seed": 0,
    }
    train, val = FLAGS.num_examples, max(1, FLAGS.num_examples // 8)
    train_data, _ = tfloop.data.load(
        "shapes", split="train", num_examples=train, **load
    )
    calib_data, _ = tfloop.data.load(
        "shapes", split="train", num_examples=train, augment=False, **load
    )
    val_data, _ = tfloop.data.load(
        "shapes", split="validation", num_examples=val, **load
    )

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
