"""`optimize_loss`: the knobs of TF1's `optimize_loss` and slim's `create_train_op`.

Why this module exists: TF1 code configured training with
`tf.contrib.layers.optimize_loss` or `slim.learning.create_train_op`, which
turned a loss tensor into a train op with gradient clipping, multipliers,
noise, learning-rate decay and summaries. Neither exists in TF 2. This module
gives the same knobs on top of `tfloop.steps.TrainStep`, so the step
still owns the batch-norm statistics and works under a `tf.distribute`
strategy. Every gradient knob acts on the *all-reduced, global* gradients
(through the step's `gradient_transform`), so clipping by norm under
`MirroredStrategy` clips the same vector a one-device run clips.

Original argument -> counterpart here ("same" = same name):

============================  ==================  ====================================
`optimize_loss` (contrib) /   here                difference
`create_train_op` (slim)
============================  ==================  ====================================
`loss` / `total_loss`         `model`+`loss_fn`   the step computes the global-batch
                                                  mean loss (+ `model.losses`)
`global_step`                 `step.global_step`  = `optimizer.iterations`: drives
                                                  schedules and the summary step
`learning_rate`               same                float or Keras schedule (no
                                                  Tensor); None with an instance
`optimizer`                   same                names -> Keras classes
                                                  (`OPTIMIZER_CLS_NAMES`), Keras
                                                  update rules and epsilons
`learning_rate_decay_fn`      same                wrapped into a Keras schedule,
                                                  evaluated every step
`clip_gradients`              same                float: `tf.clip_by_global_norm`,
                                                  or a callable on the pairs
`clip_gradient_norm` (slim)   same                per-tensor `tf.clip_by_norm`,
                                                  after `clip_gradients`
`gradient_multipliers`        same                keys: path, unique name, ref, or
                                                  (variable, m) pairs; unknown keys
                                                  raise instead of being skipped
`gradient_noise_scale`        same                same noise, seeded by the step so
                                                  all replicas add the same noise
`summaries` /                 `summaries`         None writes none (contrib wrote
`summarize_gradients` (slim)                      loss, rate, global norm)
`check_numerics` (slim)       same                the loss is checked *before* the
                                                  weights change
`increment_global_step`       same                True only; Keras always counts
`update_ops`                  not needed          the step owns BN statistics
`variables` /                 not needed          `model.trainable_variables`; freeze
`variables_to_train`                              with `layer.trainable = False`
`moving_average_decay`        Keras `use_ema`     `keras.optimizers.SGD(...,
(slim train scripts)                              use_ema=True, ema_momentum=d)`
`colocate_gradients_with_ops` n/a                 TF1 graph placement
`gate_gradients`,             n/a                 TF1 graph-building options
`aggregation_method`, `name`
============================  ==================  ====================================
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import keras
import tensorflow as tf

from tfloop import steps

__all__ = [
    "OPTIMIZER_CLS_NAMES",
    "OPTIMIZER_SUMMARIES",
    "OptimizeLossStep",
    "optimize_loss",
]

GradsAndVars = list[tuple[Any, Any]]
Schedule = keras.optimizers.schedules.LearningRateSchedule

#: Optimizer names, as in `tf.contrib.layers.OPTIMIZER_CLS_NAMES`, mapped to
#: Keras 3 factories `f(learning_rate=...)`. `Momentum` keeps contrib's choice
#: of momentum 0.9 (TF1's `MomentumOptimizer` itself had no default); for
#: another value pass `keras.optimizers.SGD(lr, momentum=m)`. Keras' momentum
#: applies the learning rate before accumulating, which differs from
#: `tf.compat.v1.train.MomentumOptimizer` only while the rate changes.
OPTIMIZER_CLS_NAMES: dict[str, Callable[..., keras.optimizers.Optimizer]] = {
    "SGD": keras.optimizers.SGD,
    "Momentum": functools.partial(keras.optimizers.SGD, momentum=0.9),
    "Adam": keras.optimizers.Adam,
    "AdamW": keras.optimizers.AdamW,
    "RMSProp": keras.optimizers.RMSprop,
    "Adagrad": keras.optimizers.Adagrad,
    "Ftrl": keras.optimizers.Ftrl,
}

#: What `summaries` may ask for (optimize_loss's `OPTIMIZER_SUMMARIES`). Tags:
#: `loss`, `learning_rate`, `gradients/<path>` (histograms),
#: `gradient_norm/<path>`, and `global_norm/gradient_norm` (before clipping)
#: plus `global_norm/clipped_gradient_norm` (when clipping).
OPTIMIZER_SUMMARIES = (
    "loss",
    "learning_rate",
    "gradients",
    "gradient_norm",
    "global_gradient_norm",
)
_GRADIENT_SUMMARIES = frozenset({"gradients", "gradient_norm", "global_gradient_norm"})

_LOSS_MESSAGE = "tfloop.optimize_loss: the loss is inf or nan"


# --- Learning rate and optimizer -------------------------------------------


class _DecayFnSchedule(Schedule):
    """`learning_rate_decay_fn(lr, global_step)` as a Keras schedule.

    Keras calls the schedule with `optimizer.iterations` on every step, which
    is what optimize_loss did with `global_step` once per graph. Not
    serializable (`get_config` raises), since it wraps a Python function.
    """

    def __init__(self, learning_rate: float | Schedule, decay_fn: Callable):
        self.learning_rate = learning_rate
        self.decay_fn = decay_fn

    def __call__(self, step):
        if isinstance(self.learning_rate, Schedule):
            base = self.learning_rate(step)
        else:
            base = tf.constant(self.learning_rate, tf.float32)
        value = self.decay_fn(base, tf.convert_to_tensor(step))
        if callable(value):  # `tf.compat.v1.train.*_decay` when run eagerly.
            value = value()
        return tf.cast(value, tf.float32)


def _check_learning_rate(learning_rate: Any) -> None:
    if isinstance(learning_rate, bool) or not isinstance(
        learning_rate, (int, float, Schedule)
    ):
        raise TypeError(
            "`learning_rate` must be a float or a keras LearningRateSchedule, "
            f"got {type(learning_rate).__name__}."
        )
    if not isinstance(learning_rate, Schedule) and learning_rate < 0:
        raise ValueError(f"`learning_rate` must be >= 0, got {learning_rate!r}.")


def _optimizer_factory(optimizer: Any) -> tuple[Callable, bool]:
    """The factory for a name, class or function; True if it takes the rate by position."""
    if isinstance(optimizer, str):
        factories = {name.lower(): f for name, f in OPTIMIZER_CLS_NAMES.items()}
        factory = factories.get(optimizer.lower())
        if factory is None:
            raise ValueError(
                f"`optimizer` name {optimizer!r} is unknown; use one of "
                f"{list(OPTIMIZER_CLS_NAMES)}, a Keras optimizer class or instance."
            )
        return factory, False
    if isinstance(optimizer, type) and issubclass(
        optimizer, keras.optimizers.Optimizer
    ):
        return optimizer, False
    if callable(optimizer) and not isinstance(optimizer, type):
        return optimizer, True  # optimize_loss's `lambda lr: Optimizer(lr, ...)`.
    raise TypeError(
        "`optimizer` must be a name, a keras.optimizers.Optimizer class, "
        f"instance or factory, got {optimizer!r}."
    )


def _make_optimizer(
    optimizer: Any,
    learning_rate: float | Schedule | None,
    decay_fn: Callable | None,
    strategy: tf.distribute.Strategy,
) -> keras.optimizers.Optimizer:
    """Checks an optimizer instance, or builds one under `strategy.scope()`.

    The scope matters: a Keras optimizer binds to the strategy current at its
    construction, and its slot variables must be mirrored like the model's.
    """
    if isinstance(optimizer, keras.optimizers.Optimizer):
        if learning_rate is not None or decay_fn is not None:
            # optimize_loss silently ignored `learning_rate` here; refuse
            # rather than guess which of the two rates the caller meant.
            raise ValueError(
                "`learning_rate` and `learning_rate_decay_fn` must be None when "
                "`optimizer` is an optimizer instance; give the instance the rate "
                "or schedule."
            )
        return optimizer
    factory, positional = _optimizer_factory(optimizer)
    rate = learning_rate
    if learning_rate is None:
        if decay_fn is not None:
            raise ValueError("`learning_rate_decay_fn` needs a `learning_rate`.")
        if not positional:
            raise ValueError(
                f"`learning_rate` is required when `optimizer` is {optimizer!r}."
            )
    else:
        _check_learning_rate(learning_rate)
        if decay_fn is not None:
            rate = _DecayFnSchedule(learning_rate, decay_fn)
    with strategy.scope():
        if rate is None:
            built = factory()
        elif positional:
            built = factory(rate)
        else:
            built = factory(learning_rate=rate)
    if not isinstance(built, keras.optimizers.Optimizer):
        raise TypeError(
            f"`optimizer` factory returned {type(built).__name__}, not a "
            "keras.optimizers.Optimizer."
        )
    return built


# --- Gradient transforms ---------------------------------------------------


def _map_values(gradient: Any, fn: Callable[[tf.Tensor], tf.Tensor]) -> Any:
    """Applies `fn` to a dense gradient or to the values of an `IndexedSlices`."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(
            fn(gradient.values), gradient.indices, gradient.dense_shape
        )
    return fn(gradient)


