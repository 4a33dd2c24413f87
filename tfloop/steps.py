"""Train and eval steps: explicit tape, explicit `training`, BN owned by the step.

A step is built once from a model (and optimizer) and then called on dataset
elements. Each step object exposes two levels, so it fits any trainer:

- `step(element)`: one `tf.function` call that runs `step.replica_fn` on every
  replica (`strategy.run`) and reduces the results. For your own loop.
- `step.replica_fn(images, labels)`: the per-replica body, for code that is
  already inside a `tf.function` and replica context (an Orbit trainer, a Keras
  `train_step` override, a multi-step `tf.function` loop).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf
from absl import logging

from tfloop import bn
from tfloop.bn import audit, averaging, ownership

__all__ = ["EvalStep", "TrainStep", "evaluate", "make_eval_step", "make_train_step"]

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
GradientTransform = Callable[
    [Sequence[tuple[tf.Tensor, tf.Variable]]], list[tuple[tf.Tensor, tf.Variable]]
]

_AUDIT_MODES = ("warn", "error", "off")


def _correct_and_count(
    labels: tf.Tensor, logits: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Top-1 hits and example count; labels may be sparse ids or one-hot."""
    if labels.shape.rank == logits.shape.rank:
        labels = tf.argmax(labels, axis=-1)
    predictions = tf.argmax(logits, axis=-1, output_type=tf.int64)
    hits = tf.cast(tf.equal(predictions, tf.cast(labels, tf.int64)), tf.float32)
    return tf.reduce_sum(hits), tf.cast(tf.size(hits), tf.float32)


def _run_and_sum(
    strategy: tf.distribute.Strategy, replica_fn: Callable, element
) -> dict[str, tf.Tensor]:
    """Runs `replica_fn` on every replica; sums its scalars over all replicas.

    The scalars travel as one stacked vector: one reduction per step, however
    many metrics (and `MultiWorkerMirroredStrategy` cannot reduce a dict).
    """
    keys: list[str] = []

    def stacked(images, labels):
        values = replica_fn(images, labels)
        keys[:] = values
        return tf.stack([tf.cast(values[key], tf.float32) for key in keys])

    per_replica = strategy.run(stacked, args=_split(element))
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
    return dict(zip(keys, tf.unstack(total)))


def _split(element) -> tuple[tf.Tensor, tf.Tensor]:
    images, labels = element
    return images, labels


