"""`model.fit` with tfloop's BN handling, on two replicas.

    python examples/keras_fit.py --epochs=3

`tfloop.keras.FitModel` makes `fit`'s `train_step` run `step.replica_fn`, and
`tfloop.keras.PreciseBN` recalibrates BN before every validation. What tfloop
adds to `fit`: BN statistics of the global batch, zero-debiased and identical
on both replicas (stock Keras keeps per-replica copies and checkpoints replica
0's), `val_*` numbers that describe the current weights, and the
`BN statistics were stale: ...` line when the moving averages lagged.
"""

import common
import keras
from absl import app, flags

import tfloop
from tfloop import distribute

flags.DEFINE_integer("epochs", 3, "Epochs.")
FLAGS = flags.FLAGS


def main(_):
    strategy = distribute.make_strategy("mirrored", num_cpu_devices=2)
    train_data, calib_data, val_data = common.datasets()

    with strategy.scope():
        model = common.model()
        fit_model = tfloop.keras.FitModel(model, loss_fn=common.LOSS)
        fit_model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = fit_model.fit(
        train_data,
        epochs=FLAGS.epochs,
        validation_data=val_data,
        callbacks=[
            tfloop.keras.PreciseBN(calib_data, num_batches=50, validation_data=val_data)
        ],
        verbose=2,
    )
    logs = {key: values[-1] for key, values in history.history.items()}
    print(f"precision @ 1 = {logs['val_top1']:.4f} val loss = {logs['val_loss']:.2f}")


if __name__ == "__main__":
    app.run(main)
