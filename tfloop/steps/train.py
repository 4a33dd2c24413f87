"""The train step: explicit tape, explicit `training`, BN owned by the step."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf
from absl import logging

from tfloop import bn, nonfinite
from tfloop.bn import audit, averaging, ownership
from tfloop.steps.batch import LossFn, _as_tensors, _correct_and_count, _per_example
from tfloop.steps.metrics import _metrics, _run_and_reduce
from tfloop.steps.strategy import _strategy_for

GradientTransform = Callable[
    [Sequence[tuple[tf.Tensor, tf.Variable]]], list[tuple[tf.Tensor, tf.Variable]]
]

_AUDIT_MODES = ("warn", "error", "off")


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
        on_nonfinite: str | None = None,
        jit_compile: bool = False,
        worker_batches: bool = False,
    ):
        _check_choice("bn_averaging", bn_averaging, averaging.AVERAGING_MODES)
        _check_choice("bn_audit", bn_audit, _AUDIT_MODES)
        if on_nonfinite is not None:
            _check_choice("on_nonfinite", on_nonfinite, nonfinite.MODES)
        self.on_nonfinite = on_nonfinite
        if bn_decay is not None and not 0.0 <= bn_decay < 1.0:
            raise ValueError(f"`bn_decay` must be in [0, 1), got {bn_decay!r}.")
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "`optimizer` must be a Keras 3 optimizer, got "
                f"{type(optimizer).__name__}."
            )
        strategy = _strategy_for(model, strategy)
        if jit_compile and strategy.num_replicas_in_sync > 1:
            raise ValueError(
                "`jit_compile=True` needs a single replica: the optimizer's "
                "cross-replica update cannot be compiled by XLA; got "
                f"{strategy.num_replicas_in_sync} replicas."
            )
        self.model = model
        self.optimizer = _with_loss_scaling(model, optimizer, strategy)
        self.loss_fn = loss_fn
        self.strategy = strategy
        self._bn_decay = bn_decay
        self._bn_averaging = bn_averaging
        self._sync_bn = sync_bn
        self._bn_audit = bn_audit
        self._gradient_transform = gradient_transform
        self.worker_batches = worker_batches
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
        if model.built and not self.optimizer.built:
            # Slots now, not in the first trace: a `tf.function` that creates
            # variables is traced twice, which doubles the first step's time.
            with strategy.scope():
                self.optimizer.build(model.trainable_variables)
        self._layers = None  # Flattened once, for `_trace_key`.
        self._traced_key = None
        # Traced functions by name ("step", "loop"), with the `_trace_key`
        # they were traced for.
        self._functions: dict[str, tuple[tuple, Callable]] = {}
        self._silent: list[str] = []
        self._silent_token = None  # Set by the first replica that audits a trace.
        self._defer_audit_errors = False

    def replica_fn(
        self,
        images: tf.Tensor,
        labels: tf.Tensor,
        sample_weight: tf.Tensor | None = None,
    ) -> dict[str, tf.Tensor]:
        """One step on this replica's shard; returns its share of the metrics.

        Every output is this replica's share of a sum over replicas: `loss`
        and `data_loss` (shares of the global-batch mean), `correct` and
        `count` (top-1 hits and examples, weighted by `sample_weight` if
        given). Turn them into metrics with `tfloop.reduce_metrics`.

        The data loss is sum(sample_weight * per-example loss) over the global
        batch divided by the global number of examples (Keras'
        `sum_over_batch_size`), counted exactly even when the batch does not
        split evenly over the replicas or a shard is empty.
        """
        self._traced_key = self._trace_key()
        images, labels, sample_weight = _as_tensors(images, labels, sample_weight)
        model = self.model
        collector = ownership._Collector(sync=self._sync_bn)
        with collector, tf.GradientTape() as tape:
            logits = model(images, training=True)
            per_example = _per_example(self.loss_fn, labels, logits, sample_weight)
            # One all-reduce: every BN layer's moments and the example count.
            reported, (examples,) = averaging._collect(
                self._owned, collector, [tf.shape(per_example)[0]]
            )
            data_loss = tf.math.divide_no_nan(
                tf.reduce_sum(per_example), tf.cast(examples, tf.float32)
            )
            loss = data_loss
            if model.losses:
                loss += tf.nn.scale_regularization_loss(
                    tf.cast(tf.add_n(model.losses), tf.float32)
                )
            scaled_loss = self.optimizer.scale_loss(loss)
        audit._check_honoured(collector)
        self._audit(audit._silent_layers(self._owned, collector))
        variables = model.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        grads_and_vars = list(zip(gradients, variables))
        if self._gradient_transform is not None:
            grads_and_vars = self._transform(grads_and_vars)
        flags, finite = self._nonfinite_flags(loss, grads_and_vars, reported)
        # Statistics describe the weights that produced them: both updates
        # come from this forward pass, or (a non-finite step) neither.
        averaging._apply_updates(
            reported,
            decay=self._bn_decay,
            averaging=self._bn_averaging,
            finite=finite,
        )
        nonfinite.apply_if(finite, self.optimizer, grads_and_vars)
        correct, count = _correct_and_count(labels, logits, sample_weight)
        return {
            "loss": loss,
            "data_loss": data_loss,
            "correct": correct,
            "count": count,
            **flags,
        }

    def _nonfinite_flags(self, loss, grads_and_vars, reported):
        """`on_nonfinite`'s flags and all-replica finiteness; ({}, None) without it.

        BN moments are checked after the fused reduction (global values). A
        `LossScaleOptimizer` expects overflowing scaled gradients now and then
        and skips those steps itself while it lowers the scale, so under it
        only the loss and the BN moments are checked here.
        """
        if self.on_nonfinite is None:
            return {}, None
        gradients = [g for g, _ in grads_and_vars]
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            gradients = []
        moments = [t for m in reported.moments for t in (m.mean, m.variance)]
        return nonfinite.step_flags(loss, gradients, moments)

    def _audit(self, silent: list[str]) -> None:
        """Runs at trace time: reports BN layers that reported no moments.

        Once per trace, not once per replica. With `bn_audit='error'` the
        error is raised by `step(...)` before the first step runs; inside a
        user's own `tf.function` it is raised at trace time, where AutoGraph
        may wrap it (see `make_train_step`).
        """
        first = self._silent_token is None
        self._silent_token = object()
        self._silent = silent
        if not silent or self._bn_audit == "off" or not first:
            return
        if self._bn_audit == "warn":
            logging.warning(audit._audit_message(silent))
        elif not self._defer_audit_errors:
            raise bn.BatchNormAuditError(audit._audit_message(silent))

    def _transform(self, grads_and_vars):
        """Applies the gradient transform to the *global* (all-reduced) gradients.

        The Keras optimizer sums gradients across replicas itself, so the
        transformed global gradient is handed back divided by the number of
        replicas: its sum over replicas is the transformed gradient. Under
        loss scaling the transform sees unscaled gradients (the scale is a
        power of two, so unscaling and scaling back are exact).
        """
        context = tf.distribute.get_replica_context()
        replicas = 1 if context is None else context.num_replicas_in_sync
        if replicas > 1:
            present = [(g, v) for g, v in grads_and_vars if g is not None]
            summed = context.all_reduce(
                tf.distribute.ReduceOp.SUM, [g for g, _ in present]
            )
            grads_and_vars = [(g, v) for g, (_, v) in zip(summed, present)]
        scale = self.optimizer.scale_loss(tf.constant(1.0))
        grads_and_vars = [
            (None if g is None else g / tf.cast(scale, g.dtype), v)
            for g, v in grads_and_vars
        ]
        grads_and_vars = self._gradient_transform(grads_and_vars)
        return [
            (None if g is None else g * tf.cast(scale / replicas, g.dtype), v)
            for g, v in grads_and_vars
        ]

    def _step(self, element) -> dict[str, tf.Tensor]:
        return _metrics(
            _run_and_reduce(
                self.strategy,
                self._replica_body,
                element,
                worker_local=self.worker_batches,
            )
        )

    def _trace_key(self) -> tuple:
        """What a traced step depends on besides its inputs: trainability, freezes.

        Any change to which layers train (`layer.trainable`, `bn.freeze`)
        changes the set of trained variables and of updated statistics; a
        traced graph would silently keep the old ones.
        """
        if self._layers is None:
            self._layers = list(
                self.model._flatten_layers(include_self=True, recursive=True)
            )
        return tuple(layer.trainable for layer in self._layers) + tuple(
            s.frozen for _, s in self._owned
        )

    @property
    def needs_retrace(self) -> bool:
        """True when trainability or BN freezing changed since `replica_fn` was traced.

        `step(...)` traces again by itself. A trainer that wraps `replica_fn`
        in its own `tf.function` (Orbit, multi-step loops) must check this
        after changing `trainable` or calling `bn.freeze`, and build a new
        `tf.function` when it is True.
        """
        return self._traced_key is not None and self._traced_key != self._trace_key()

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
          The last step's `loss`, `data_loss` and `top1`; `top1_sum`, the
          sum of `top1` over the applied steps (for the mean training
          accuracy); `nonfinite_steps`, how many steps were not applied
          (`on_nonfinite`), `nonfinite_first`, the first of them (1 = this
          call's first step; 0: none), and its non-finite flags (all 0 when
          every step was applied). Nothing here is read on the host: a loop
          can pass them to `tfloop.nonfinite.Tally` and go on.
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
        keys = ["loss", "data_loss", "top1"]
        flag_keys = list(nonfinite.KEYS) if self.on_nonfinite is not None else []
        keys += flag_keys
        metrics = dict.fromkeys(keys, zero)
        first_flags = dict.fromkeys(flag_keys, zero)
        first = tf.constant(0, tf.int32)
        top1_sum = skipped = zero
        for index in tf.range(num_steps):
            metrics = {k: v for k, v in self._step(next(iterator)).items() if k in keys}
            bad = nonfinite.is_nonfinite(metrics)
            is_first = tf.logical_and(first == 0, bad > 0)
            first_flags = {
                k: tf.where(is_first, metrics[k], first_flags[k]) for k in flag_keys
            }
            first = tf.where(is_first, index + 1, first)
            top1_sum += (1.0 - bad) * metrics["top1"]
            skipped += bad
        return {
            **metrics,
            **first_flags,
            "top1_sum": top1_sum,
            "nonfinite_steps": skipped,
            "nonfinite_first": first,
        }

    def _traced(self, name: str, python_fn: Callable, *args) -> Callable:
        """The `tf.function` of `python_fn`, traced for `args` if not yet.

        A change of trainability or BN freezing after tracing (`_trace_key`)
        changes what the graph must do: trace again rather than silently
        ignore it. Tracing before running lets `bn_audit="error"` stop the
        first step before it changes anything, with a plain exception.
        """
        key = self._trace_key()
        traced = self._functions.get(name)
        if traced is not None and traced[0] == key:
            return traced[1]
        function = tf.function(python_fn)
        self._functions[name] = (key, function)
        self._silent_token = None
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


def _with_loss_scaling(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy,
) -> keras.optimizers.Optimizer:
    """Wraps `optimizer` in a `LossScaleOptimizer` for float16 models, as `compile` does.

    float16 gradients underflow without loss scaling; bfloat16 has float32's
    range and needs none.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer
    float16 = [
        layer.path
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if layer.dtype_policy.compute_dtype == "float16"
    ]
    if not float16:
        return optimizer
    logging.info(
        "Layers compute in float16 (e.g. `%s`): wrapping the optimizer in "
        "keras.mixed_precision.LossScaleOptimizer, as model.compile does.",
        float16[0],
    )
    with strategy.scope():
        return keras.mixed_precision.LossScaleOptimizer(optimizer)


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
    on_nonfinite: str | None = None,
    jit_compile: bool = False,
    worker_batches: bool = False,
) -> TrainStep:
    """Builds a train step that owns the batch-norm statistics of `model`.

    Args:
      model: any `keras.Model`, built under `strategy.scope()` if distributed.
        float16 / bfloat16 mixed precision and float64 models train as well.
      optimizer: a Keras 3 optimizer (it sums gradients across replicas). If
        the model computes in float16 it is wrapped in a
        `keras.mixed_precision.LossScaleOptimizer`, as `model.compile` does
        (`step.optimizer` is then the wrapper: checkpoint that one); the step
        scales the loss inside the tape (`optimizer.scale_loss`).
      loss_fn: `loss_fn(labels, logits)` returning *per-example* losses (a
        scalar is refused); logits reach it in float32. The step averages
        them over the true global batch, however it splits over replicas,
        and adds `model.losses`.
      strategy: a `tf.distribute.Strategy`; None means the current one, or
        else the one the model's variables were created under.
      bn_decay: decay of every BN moving average; None keeps each layer's
        `momentum`.
      bn_averaging: `debias` (default; the statistics equal the first batch's
        after one step and are unbiased after any number), `ramp` (TF's
        `num_updates` schedule) or `plain` (stock Keras). Statistics that do
        not equal the initializer's when a layer has never been updated
        (restored, pretrained, from `model.fit`) count as a long history in
        every mode: the first step keeps them with weight `decay`. See
        `tfloop.bn.averaging._effective_decay`.
      sync_bn: normalize with global-batch statistics in the forward pass
        (one all-reduce per BN layer), for small per-replica batches; layers
        built with `synchronized=True` get this whatever `sync_bn` says. The
        moving statistics are global-batch ones either way.
      bn_audit: `warn`, `error` or `off`: what to do when, on the first step,
        some BN layer reported no batch moments (so it would never learn).
        The error is a `tfloop.bn.BatchNormAuditError`, also when raised
        while a user's own `tf.function` traces `replica_fn`.
      gradient_transform: a function of the list of (gradient, variable)
        pairs, applied to the all-reduced (global), unscaled gradients, e.g.
        clipping.
      own_bn: False leaves BN to Keras (stock behaviour: statistics assigned
        in `call`, per replica, with constant momentum). Only for comparisons
        and benchmarks; the `bn_*` and `sync_bn` arguments then do nothing.
      on_nonfinite: None (default) applies every step. `stop` or `skip`: a
        step whose loss, gradients or BN batch moments hold a NaN or Inf on
        any replica changes nothing (no weight, optimizer slot, `iterations`
        or BN statistic) and reports it in `nonfinite_loss`,
        `nonfinite_gradients` and `nonfinite_bn` (replicas that saw it; BN
        moments are checked after the reduction, so every replica sees them);
        `tfloop.nonfinite.check_step` stops or counts (`tfloop.nonfinite`).
      jit_compile: compile the per-replica step with XLA (one replica only).
        Off by default: on CPU it does not pay (`benchmarks/README.md`).
      worker_batches: elements that are not distributed are this worker's
        own batch (each worker reads its own files, with its share of the
        global batch), split over this worker's replicas only; by default
        they are the global batch, which every worker reads and which is
        split over all replicas. Either way the loss is the mean over the
        global batch and BN statistics are global-batch ones (one fused
        all-reduce counts the examples of every replica).

    Dataset elements are `(images, labels)` or `(images, labels,
    sample_weight)`; labels may be sparse `(B,)`, `(B, 1)` or one-hot.

    Returns:
      A `TrainStep`; `step(element)` returns `loss`, `data_loss` and `top1`.
      It traces again by itself when any layer's `trainable` changes or
      `bn.freeze` is called; a trainer with its own `tf.function` around
      `step.replica_fn` must check `step.needs_retrace`.
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
        on_nonfinite=on_nonfinite,
        jit_compile=jit_compile,
        worker_batches=worker_batches,
    )