class TrainStep:
    """One optimizer step per call; see `make_train_step` for the arguments.

    Subclasses (e.g. `tfloop.optimize.OptimizeLossStep`) extend `replica_fn`.
    """

    def __init__(
        self,
        *,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss_fn: LossFn,
        strategy: tf.distribute.Strategy | None = None,
        bn_decay: float | None = None,
        bn_averaging: str = "debias",
        sync_bn: bool = False,
        bn_audit: str = "warn",
        gradient_transform: GradientTransform | None = None,
        own_bn: bool = True,
        jit_compile: bool = False,
    ):
        _check_choice("bn_averaging", bn_averaging, averaging.AVERAGING_MODES)
        _check_choice("bn_audit", bn_audit, _AUDIT_MODES)
        if bn_decay is not None and not 0.0 <= bn_decay < 1.0:
            raise ValueError(f"`bn_decay` must be in [0, 1), got {bn_decay!r}.")
        if gradient_transform is not None and isinstance(
            optimizer, keras.optimizers.LossScaleOptimizer
        ):
            raise ValueError(
                "`gradient_transform` would see loss-scaled gradients of the "
                "`LossScaleOptimizer`; use one or the other."
            )
        strategy = strategy or tf.distribute.get_strategy()
        if jit_compile and strategy.num_replicas_in_sync > 1:
            raise ValueError(
                "`jit_compile=True` needs a single replica: the optimizer's "
                "cross-replica update cannot be compiled by XLA; got "
                f"{strategy.num_replicas_in_sync} replicas."
            )
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.strategy = strategy
        self._bn_decay = bn_decay
        self._bn_averaging = bn_averaging
        self._sync_bn = sync_bn
        self._bn_audit = bn_audit
        self._gradient_transform = gradient_transform
        # XLA compiles the per-replica body; the loop of `run` reads its
        # iterator outside it (XLA has no input ops).
        self._replica_body = (
            tf.function(self.replica_fn, jit_compile=True)
            if jit_compile
            else self.replica_fn
        )
        self._owned = []
        if own_bn:
            with strategy.scope():
                self._owned = ownership._own_model(model)
        for _, layer_state in self._owned:
            layer_state.averaging = bn_averaging
            layer_state.decay = bn_decay
        if model.built and not optimizer.built:
            # Slots now, not in the first trace: a `tf.function` that creates
            # variables is traced twice, which doubles the first step's time.
            with strategy.scope():
                optimizer.build(model.trainable_variables)
        # Traced functions by name ("step", "loop"), with the freeze state
        # they were traced for.
        self._functions: dict[str, tuple[tuple, Callable]] = {}
        self._silent: list[str] = []
        self._defer_audit_errors = False

    def replica_fn(self, images: tf.Tensor, labels: tf.Tensor) -> dict[str, tf.Tensor]:
        """One step on this replica's shard; returns its share of the metrics.

        `loss` is this replica's share of the global-batch mean (the shares
        sum to it); `correct` and `count` are this replica's top-1 hits and
        examples. Reduce with SUM across replicas.
        """
        model = self.model
        collector = ownership._Collector(sync=self._sync_bn)
        with collector, tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = self.loss_fn(labels, logits)
            data_loss = tf.nn.compute_average_loss(per_example)
            loss = data_loss
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            # A `LossScaleOptimizer` (mixed_float16) unscales what it gets.
            scaled_loss = self.optimizer.scale_loss(loss)
        self._audit(audit._silent_layers(self._owned, collector))
        # Statistics first: they describe the weights that produced them.
        averaging._apply_updates(
            self._owned,
            collector,
            decay=self._bn_decay,
            averaging=self._bn_averaging,
        )
        variables = model.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        grads_and_vars = list(zip(gradients, variables))
        if self._gradient_transform is not None:
            grads_and_vars = self._transform(grads_and_vars)
        self.optimizer.apply_gradients(grads_and_vars)
        correct, count = _correct_and_count(labels, logits)
        return {
            "loss": loss,
            "data_loss": data_loss,
            "correct": correct,
            "count": count,
        }

    def _audit(self, silent: list[str]) -> None:
        """Runs at trace time: reports BN layers that reported no moments."""
        self._silent = silent
        if not silent or self._bn_audit == "off":
            return
        if self._bn_audit == "warn":
            logging.warning(audit._audit_message(silent))
        elif not self._defer_audit_errors:
            raise bn.BatchNormAuditError(audit._audit_message(silent))

    def _transform(self, grads_and_vars):
        """Applies the gradient transform to the *global* (all-reduced) gradients.

        The Keras optimizer sums gradients across replicas itself, so the
        transformed global gradient is handed back divided by the number of
        replicas: its sum over replicas is the transformed gradient.
        """
        context = tf.distribute.get_replica_context()
        replicas = 1 if context is None else context.num_replicas_in_sync
        if replicas > 1:
            present = [(g, v) for g, v in grads_and_vars if g is not None]
            summed = context.all_reduce(
                tf.distribute.ReduceOp.SUM, [g for g, _ in present]
            )
            grads_and_vars = [(g, v) for g, (_, v) in zip(summed, present)]
        grads_and_vars = self._gradient_transform(grads_and_vars)
        if replicas > 1:
            grads_and_vars = [(g / replicas, v) for g, v in grads_and_vars]
        return grads_and_vars

    def _step(self, element) -> dict[str, tf.Tensor]:
        sums = _run_and_sum(self.strategy, self._replica_body, element)
        return {
            "loss": sums["loss"],
            "data_loss": sums["data_loss"],
            "top1": sums["correct"] / sums["count"],
        }

    def __call__(self, element) -> dict[str, tf.Tensor]:
        """Runs one step on one element of the (distributed) dataset."""
        return self._traced("step", self._step, element)(element)

    def run(self, iterator, num_steps: int) -> dict[str, tf.Tensor]:
        """Runs `num_steps` steps in one `tf.function` call, as Orbit does.

        The steps take their elements from `iterator` (of a dataset, or of a
        distributed dataset of the step's strategy), which must have
        `num_steps` more. Results are bit-identical to `num_steps` calls of
        the step on `next(iterator)` when the iterator's element shapes are
        those of its elements (a static batch size, as `drop_remainder=True`
        gives; the single step is traced for its element's shapes, and
        grappler folds static shapes into different but equivalent
        arithmetic). The per-call overhead (a host round
        trip, which dominates small models and batches) is paid once per
        call. `num_steps` is a tensor inside, so calls of any length share
        one trace.

        Returns:
          The last step's `loss`, `data_loss` and `top1`, and `top1_sum`, the
          sum of every step's `top1` (for the mean training accuracy).
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
            raise TypeError(f"`num_steps` must be an integer, got {num_steps!r}.")
        if num_steps < 1:
            raise ValueError(f"`num_steps` must be at least 1, got {num_steps!r}.")
        num_steps = tf.constant(int(num_steps), tf.int32)
        return self._traced("loop", self._loop, iterator, num_steps)(
            iterator, num_steps
        )

    def _loop(self, iterator, num_steps: tf.Tensor) -> dict[str, tf.Tensor]:
        zero = tf.constant(0.0, tf.float32)
        metrics = {"loss": zero, "data_loss": zero, "top1": zero}
        top1_sum = zero
        for _ in tf.range(num_steps):
            metrics = self._step(next(iterator))
            top1_sum += metrics["top1"]
        return {**metrics, "top1_sum": top1_sum}

    def _traced(self, name: str, python_fn: Callable, *args) -> Callable:
        """The `tf.function` of `python_fn`, traced for `args` if not yet.

        A `tfloop.bn.freeze` after tracing changes what the graph must do:
        trace again rather than silently ignore it. Tracing before running
        lets `bn_audit="error"` stop the first step before it changes
        anything, with a plain exception.
        """
        freeze = tuple((s.frozen, layer.trainable) for layer, s in self._owned)
        traced = self._functions.get(name)
        if traced is not None and traced[0] == freeze:
            return traced[1]
        function = tf.function(python_fn)
        self._functions[name] = (freeze, function)
        self._defer_audit_errors = True
        try:
            function.get_concrete_function(*args)
        finally:
            self._defer_audit_errors = False
        if self._silent and self._bn_audit == "error":
            raise bn.BatchNormAuditError(audit._audit_message(self._silent))
        return function

    @property
    def tracing_count(self) -> int:
        """How many times the step was traced (one per input signature)."""
        traced = self._functions.get("step")
        return 0 if traced is None else traced[1].experimental_get_tracing_count()


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def make_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    loss_fn: LossFn,
    *,
    strategy: tf.distribute.Strategy | None = None,
    bn_decay: float | None = None,
    bn_averaging: str = "debias",
    sync_bn: bool = False,
    bn_audit: str = "warn",
    gradient_transform: GradientTransform | None = None,
    own_bn: bool = True,
    jit_compile: bool = False,
) -> TrainStep:
    """Builds a train step that owns the batch-norm statistics of `model`.

    Args:
      model: any `keras.Model`, built under `strategy.scope()` if distributed.
      optimizer: a Keras 3 optimizer (it sums gradients across replicas).
      loss_fn: `loss_fn(labels, logits)` returning *per-example* losses; the
        step averages them over the global batch and adds `model.losses`.
      strategy: a `tf.distribute.Strategy`; None means the current one.
      bn_decay: decay of every BN moving average; None keeps each layer's
        `momentum`.
      bn_averaging: `debias` (default; the statistics equal the first batch's
        after one step and are unbiased after any number), `ramp` (TF's
        `num_updates` schedule) or `plain` (stock Keras). See
        `tfloop.bn.averaging._effective_decay`.
      sync_bn: normalize with global-batch statistics in the forward pass
        (one all-reduce per BN layer), for small per-replica batches. The
        moving statistics are global-batch ones either way.
      bn_audit: `warn`, `error` or `off`: what to do when, on the first step,
        some BN layer reported no batch moments (so it would never learn).
      gradient_transform: a function of the list of (gradient, variable)
        pairs, applied to the all-reduced (global) gradients, e.g. clipping.
      own_bn: False leaves BN to Keras (stock behaviour: statistics assigned
        in `call`, per replica, with constant momentum). Only for comparisons
        and benchmarks; the `bn_*` and `sync_bn` arguments then do nothing.
      jit_compile: compile the per-replica step with XLA (one replica only).
        Off by default: on CPU it does not pay (`benchmarks/README.md`).

    Returns:
      A `TrainStep`; `step(element)` returns `loss`, `data_loss` and `top1`.
    """
    return TrainStep(
        model=model,
        optimizer=optimizer,
        loss_fn=loss_fn,
        strategy=strategy,
        bn_decay=bn_decay,
        bn_averaging=bn_averaging,
        sync_bn=sync_bn,
        bn_audit=bn_audit,
        gradient_transform=gradient_transform,
        own_bn=own_bn,
        jit_compile=jit_compile,
    )


class EvalStep:
    """Sums of loss, top-1 hits and examples over one batch; changes nothing."""

    def __init__(
        self, *, model: keras.Model, loss_fn: LossFn, strategy: tf.distribute.Strategy
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.strategy = strategy
        self._function = tf.function(self._step)

    def replica_fn(self, images: tf.Tensor, labels: tf.Tensor) -> dict[str, tf.Tensor]:
        """Sums over this replica's shard (any size, empty included)."""
        logits = self.model(images, training=False)
        loss_sum = tf.reduce_sum(self.loss_fn(labels, logits))
        correct, count = _correct_and_count(labels, logits)
        return {"loss_sum": loss_sum, "correct": correct, "count": count}

    def _step(self, element) -> dict[str, tf.Tensor]:
        return _run_and_sum(self.strategy, self.replica_fn, element)

    def __call__(self, element) -> dict[str, tf.Tensor]:
        return self._function(element)


