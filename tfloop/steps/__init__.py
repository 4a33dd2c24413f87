"""Train and eval steps: explicit tape, explicit `training`, BN owned by the step.

A step is built once from a model (and optimizer) and then called on dataset
elements. Each step object exposes two levels, so it fits any trainer:

- `step(element)`: one `tf.function` call that runs `step.replica_fn` on every
  replica (`strategy.run`) and reduces the results. For your own loop.
- `step.replica_fn(images, labels)`: the per-replica body, for code that is
  already inside a `tf.function` and replica context (an Orbit trainer, a Keras
  `train_step` override, a multi-step `tf.function` loop).

Modules: `train` (`TrainStep`), `evaluation` (`EvalStep`, `evaluate`),
`metrics` (`reduce_metrics`: per-replica outputs into metrics), `batch`
(elements, label layouts, per-example losses), `strategy`.
"""

from tfloop.steps.batch import LossFn
from tfloop.steps.evaluation import EvalStep, evaluate, make_eval_step
from tfloop.steps.metrics import reduce_metrics
from tfloop.steps.train import GradientTransform, TrainStep, make_train_step

__all__ = [
    "EvalStep",
    "GradientTransform",
    "LossFn",
    "TrainStep",
    "evaluate",
    "make_eval_step",
    "make_train_step",
    "reduce_metrics",
]