def _check_gradient(gradient: Any, variable: Any) -> Any:
    if gradient is None:
        return None
    message = f"tfloop.optimize_loss: gradient of `{variable.path}` is inf or nan"
    return _map_values(
        gradient, functools.partial(tf.debugging.check_numerics, message=message)
    )


def _scale(gradient: Any, multiplier: Any) -> Any:
    if gradient is None or multiplier is None:
        return gradient

    def scale(values: tf.Tensor) -> tf.Tensor:
        return values * tf.cast(multiplier, values.dtype)

    return _map_values(gradient, scale)


def _values(gradient: Any) -> tf.Tensor:
    return gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient


def _matches(key: Any, variables: Sequence[Any]) -> list[Any]:
    """The variables a `gradient_multipliers` key names."""
    if isinstance(key, str):
        name = key.removesuffix(":0")  # TF1 habit: "dense/kernel:0".
        by_path = [v for v in variables if v.path == name]
        return by_path or [v for v in variables if v.name == name]
    target = key.deref() if hasattr(key, "deref") else key
    return [v for v in variables if v is target or getattr(v, "value", None) is target]


def _describe(key: Any) -> str:
    """A short name for a multiplier key (a variable's repr prints its values)."""
    if isinstance(key, str):
        return key
    target = key.deref() if hasattr(key, "deref") else key
    return str(
        getattr(target, "path", None) or getattr(target, "name", type(key).__name__)
    )