def make_eval_step(
    model: keras.Model,
    loss_fn: LossFn,
    *,
    strategy: tf.distribute.Strategy | None = None,
) -> EvalStep:
    """Builds an eval step: `training=False`, returns sums that reduce exactly.

    `step(element)` returns `loss_sum`, `correct` and `count`; add them over a
    validation set (final partial batch included) or use `tfloop.evaluate`.
    """
    return EvalStep(
        model=model, loss_fn=loss_fn, strategy=strategy or tf.distribute.get_strategy()
    )


def evaluate(eval_step: EvalStep, dataset) -> dict[str, float]:
    """Runs `eval_step` over a (distributed) dataset; returns `loss` and `top1`."""
    # Summed on the device in float64: no host sync per batch, and exact
    # counts however large the validation set.
    totals = {
        key: tf.constant(0.0, tf.float64) for key in ("loss_sum", "correct", "count")
    }
    for element in dataset:
        for key, value in eval_step(element).items():
            totals[key] += tf.cast(value, tf.float64)
    totals = {key: float(value) for key, value in totals.items()}
    if totals["count"] == 0:
        raise ValueError("`dataset` yielded no examples to evaluate.")
    return {
        "loss": totals["loss_sum"] / totals["count"],
        "top1": totals["correct"] / totals["count"],
    }
