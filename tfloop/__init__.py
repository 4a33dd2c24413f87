"""tfloop: hand-written TensorFlow 2 training loops with trustworthy batch norm.

Public API:
  make_train_step, make_eval_step, evaluate  -- tfloop.steps
  bn                                         -- BN statistics: layers, state, ...
"""

from tfloop import bn
from tfloop.steps import EvalStep, TrainStep, evaluate, make_eval_step, make_train_step

__all__ = [
    "EvalStep",
    "TrainStep",
    "bn",
    "evaluate",
    "make_eval_step",
    "make_train_step",
]
