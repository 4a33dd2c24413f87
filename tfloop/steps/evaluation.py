"""The eval step and `evaluate`: sums that reduce exactly, no variable changed."""

from __future__ import annotations

import itertools

import keras
import tensorflow as tf

from tfloop.steps.batch import LossFn, _as_tensors, _correct_and_count, _per_example
from tfloop.steps.metrics import _run_and_reduce
from tfloop.steps.strategy import _strategy_for


class EvalStep:
    """Sums of loss, top-1 hits and examples over one batch; changes nothing."""

    def __init__(
        self, *, model: keras.Model, loss_fn: LossFn, strategy: tf.distribute.Strategy
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.strategy = strategy
        self._function = tf.function(self._step)

    def replica_fn(
        self,
        images: tf.Tensor,
        labels: tf.Tensor,
        sample_weight: tf.Tensor | None = None,
    ) -> dict[str, tf.Tensor]:
        """Sums over this replica's shard (any size, empty included).

        With `sample_weight`, `loss_sum` and `correct` are weighted and
        `count` is the sum of the weights, so `evaluate` gives weighted means.
        """
        images, labels, sample_weight = _as_tensors(images, labels, sample_weight)
        logits = self.model(images, training=False)
        per_example = _per_example(self.loss_fn, labels, logits, sample_weight)
        correct, count = _correct_and_count(labels, logits, sample_weight)
        return {
            "loss_sum": tf.reduce_sum(per_example),
            "correct": correct,
            "count": count,
        }

    def _step(self, element) -> dict[str, tf.Tensor]:
        return _run_and_reduce(self.strategy, self.replica_fn, element)

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
        model=model, loss_fn=loss_fn, strategy=_strategy_for(model, strategy)
    )


def evaluate(
    eval_step: EvalStep, dataset, *, num_batches: int | None = None
) -> dict[str, float]:
    """Runs `eval_step` over a (distributed) dataset; returns `loss` and `top1`.

    `num_batches`: only the first that many batches (None: all).
    """
    totals = _totals(eval_step, itertools.islice(dataset, num_batches))
    if totals["count"] == 0:
        raise ValueError("`dataset` yielded no examples to evaluate.")
    return _means(totals)


def _totals(eval_step: EvalStep, elements) -> dict[str, float]:
    """Sums of `loss_sum`, `correct` and `count` over `elements` (maybe none)."""
    # Summed on the device in float64: no host sync per batch, and exact
    # counts however large the validation set.
    totals = {
        key: tf.constant(0.0, tf.float64) for key in ("loss_sum", "correct", "count")
    }
    for element in elements:
        for key, value in eval_step(element).items():
            totals[key] += tf.cast(value, tf.float64)
    return {key: float(value) for key, value in totals.items()}


def _means(totals: dict[str, float]) -> dict[str, float]:
    return {
        "loss": totals["loss_sum"] / totals["count"],
        "top1": totals["correct"] / totals["count"],
    }


def _evaluate_head_and_whole(
    eval_step: EvalStep, dataset, *, head_batches: int | None
) -> tuple[dict[str, float], dict[str, float]]:
    """`evaluate` on the first `head_batches` batches and on all, in one pass.

    None: the head is the whole dataset.
    """
    iterator = iter(dataset)
    head = _totals(eval_step, itertools.islice(iterator, head_batches))
    rest = _totals(eval_step, iterator)
    if head["count"] == 0:
        raise ValueError("`dataset` yielded no examples to evaluate.")
    whole = {key: head[key] + rest[key] for key in head}
    return _means(head), _means(whole)