def _resolve_multipliers(multipliers: Any, variables: Sequence[Any]) -> dict[int, Any]:
    """Maps `id(variable)` to its multiplier; every key must name exactly one variable.

    Unlike optimize_loss, which skipped unknown keys, a key that names no
    trainable variable raises: a typo would otherwise silently train that
    variable at the normal rate.
    """
    items = multipliers.items() if isinstance(multipliers, Mapping) else multipliers
    resolved: dict[int, Any] = {}
    for key, value in items:
        found = _matches(key, variables)
        if not found:
            raise ValueError(
                f"`gradient_multipliers` key {_describe(key)!r} names no trainable "
                "variable of the model."
            )
        if len(found) > 1:
            raise ValueError(
                f"`gradient_multipliers` key {key!r} names {len(found)} variables "
                f"({', '.join(v.path for v in found)}); use the variable path."
            )
        if id(found[0]) in resolved:
            raise ValueError(
                f"`gradient_multipliers` names `{found[0].path}` more than once."
            )
        resolved[id(found[0])] = value
    return resolved


class _GradientPipeline:
    """The `gradient_transform` of an optimize_loss step, in optimize_loss's order.

    check numerics -> noise -> multipliers -> `clip_gradients` ->
    `clip_gradient_norm` -> summaries. It runs in replica context on the
    all-reduced gradients, identical on every replica; summaries are recorded
    by replica 0 only (TF's default inside `strategy.run`).
    """

    def __init__(
        self,
        *,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        check_numerics: bool,
        noise_scale: float | None,
        multipliers: Any,
        clip_gradients: float | Callable | None,
        clip_gradient_norm: float,
        summaries: frozenset[str],
    ):
        self.model = model
        self.optimizer = optimizer
        self.check_numerics = check_numerics
        self.noise_scale = noise_scale
        self.multipliers = multipliers
        self.clip_gradients = clip_gradients
        self.clip_gradient_norm = clip_gradient_norm
        self.summaries = summaries
        # Noise is stateless, seeded by (seed + variable index, step): every
        # replica adds the same noise, so the global update matches one device.
        # Drawn from Python's `random`, which `keras.utils.set_random_seed` seeds.
        self.seed = random.getrandbits(31)

    # Plain Python control flow only: nothing for AutoGraph to convert.
    @tf.autograph.experimental.do_not_convert
    def __call__(self, grads_and_vars: Sequence[tuple[Any, Any]]) -> GradsAndVars:
        grads_and_vars = list(grads_and_vars)
        # Read before `apply_gradients` increments it: the step being taken.
        step = tf.convert_to_tensor(self.optimizer.iterations)  # int64
        if self.check_numerics:
            grads_and_vars = [(_check_gradient(g, v), v) for g, v in grads_and_vars]
        if self.noise_scale is not None:
            grads_and_vars = self._add_noise(grads_and_vars, step)
        if self.multipliers is not None:
            resolved = _resolve_multipliers(
                self.multipliers, self.model.trainable_variables
            )
            grads_and_vars = [
                (_scale(g, resolved.get(id(v))), v) for g, v in grads_and_vars
            ]
        gradients = [g for g, _ in grads_and_vars]
        variables = [v for _, v in grads_and_vars]
        norm = tf.linalg.global_norm(gradients)
        if isinstance(self.clip_gradients, (int, float)):
            gradients, _ = tf.clip_by_global_norm(
                gradients, self.clip_gradients, use_norm=norm
            )
        elif self.clip_gradients is not None:
            clipped = self.clip_gradients(list(zip(gradients, variables)))
            gradients, variables = [g for g, _ in clipped], [v for _, v in clipped]
        if self.clip_gradient_norm > 0:
            gradients = [
                None if g is None else tf.clip_by_norm(g, self.clip_gradient_norm)
                for g in gradients
            ]
        grads_and_vars = list(zip(gradients, variables))
        self._write_summaries(grads_and_vars, norm, step)
        return grads_and_vars

    def _add_noise(self, grads_and_vars: GradsAndVars, step: tf.Tensor) -> GradsAndVars:
        """optimize_loss's noise: truncated normal times the scale (not relative to g)."""
        # A variable's position in the model, not in `grads_and_vars` (which
        # drops gradient-less variables under a strategy only), picks its stream.
        index = {id(v): i for i, v in enumerate(self.model.trainable_variables)}
        noisy = []
        for g, v in grads_and_vars:
            if g is not None:
                g = tf.convert_to_tensor(g)  # IndexedSlices: dense, as optimize_loss.
                key = tf.constant(self.seed + index[id(v)], tf.int64)
                noise = tf.random.stateless_truncated_normal(
                    tf.shape(g), seed=tf.stack([key, step]), dtype=g.dtype
                )
                g = g + self.noise_scale * noise
            noisy.append((g, v))
        return noisy

    def _write_summaries(
        self, grads_and_vars: GradsAndVars, norm: tf.Tensor, step: tf.Tensor
    ) -> None:
        if "global_gradient_norm" in self.summaries:
            tf.summary.scalar("global_norm/gradient_norm", norm, step=step)
            if self.clip_gradients is not None or self.clip_gradient_norm > 0:
                clipped = tf.linalg.global_norm([g for g, _ in grads_and_vars])
                tf.summary.scalar(
                    "global_norm/clipped_gradient_norm", clipped, step=step
                )
        for g, v in grads_and_vars:
            if g is None:
                continue
            if "gradients" in self.summaries:
                tf.summary.histogram(f"gradients/{v.path}", _values(g), step=step)
            if "gradient_norm" in self.summaries:
                tf.summary.scalar(
                    f"gradient_norm/{v.path}", tf.norm(_values(g)), step=step
                )


