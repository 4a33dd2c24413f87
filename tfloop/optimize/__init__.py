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

Modules: `step` (`optimize_loss`, `OptimizeLossStep`), `optimizer` (the
`optimizer` and `learning_rate` arguments, `OPTIMIZER_CLS_NAMES`),
`gradients` (the gradient knobs, in optimize_loss's order), `multipliers`
(which variable a `gradient_multipliers` key names), `finite_loss`
(`check_numerics` on the loss), `summary_tags` (`OPTIMIZER_SUMMARIES`).
"""

from tfloop.optimize.optimizer import OPTIMIZER_CLS_NAMES
from tfloop.optimize.optimizer import Schedule as Schedule  # The type, as before.
from tfloop.optimize.step import OptimizeLossStep, optimize_loss
from tfloop.optimize.summary_tags import OPTIMIZER_SUMMARIES

__all__ = [
    "OPTIMIZER_CLS_NAMES",
    "OPTIMIZER_SUMMARIES",
    "OptimizeLossStep",
    "optimize_loss",
]
