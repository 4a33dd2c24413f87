"""Batch-normalization statistics, owned by the train step.

Why this module exists: in TF1 the moving averages of batch norm were update
ops in the `UPDATE_OPS` collection, and a train op that did not depend on them
left the statistics at their initial values (validation at chance). Keras 3
moved the update inside `BatchNormalization.call`, which made it implicit in a
different way: it happens only when the layer is reached with `training=True`
and `trainable=True`, with the momentum read at trace time, and under
`MirroredStrategy` every replica averages its own shard into its own copy.

tfloop therefore takes the update out of the layer. A step built by
`tfloop.make_train_step` *owns* every `keras.layers.BatchNormalization` of its
model with the stock `call` (however deeply nested, also inside `tf.cond` or
`tf.while_loop`): during that step's forward pass each owned layer normalizes
with its batch moments as usual but, instead of assigning its moving
statistics, reports the moments to the step. After the forward pass the step
applies all updates in one place: one fused cross-replica reduction for all
layers (`averaging._collect`), then one exponential-moving-average update per
layer, zero-debiased by default (`averaging._apply_updates`). Outside a tfloop
step (`model.fit`, a user's own `model(x, training=True)`) an owned layer
behaves exactly like the stock layer. Subclasses that override `call` are
honoured, not owned (`honoured`).

Modules: `ownership` (the owned call, the collector), `moments` (exact
pooling), `averaging` (reduction and moving averages), `audit`, `precise`
(recalibration), `staleness`, `freeze`.

Ownership changes no variable and no class: the layer keeps its weights, its
config and its checkpoint structure. The only extra state is one update counter
per layer, which lives in `state(model)` (not in the model) so checkpoints of
the model stay interchangeable with stock Keras ones.
"""

from tfloop.bn.audit import BatchNormAuditError
from tfloop.bn.averaging import AVERAGING_MODES
from tfloop.bn.freeze import freeze, unfreeze
from tfloop.bn.ownership import honoured, layers, state
from tfloop.bn.precise import recalibrate
from tfloop.bn.staleness import Staleness, staleness

__all__ = [
    "AVERAGING_MODES",
    "BatchNormAuditError",
    "Staleness",
    "freeze",
    "honoured",
    "layers",
    "recalibrate",
    "staleness",
    "state",
    "unfreeze",
]