# --- Summaries -------------------------------------------------------------


def _check_summaries(summaries: Iterable[str] | None) -> frozenset[str]:
    if summaries is None:
        return frozenset()
    if isinstance(summaries, str):
        raise TypeError(
            f"`summaries` must be a list of names, got the string {summaries!r}."
        )
    summaries = frozenset(summaries)
    unknown = sorted(summaries - set(OPTIMIZER_SUMMARIES))
    if unknown:
        raise ValueError(
            f"`summaries` has unknown name(s) {unknown}; "
            f"use {list(OPTIMIZER_SUMMARIES)}."
        )
    return summaries


# --- The step --------------------------------------------------------------


@tf.custom_gradient
def _finite_loss(per_example: tf.Tensor):
    """Identity that raises on a non-finite loss *before* any weight update.

    A plain `check_numerics` is not ordered before the optimizer's writes in a
    `tf.function`; here the backward pass, hence every gradient, waits for it.
    """
    checked = tf.debugging.check_numerics(per_example, _LOSS_MESSAGE)

    def grad(upstream):
        with tf.control_dependencies([checked]):
            return tf.identity(upstream)

    return checked, grad


def _checked_loss_fn(loss_fn: steps.LossFn) -> steps.LossFn:
    @functools.wraps(loss_fn)
    def checked_loss_fn(labels, logits):
        return _finite_loss(loss_fn(labels, logits))

    return checked_loss_fn


