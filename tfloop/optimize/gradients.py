"""The gradient knobs of optimize_loss, applied to the all-reduced global gradients.

Why this module exists: `optimize_loss` and `create_train_op` transformed the
gradients (check, noise, multipliers, clipping, summaries) between
`compute_gradients` and `apply_gradients`. `_GradientPipeline` does the same
as the core step's `gradient_transform`, which sees the *global* gradients, so
clipping by norm under `MirroredStrategy` clips the vector a one-device run
clips.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf

from tfloop.optimize.multipliers import _resolve_multipliers

GradsAndVars = list[tuple[Any, Any]]


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
