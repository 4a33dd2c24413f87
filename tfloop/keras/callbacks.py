"""`PreciseBN`: recalibrate BN statistics before each validation in `fit`."""

from __future__ import annotations

import time

import keras
import tensorflow as tf
from absl import logging

from tfloop import bn, progress


class PreciseBN(keras.callbacks.Callback):
    """Sets BN statistics to their population values before every validation.

    `fit` validates with the moving averages, which lag weights that change
    fast (and with slim's decay 0.9997 mean little for thousands of steps),
    so its `val_loss` can sit at chance while the model is fine. This
    callback runs `tfloop.bn.recalibrate` on `num_batches` batches of
    `dataset` when validation begins (Keras' `on_test_begin`), so `val_*`
    describe the current weights. With `validation_data` it first evaluates
    with the moving averages and, when those were clearly worse, prints the
    binary's line::

        BN statistics were stale: val loss 1.38 with moving averages, 0.05 after recalibration

    Training continues from the recalibrated statistics (as in the binary).

    Args:
      dataset: training images as validation sees them (no augmentation),
        a `tf.data.Dataset` of `images` or `(images, labels, ...)` batches.
      num_batches: batches per recalibration, at most (the binary's default
        is 50).
      tolerance: stop a recalibration early once the statistics are known
        to this relative standard error (`tfloop.bn.recalibrate`; the
        binary's default is 0.02); 0: always `num_batches`.
      validation_data: the same validation data as `fit`'s, to measure (and
        print) how stale the moving averages were; None skips that.
    """

    def __init__(
        self,
        dataset: tf.data.Dataset,
        *,
        num_batches: int,
        tolerance: float = 0.0,
        validation_data: tf.data.Dataset | None = None,
    ):
        super().__init__()
        if num_batches < 1:
            raise ValueError(f"`num_batches` must be at least 1, got {num_batches!r}.")
        if not tolerance >= 0:  # Also refuses NaN.
            raise ValueError(f"`tolerance` must be at least 0, got {tolerance!r}.")
        self._dataset = dataset
        self._num_batches = num_batches
        self._tolerance = tolerance
        self._validation_data = validation_data
        self._moving: dict[str, float] | None = None

    def on_test_begin(self, logs=None) -> None:
        if self._validation_data is not None:
            # A nested evaluate gets no callbacks: this one does not recurse.
            self._moving = self.model.evaluate(
                self._validation_data, verbose=0, return_dict=True
            )
        start = time.perf_counter()
        used = bn.recalibrate(
            self.model,
            self._dataset,
            num_batches=self._num_batches,
            strategy=self.model.distribute_strategy,
            tolerance=self._tolerance,
        )
        logging.info(
            "recalibrated BN on %d batches in %.1f s", used, time.perf_counter() - start
        )

    def on_test_end(self, logs=None) -> None:
        moving, self._moving = self._moving, None
        if moving is None or not logs or "loss" not in logs:
            return
        line = progress.stale_line(float(moving["loss"]), float(logs["loss"]))
        if line:
            progress.say(line)