class OptimizeLossStep(steps.TrainStep):
    """A `TrainStep` that also checks the loss and writes scalar summaries.

    Built by `optimize_loss`. `replica_fn` works as the core's does (inside
    any `tf.function` and replica context); summaries go to the default
    `tf.summary` writer that is active when the step is *traced* (the first
    call), with step = `optimizer.iterations` before the update.

    Args:
      check_loss: check the replica's loss with `tf.debugging.check_numerics`.
      scalar_summaries: which of `loss` and `learning_rate` to write.
      **kwargs: the `TrainStep` arguments (keyword-only).
    """

    def __init__(
        self, *, check_loss: bool, scalar_summaries: frozenset[str], **kwargs: Any
    ):
        super().__init__(**kwargs)
        self._check_loss = check_loss
        self._scalar_summaries = scalar_summaries

    @property
    def global_step(self) -> keras.Variable:
        """TF1's global step: `optimizer.iterations`, +1 per applied step."""
        return self.optimizer.iterations

    def replica_fn(
        self,
        images: tf.Tensor,
        labels: tf.Tensor,
        sample_weight: tf.Tensor | None = None,
    ) -> dict[str, tf.Tensor]:
        """The core step, then the loss check and `loss`/`learning_rate` summaries."""
        if self._scalar_summaries:
            # Reads ordered before the update: the rate and step being applied.
            step = tf.convert_to_tensor(self.optimizer.iterations)  # int64
            learning_rate = tf.convert_to_tensor(self.optimizer.learning_rate)
        metrics = super().replica_fn(images, labels, sample_weight)
        if self._check_loss:
            metrics["loss"] = tf.debugging.check_numerics(
                metrics["loss"], _LOSS_MESSAGE
            )
        if "loss" in self._scalar_summaries:
            # `loss` is this replica's share of the global mean; sum the shares.
            loss = metrics["loss"]
            context = tf.distribute.get_replica_context()
            if context is not None and context.num_replicas_in_sync > 1:
                loss = context.all_reduce(tf.distribute.ReduceOp.SUM, loss)
            tf.summary.scalar("loss", loss, step=step)
        if "learning_rate" in self._scalar_summaries:
            tf.summary.scalar("learning_rate", learning_rate, step=step)
        return metrics


def _check_clip(clip_gradients: Any, clip_gradient_norm: Any) -> None:
    if isinstance(clip_gradients, bool) or not (
        clip_gradients is None
        or callable(clip_gradients)
        or (isinstance(clip_gradients, (int, float)) and clip_gradients > 0)
    ):
        raise ValueError(
            "`clip_gradients` must be None, a positive float (global norm) or a "
            f"callable on (gradient, variable) pairs, got {clip_gradients!r}."
        )
    if isinstance(clip_gradient_norm, bool) or not (
        isinstance(clip_gradient_norm, (int, float)) and clip_gradient_norm >= 0
    ):
        raise ValueError(
            "`clip_gradient_norm` must be a float >= 0 (0 = off), "
            f"got {clip_gradient_norm!r}."
        )


