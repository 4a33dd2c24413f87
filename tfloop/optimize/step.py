"""`optimize_loss`: a tfloop train step configured like TF1's `optimize_loss`.

The argument-by-argument mapping from `tf.contrib.layers.optimize_loss` and
slim's `create_train_op` is in the package docstring (`tfloop.optimize`). This
module checks the arguments and assembles the step: the optimizer
(`optimizer`), the gradient knobs (`gradients`), the loss check
(`finite_loss`), and `OptimizeLossStep`, which adds the loss check and the
`loss` and `learning_rate` summaries to the core `TrainStep`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import keras
import tensorflow as tf

from tfloop import steps
from tfloop.optimize.finite_loss import _LOSS_MESSAGE, _checked_loss_fn
from tfloop.optimize.gradients import GradsAndVars, _check_clip, _GradientPipeline
from tfloop.optimize.multipliers import _resolve_multipliers
from tfloop.optimize.optimizer import Schedule, _make_optimizer
from tfloop.optimize.summary_tags import _GRADIENT_SUMMARIES, _check_summaries

__all__ = ["OptimizeLossStep", "optimize_loss"]


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
