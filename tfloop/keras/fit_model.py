"""`FitModel`: `model.fit` with tfloop's train step inside Keras' `train_step`."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfloop import steps


class FitModel(keras.Model):
    """Wraps `model` so that `fit` trains it with a tfloop train step.

    `fit`'s `train_step` runs `step.replica_fn` of `tfloop.make_train_step`
    on each replica: the step owns the BN statistics (updated once per step
    from the global batch, zero-debiased by default, the same on every
    replica), averages the loss over the global batch and adds
    `model.losses`. `evaluate` (and `fit`'s validation) use tfloop's eval
    step. Logs are `loss` and `top1`, exact over all replicas.

        fit_model = tfloop.keras.FitModel(model, loss_fn=loss_fn)
        fit_model.compile(optimizer=keras.optimizers.Adam(1e-3))
        fit_model.fit(train_data, validation_data=val_data, epochs=3)
        model.save("model.keras")  # The wrapped model: plain Keras.

    Build (and compile) under the strategy's scope, as any Keras model.

    Args:
      model: the model to train.
      loss_fn: `loss_fn(labels, logits)` returning per-example losses (e.g.
        a Keras loss with `reduction=None`).
      **train_step_options: passed to `tfloop.make_train_step` (`bn_decay`,
        `bn_averaging`, `sync_bn`, `bn_audit`, `gradient_transform`).
    """

    def __init__(
        self, model: keras.Model, *, loss_fn: steps.LossFn, **train_step_options
    ):
        super().__init__(name=f"fit_{model.name}")
        self.wrapped = model
        self._loss_fn = loss_fn
        self._train_step_options = train_step_options
        self._tfloop_train_step: steps.TrainStep | None = None
        self._tfloop_eval_step: steps.EvalStep | None = None
        self._loss_metric = keras.metrics.Mean(name="loss")
        self._top1_metric = keras.metrics.Mean(name="top1")

    def call(self, inputs, training=None):
        return self.wrapped(inputs, training=training)

    def compile(self, optimizer="rmsprop", **kwargs) -> None:
        """Keras' `compile`; the loss is `loss_fn`, and XLA is off by default."""
        if kwargs.get("loss") is not None:
            raise ValueError(
                "`loss` is given to FitModel(loss_fn=...), not to compile(), "
                f"got loss={kwargs['loss']!r}."
            )
        kwargs.setdefault("jit_compile", False)
        super().compile(optimizer=optimizer, **kwargs)
        strategy = self.distribute_strategy
        self._tfloop_train_step = steps.make_train_step(
            self.wrapped,
            self.optimizer,
            self._loss_fn,
            strategy=strategy,
            **self._train_step_options,
        )
        self._tfloop_eval_step = steps.make_eval_step(
            self.wrapped, self._loss_fn, strategy=strategy
        )

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        return [self._loss_metric, self._top1_metric]

    def _unpack(self, data) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor | None]:
        """`(images, labels, sample_weight)`; `fit`'s class weights arrive as sample weights."""
        if self._tfloop_train_step is None:
            raise ValueError("Call `compile()` before `fit()` or `evaluate()`.")
        return keras.utils.unpack_x_y_sample_weight(data)

    def _logs(self, loss, loss_weight, correct, count) -> dict[str, tf.Tensor]:
        """Accumulates global values (identical on every replica) into the logs.

        Keras reduces what `train_step` returns with a MEAN over replicas, so
        only values that are already global come out right.
        """
        self._loss_metric.update_state(loss, sample_weight=loss_weight)
        self._top1_metric.update_state(correct / count, sample_weight=count)
        return {metric.name: metric.result() for metric in self.metrics}

    def train_step(self, data) -> dict[str, tf.Tensor]:
        totals = steps.reduce_metrics(
            self._tfloop_train_step.replica_fn(*self._unpack(data))
        )
        # Logged loss: the mean over the epoch's steps, as Keras does.
        return self._logs(totals["loss"], 1.0, totals["correct"], totals["count"])

    def test_step(self, data) -> dict[str, tf.Tensor]:
        totals = steps.reduce_metrics(
            self._tfloop_eval_step.replica_fn(*self._unpack(data))
        )
        # Per example over the whole set: a last partial batch weighs less.
        count = totals["count"]
        return self._logs(totals["loss"], count, totals["correct"], count)
