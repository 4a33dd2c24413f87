"""tfloop: hand-written TensorFlow 2 training loops with trustworthy batch norm.

Public API (see the README):
  make_train_step, make_eval_step, evaluate   train and eval steps
  reduce_metrics                              replica_fn outputs -> metrics
  optimize_loss                               optimize_loss-style train step
  bn                                          BN statistics: layers, state,
                                              recalibrate, staleness, freeze
  models, data, compat                        slim's nets, inputs, TF1 graphs
"""

from tfloop import bn, compat, data, models
from tfloop.optimize import optimize_loss
from tfloop.steps import (
    EvalStep,
    TrainStep,
    evaluate,
    make_eval_step,
    make_train_step,
    reduce_metrics,
)

__all__ = [
    "EvalStep",
    "TrainStep",
    "bn",
    "compat",
    "data",
    "evaluate",
    "make_eval_step",
    "make_train_step",
    "models",
    "optimize_loss",
    "reduce_metrics",
]