def optimize_loss(
    model: keras.Model,
    loss_fn: steps.LossFn,
    *,
    learning_rate: float | Schedule | None,
    optimizer: str | type | Callable | keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy | None = None,
    clip_gradients: float | Callable[[GradsAndVars], GradsAndVars] | None = None,
    clip_gradient_norm: float = 0.0,
    gradient_multipliers: Mapping[Any, Any] | Iterable[tuple[Any, Any]] | None = None,
    gradient_noise_scale: float | None = None,
    check_numerics: bool = True,
    increment_global_step: bool = True,
    learning_rate_decay_fn: Callable[[tf.Tensor, tf.Tensor], Any] | None = None,
    summaries: Iterable[str] | None = None,
    **train_step_kwargs: Any,
) -> OptimizeLossStep:
    """Builds a tfloop train step configured like `optimize_loss` / `create_train_op`.

    Args:
      model: the `keras.Model` to train (built under `strategy.scope()` if
        distributed).
      loss_fn: `loss_fn(labels, logits)` returning per-example losses, as for
        `tfloop.steps.make_train_step`.
      learning_rate: a float, a `keras.optimizers.schedules.LearningRateSchedule`,
        or None when `optimizer` is an instance (which then owns its rate).
      optimizer: a name from `OPTIMIZER_CLS_NAMES` (case-insensitive), a Keras
        optimizer class, a factory `f(learning_rate) -> Optimizer`, or an
        instance (created under `strategy.scope()`).
      strategy: a `tf.distribute.Strategy`; None means the current one.
      clip_gradients: a float clips the global gradient norm
        (`tf.clip_by_global_norm`); a callable maps (gradient, variable) pairs
        to new pairs. Both see the all-reduced global gradients.
      clip_gradient_norm: if > 0, clips each gradient's own norm (slim's
        `clip_gradient_norms`), after `clip_gradients`.
      gradient_multipliers: {variable path or unique name or `tf.Variable.ref()`:
        multiplier}, or (variable, multiplier) pairs.
      gradient_noise_scale: adds `scale * truncated_normal(shape)` to each
        gradient (optimize_loss's noise; absolute, not relative to the
        gradient), the same on every replica.
      check_numerics: raise `InvalidArgumentError` when a per-example loss is
        inf or nan, before the weights or optimizer slots change (the backward
        pass waits for the check; only `optimizer.iterations`, which does not
        depend on the gradients, still advances), and check the step's total
        loss. When the step transforms gradients anyway (any
        gradient knob or gradient summary), the global gradients are checked
        too, before anything else touches them.
      increment_global_step: must be True. The global step is
        `optimizer.iterations`, which Keras increments on every applied step
        and which cannot be held back; TF1 code that passed False to avoid a
        double count should give each step its own optimizer.
      learning_rate_decay_fn: `fn(learning_rate, global_step) -> rate`, e.g.
        `lambda lr, step: tf.compat.v1.train.exponential_decay(lr, step, 1000,
        0.9)`; wrapped into a Keras schedule (global_step =
        `optimizer.iterations`). Composes with a schedule `learning_rate`.
      summaries: a subset of `OPTIMIZER_SUMMARIES`, written to the default
        `tf.summary` writer active when the step is traced, at step
        `optimizer.iterations` (before the update), by replica 0 only.
        `loss` is the global loss (one scalar all-reduce under a strategy).
      **train_step_kwargs: passed to `tfloop.steps.TrainStep` (`bn_decay`,
        `bn_averaging`, `sync_bn`, `bn_audit`, `own_bn`).

    Note: under a strategy, any gradient knob or gradient summary makes the
    step all-reduce the gradients itself (the core's `gradient_transform`
    contract), which the Keras optimizer's own reduction then repeats.

    Returns:
      An `OptimizeLossStep` (a `TrainStep`): `step(element)` runs one step.
    """
    if "gradient_transform" in train_step_kwargs:
        raise ValueError(
            "`gradient_transform` is built by optimize_loss; pass a callable as "
            "`clip_gradients` instead."
        )
    if not increment_global_step:
        raise ValueError(
            "`increment_global_step=False` is not supported: Keras always "
            "increments `optimizer.iterations`; give each step its own optimizer."
        )
    if gradient_noise_scale is not None and (
        isinstance(gradient_noise_scale, bool)
        or not isinstance(gradient_noise_scale, (int, float))
        or gradient_noise_scale <= 0
    ):
        raise ValueError(
            "`gradient_noise_scale` must be None or a float > 0, "
            f"got {gradient_noise_scale!r}."
        )
    _check_clip(clip_gradients, clip_gradient_norm)
    summaries = _check_summaries(summaries)
    strategy = strategy or tf.distribute.get_strategy()
    optimizer = _make_optimizer(
        optimizer, learning_rate, learning_rate_decay_fn, strategy
    )
    if gradient_multipliers is not None and model.built:
        # Fail now on a bad key, not at the first call.
        _resolve_multipliers(gradient_multipliers, model.trainable_variables)
    transform = None
    if (
        gradient_noise_scale is not None
        or gradient_multipliers is not None
        or clip_gradients is not None
        or clip_gradient_norm > 0
        or summaries & _GRADIENT_SUMMARIES
    ):
        transform = _GradientPipeline(
            model=model,
            optimizer=optimizer,
            check_numerics=check_numerics,
            noise_scale=gradient_noise_scale,
            multipliers=gradient_multipliers,
            clip_gradients=clip_gradients,
            clip_gradient_norm=clip_gradient_norm,
            summaries=summaries,
        )
    return OptimizeLossStep(
        model=model,
        optimizer=optimizer,
        loss_fn=_checked_loss_fn(loss_fn) if check_numerics else loss_fn,
        strategy=strategy,
        gradient_transform=transform,
        check_loss=check_numerics,
        scalar_summaries=summaries & {"loss", "learning_rate"},
        **train_step_kwargs,
    )
