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
model (however deeply nested): during that step's forward pass each owned layer
normalizes with its batch moments as usual but, instead of assigning its moving
statistics, reports the moments to the step. After the forward pass the step
applies all updates in one place (`_apply_updates`): one fused cross-replica
reduction for all layers, then one exponential-moving-average update per layer,
zero-debiased by default. Outside a tfloop step (`model.fit`, a user's own
`model(x, training=True)`) an owned layer behaves exactly like the stock layer.

Ownership changes no variable and no class: the layer keeps its weights, its
config and its checkpoint structure. The only extra state is one update counter
per layer, which lives in `state(model)` (not in the model) so checkpoints of
the model stay interchangeable with stock Keras ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import types
import weakref
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "AVERAGING_MODES",
    "BatchNormAuditError",
    "Staleness",
    "freeze",
    "layers",
    "recalibrate",
    "staleness",
    "state",
    "unfreeze",
]

# How the moving average treats its first updates; see `_effective_decay`.
AVERAGING_MODES = ("debias", "ramp", "plain")


class BatchNormAuditError(ValueError):
    """Raised by a train step with `bn_audit='error'` when a BN layer would not learn."""


def layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Returns every `BatchNormalization` layer of `model`, nested ones included.

    Order is the depth-first order of Keras' layer tracking, which is stable for
    a given model, so it can index per-layer results.
    """
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


@dataclasses.dataclass
class _LayerState:
    """What tfloop keeps per owned layer, beside the layer's own variables."""

    count: tf.Variable  # Number of batches the moving statistics summarize.
    frozen: bool = False
    # How the last step that owned the layer averages (for `staleness`).
    averaging: str = "debias"
    decay: float | None = None


# Per-thread stack of collectors: `MirroredStrategy` runs each replica's forward
# pass in its own thread, so moments reported by a layer must land in the
# collector of the replica that computed them.
_local = threading.local()
_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _BatchNormState(tf.Module):
    """Trackable holder of the update counters, for `tf.train.Checkpoint`."""

    def __init__(self, counts: Sequence[tf.Variable]):
        super().__init__(name="tfloop_bn_state")
        self.counts = list(counts)


def state(model: keras.Model) -> tf.Module:
    """Returns the trackable tfloop state of `model`'s BN layers (update counts).

    Put it beside the model in a checkpoint, so that a resumed run continues
    the zero-debiased averages where it stopped::

        tf.train.Checkpoint(model=model, optimizer=opt, bn=tfloop.bn.state(model))

    The model's own variables are untouched by tfloop, so a checkpoint without
    it still loads into a stock model and the other way round.
    """
    return _BatchNormState([_own(layer).count for layer in layers(model)])


def _own(layer: keras.layers.BatchNormalization) -> _LayerState:
    """Takes over `layer`'s statistics updates (idempotent); returns its state."""
    layer_state = _STATES.get(layer)
    if layer_state is not None:
        return layer_state
    if layer.renorm:
        raise ValueError(
            f"BatchNormalization layer `{layer.name}` uses `renorm=True`, "
            "which tfloop does not own; use renorm=False."
        )
    # ONLY_FIRST_REPLICA: every replica adds the same 1, keep one of them.
    # Created under the strategy of the layer's own variables, so that
    # `state(model)` called before the step, outside `strategy.scope()`, does
    # not make a plain variable that every replica increments.
    with _variables_scope(layer):
        count = tf.Variable(
            0,
            dtype=tf.int64,
            trainable=False,
            name=f"{layer.name}_updates",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
        )
    layer_state = _LayerState(count=count)
    _STATES[layer] = layer_state
    stock_call = type(layer).call.__get__(layer)
    layer.call = types.MethodType(_make_owned_call(stock_call), layer)
    return layer_state


def _variables_scope(layer: keras.layers.BatchNormalization):
    """The scope of the strategy `layer`'s variables live in, if not current."""
    variable = getattr(layer, "moving_mean", None)
    strategy = getattr(getattr(variable, "value", None), "distribute_strategy", None)
    if strategy is None or tf.distribute.has_strategy():
        return contextlib.nullcontext()
    return strategy.scope()


def _own_model(model: keras.Model) -> list[tuple[keras.layers.Layer, _LayerState]]:
    return [(layer, _own(layer)) for layer in layers(model)]


@dataclasses.dataclass
class _Moments:
    """Batch moments one call of one layer reported, per channel."""

    count: tf.Tensor  # float32 scalar: elements reduced per channel.
    mean: tf.Tensor
    variance: tf.Tensor
    synced: bool  # Already the global-batch moments of all replicas.


class _Collector:
    """Receives the moments owned layers report during one forward pass."""

    def __init__(self, *, sync: bool = False, calibrate: bool = False):
        self.sync = sync
        # Calibration: normalize with (and report) batch moments even in
        # inference mode, so that dropout and the like stay off.
        self.calibrate = calibrate
        self.moments: dict[int, list[_Moments]] = {}
        # Keras builds lazily-built models with a symbolic call in a scratch
        # graph; moments from any graph but the step's own are not reported.
        self.graph = tf.compat.v1.get_default_graph()

    def __enter__(self) -> None:
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self)

    def __exit__(self, *exc) -> None:
        _local.stack.pop()


def _active_collector() -> _Collector | None:
    stack = getattr(_local, "stack", None)
    if not stack or stack[-1].graph is not tf.compat.v1.get_default_graph():
        return None
    return stack[-1]


def _make_owned_call(stock_call: Callable) -> Callable:
    """Builds the `call` that replaces a stock BN layer's `call`."""

    def call(layer, inputs, training=None, mask=None):
        layer_state = _STATES[layer]
        if layer_state.frozen:
            training = False
        collector = _active_collector()
        reporting = (
            collector is not None
            and not layer_state.frozen
            and layer.trainable
            and (training or collector.calibrate)
        )
        if not reporting:
            return stock_call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance, moments = _batch_moments(layer, x, mask, sync=collector.sync)
        collector.moments.setdefault(id(layer), []).append(moments)
        outputs = tf.nn.batch_normalization(
            x,
            _broadcastable(layer, mean, x),
            _broadcastable(layer, variance, x),
            offset=None if layer.beta is None else _broadcastable(layer, layer.beta, x),
            scale=None
            if layer.gamma is None
            else _broadcastable(layer, layer.gamma, x),
            variance_epsilon=layer.epsilon,
        )
        return tf.cast(outputs, layer.compute_dtype)

    return call


def _broadcastable(layer, vector, x) -> tf.Tensor:
    """Reshapes a per-channel vector so it broadcasts against `x` on `layer.axis`."""
    if layer.axis in (-1, x.shape.rank - 1):  # Channels last: it already does.
        return tf.cast(vector, x.dtype)
    shape = [1] * x.shape.rank
    shape[layer.axis] = -1
    return tf.reshape(tf.cast(vector, x.dtype), shape)


def _batch_moments(
    layer, x, mask, *, sync: bool
) -> tuple[tf.Tensor, tf.Tensor, _Moments]:
    """Mean and variance to normalize `x` with, and the moments to report.

    Only the reported moments are guarded against empty shards: the guard
    stays out of the gradient computation.
    """
    axes = layer._reduction_axes
    if mask is not None:
        if sync:
            raise ValueError(
                f"`sync_bn=True` does not support masked inputs (layer `{layer.name}`)."
            )
        weights = tf.broadcast_to(
            tf.cast(tf.expand_dims(mask, -1), x.dtype), tf.shape(x)
        )
        mean, variance = tf.nn.weighted_moments(x, axes, weights)
        count = tf.reduce_sum(weights) / tf.cast(tf.shape(x)[layer.axis], x.dtype)
        return mean, variance, _Moments(count, mean, variance, synced=False)
    count = _element_count(x, axes)
    # Keras' own synchronized moments: one all-reduce per layer in the forward
    # pass, the price of normalizing with global-batch statistics.
    mean, variance = keras.ops.moments(x, axes=axes, synchronized=sync)
    if sync or tf.get_static_value(count):
        return mean, variance, _Moments(count, mean, variance, synced=sync)
    # An empty shard (last batch of a split) counts for nothing.
    return (
        mean,
        variance,
        _Moments(
            count,
            tf.where(count > 0, mean, 0.0),
            tf.where(count > 0, variance, 0.0),
            synced=False,
        ),
    )


def _element_count(x: tf.Tensor, axes: Sequence[int]) -> tf.Tensor:
    """Elements per channel of `x` (float32), a constant when shapes are static."""
    known = 1
    unknown = []
    for axis in axes:
        if x.shape[axis] is None:
            unknown.append(axis)
        else:
            known *= x.shape[axis]
    if not unknown:
        return tf.constant(known, tf.float32)
    dynamic = tf.reduce_prod(tf.gather(tf.shape(x), unknown))
    return tf.cast(dynamic * known, tf.float32)


def _pool(moments: Sequence[_Moments]) -> _Moments:
    """Merges moments of several calls of one layer (shared layers) exactly."""
    if len(moments) == 1:
        return moments[0]
    count = tf.add_n([m.count for m in moments])
    mean = tf.add_n([m.count * m.mean for m in moments]) / count
    variance = (
        tf.add_n([m.count * (m.variance + tf.square(m.mean - mean)) for m in moments])
        / count
    )
    return _Moments(count, mean, variance, synced=all(m.synced for m in moments))


def _cross_replica_moments(
    per_layer: Sequence[_Moments], shifts: Sequence[tf.Tensor]
) -> list[_Moments]:
    """Global-batch moments of every layer from one fused all-reduce.

    Each replica contributes, per layer, its count n and the shifted sums
    n * (mean - K) and n * (variance + (mean - K)^2), where the shift K is the
    layer's moving mean (identical on every replica). The global moments are
    then exact, within-replica plus between-replica variance, and the shift
    keeps the subtraction `E[(x-K)^2] - E[x-K]^2` well conditioned.
    """
    replica_context = tf.distribute.get_replica_context()
    if (
        not per_layer
        or replica_context is None
        or replica_context.num_replicas_in_sync == 1
    ):
        return list(per_layer)
    # Vectorized over all layers' channels: a fixed number of ops, however
    # many layers there are.
    channels = [m.mean.shape[0] for m in per_layer]
    counts = tf.stack([m.count for m in per_layer])
    shift = tf.concat(list(shifts), axis=0)
    delta = tf.concat([m.mean for m in per_layer], axis=0) - shift
    variance = tf.concat([m.variance for m in per_layer], axis=0)
    # Each channel's count: its layer's.
    layer_of_channel = np.repeat(np.arange(len(channels)), channels)
    per_channel = tf.gather(counts, layer_of_channel)
    fused = replica_context.all_reduce(
        tf.distribute.ReduceOp.SUM,
        tf.stop_gradient(
            tf.concat(
                [
                    per_channel * delta,
                    per_channel * (variance + tf.square(delta)),
                    counts,
                ],
                axis=0,
            )
        ),
    )
    first, second, counts = tf.split(fused, [sum(channels), sum(channels), -1])
    per_channel = tf.gather(counts, layer_of_channel)
    delta = first / per_channel
    variance = tf.maximum(second / per_channel - tf.square(delta), 0.0)
    return [
        _Moments(count, mean, var, synced=True)
        for count, mean, var in zip(
            tf.unstack(counts),
            tf.split(shift + delta, channels),
            tf.split(variance, channels),
        )
    ]


def _effective_decay(
    decay: float | Sequence[float], count: tf.Tensor, averaging: str
) -> tf.Tensor:
    """The weight the old moving value gets at update number `count + 1`.

    Elementwise: `decay` and `count` may be vectors (one entry per layer).

    - `debias` (default): the zero-debiased average of Sonnet's
      `ExponentialMovingAverage` and `assign_moving_average(zero_debias=True)`,
      kept in debiased form: the value after t updates is
      sum_i (1-d) d^(t-i) x_i / (1 - d^t), so the initial value carries no
      weight and after one update the statistics *are* that batch's. It equals
      an EMA whose decay at update t+1 is d (1 - d^t) / (1 - d^(t+1)).
    - `ramp`: TF's `ExponentialMovingAverage(num_updates=t)`,
      min(d, (1 + t) / (10 + t)); the initial value keeps a small weight.
    - `plain`: the stock Keras/slim average with constant decay d.
    """
    t = tf.cast(count, tf.float64)
    d = tf.constant(decay, tf.float64)
    if averaging == "debias":
        value = d * (1.0 - d**t) / (1.0 - d ** (t + 1.0))
    elif averaging == "ramp":
        value = tf.minimum(d, (1.0 + t) / (10.0 + t))
    else:
        value = d
    return tf.cast(value, tf.float32)


def _apply_updates(
    owned: Sequence[tuple[keras.layers.Layer, _LayerState]],
    collector: _Collector,
    *,
    decay: float | None,
    averaging: str,
) -> None:
    """Updates every layer that reported moments, once, from the global batch.

    Runs in replica context, after the forward pass: this is tfloop's
    counterpart of slim's `UPDATE_OPS` barrier.
    """
    reported = [
        (layer, layer_state, _pool(collector.moments[id(layer)]))
        for layer, layer_state in owned
        if id(layer) in collector.moments
    ]
    local = [(i, m) for i, (_, _, m) in enumerate(reported) if not m.synced]
    reduced = _cross_replica_moments(
        [m for _, m in local],
        [tf.stop_gradient(reported[i][0].moving_mean.value) for i, _ in local],
    )
    moments = [m for _, _, m in reported]
    for (i, _), m in zip(local, reduced):
        moments[i] = m
    if not reported:
        return
    # The decays of all layers as one vector: a few ops in all, not per layer.
    keeps = tf.unstack(
        _effective_decay(
            [layer.momentum if decay is None else decay for layer, _, _ in reported],
            tf.stack([layer_state.count for _, layer_state, _ in reported]),
            averaging,
        )
    )
    for (layer, layer_state, _), m, keep in zip(reported, moments, keeps):
        for variable, batch_value in (
            (layer.moving_mean, m.mean),
            (layer.moving_variance, m.variance),
        ):
            new_value = keep * variable.value + (1.0 - keep) * tf.stop_gradient(
                tf.cast(batch_value, tf.float32)
            )
            variable.assign(tf.cast(new_value, variable.dtype))
        layer_state.count.assign_add(1)


def _silent_layers(
    owned: Sequence[tuple[keras.layers.Layer, _LayerState]], collector: _Collector
) -> list[str]:
    """Names the layers whose statistics this forward pass would not update."""
    silent = []
    for layer, layer_state in owned:
        if layer_state.frozen or id(layer) in collector.moments:
            continue
        if not layer.trainable:
            reason = "trainable=False"
        else:
            reason = (
                "not reached with training=True in the forward pass: called "
                "outside the model's call, or with training=False hard-coded"
            )
        silent.append(f"`{layer.path}` ({reason})")
    return silent


def _audit_message(silent: Sequence[str]) -> str:
    return (
        f"{len(silent)} BatchNormalization layer(s) will keep their moving "
        "statistics unchanged in training: " + "; ".join(silent)
    )


def _initial_weight(decay: float, count: int, averaging: str) -> float:
    """The weight the initializer still carries in the moving statistics.

    Zero-debiased averages give it no weight after the first update; plain
    ones give it decay ** count (0.9997 ** 1000 = 0.74: slim's decay needs
    thousands of steps); the ramp gives it the product of its decays.
    """
    if averaging == "debias":
        return 0.0 if count > 0 else 1.0
    if averaging == "plain":
        return float(decay**count)
    t = np.arange(count, dtype=np.float64)
    return float(np.prod(np.minimum(decay, (1.0 + t) / (10.0 + t))))


def _calibration_targets(
    model: keras.Model,
) -> list[tuple[keras.layers.Layer, _LayerState]]:
    """Owned layers whose statistics may be recomputed (not frozen)."""
    return [(l, s) for l, s in _own_model(model) if not s.frozen and l.trainable]


def _calibration_moments(model: keras.Model, targets, images) -> dict[int, _Moments]:
    """Inference-mode forward pass in which BN layers use batch moments.

    Upstream BN layers normalize with their batch statistics, as in training
    and as in fvcore's and pycls's precise BN: one pass gives every layer's
    statistics. Returns global-batch (count, mean, variance) by position in
    `targets`.
    """
    collector = _Collector(calibrate=True)
    with collector:
        model(images, training=False)
    reached = [
        (i, _pool(collector.moments[id(layer)]))
        for i, (layer, _) in enumerate(targets)
        if id(layer) in collector.moments
    ]
    reduced = _cross_replica_moments(
        [m for _, m in reached],
        [tf.stop_gradient(targets[i][0].moving_mean.value) for i, _ in reached],
    )
    return {i: (m.count, m.mean, m.variance) for (i, _), m in zip(reached, reduced)}


def _images_of(element):
    return element[0] if isinstance(element, (tuple, list)) else element


def recalibrate(
    model: keras.Model,
    dataset,
    *,
    num_batches: int,
    strategy: tf.distribute.Strategy | None = None,
) -> int:
    """Sets BN moving statistics to their population values for the current weights.

    Moving averages lag weights that change fast; this is precise BN
    (Wu & Johnson, 2021): a forward-only pass over `num_batches` batches of
    `dataset` (elements `images` or `(images, labels, ...)`, any batch sizes, a
    last partial one included), in inference mode (dropout off) except that BN
    layers normalize with batch statistics. Every owned, unfrozen BN layer's
    moving mean and variance become the mean and variance of all its inputs
    over those batches, pooled exactly (Chan's merge in float64) across
    batches, replicas and workers; its update count becomes the number of
    batches, so later zero-debiased updates weigh them as that many batches.
    No other variable changes. Frozen layers (`freeze`, `trainable=False`)
    are left alone.

    The first BN layer's statistics are exact. Deeper layers see upstream BN
    layers normalizing with batch statistics, as in training (fvcore and
    pycls do the same): one pass serves all layers, where using recalibrated
    upstream statistics would take one pass per layer.

    Args:
      model: the model; its BN layers are taken over as by a train step.
      dataset: a `tf.data.Dataset`, or a distributed dataset of `strategy`.
      num_batches: how many batches to use (fewer if the dataset ends).
      strategy: the strategy the model was built under; None: the current.

    Returns:
      The number of batches used.
    """
    if num_batches < 1:
        raise ValueError(f"`num_batches` must be at least 1, got {num_batches!r}.")
    strategy = strategy or tf.distribute.get_strategy()
    with strategy.scope():
        targets = _calibration_targets(model)
    if isinstance(dataset, tf.data.Dataset):
        dataset = strategy.experimental_distribute_dataset(dataset.take(num_batches))

    batch_moments = _calibration_function(model, targets, strategy)
    totals: dict[int, tuple[float, np.ndarray, np.ndarray]] = {}
    used = 0
    for element in dataset:
        if used == num_batches:
            break
        for i, (count, mean, variance) in batch_moments(element).items():
            totals[i] = _chan_merge(
                totals.get(i),
                (
                    float(count),
                    mean.numpy().astype(np.float64),
                    variance.numpy().astype(np.float64),
                ),
            )
        used += 1
    if used == 0:
        raise ValueError("`dataset` yielded no batches to recalibrate with.")
    for i, (_, mean, variance) in totals.items():
        layer, layer_state = targets[i]
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
        layer_state.count.assign(used)
    return used


# Traced calibration passes, per model and (strategy, layers), so that a
# recalibration before every validation does not trace again each time.
_CALIBRATION_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _calibration_function(model, targets, strategy) -> Callable:
    """The `tf.function` of one calibration batch: global (count, mean, var)."""
    functions = _CALIBRATION_FUNCTIONS.setdefault(model, {})
    key = (strategy, tuple(id(layer) for layer, _ in targets))
    if key not in functions:
        model_ref = weakref.ref(model)  # The cache must not keep the model alive.

        @tf.function
        def batch_moments(element):
            def replica_fn(element):
                return _calibration_moments(model_ref(), targets, _images_of(element))

            per_replica = strategy.run(replica_fn, args=(element,))
            # After the fused all-reduce, every replica holds the same values.
            return strategy.experimental_local_results(per_replica)[0]

        functions[key] = batch_moments
    return functions[key]


def _chan_merge(a, b):
    """Merges (count, mean, variance) of two sets exactly and stably (Chan et al.)."""
    if a is None or a[0] == 0:
        return b
    if b[0] == 0:
        return a
    (na, ma, va), (nb, mb, vb) = a, b
    n = na + nb
    delta = mb - ma
    mean = ma + delta * (nb / n)
    m2 = va * na + vb * nb + delta**2 * (na * nb / n)
    return n, mean, m2 / n


@dataclasses.dataclass(frozen=True)
class Staleness:
    """How far one layer's moving statistics are from a batch's own.

    Attributes:
      layer: the layer's path.
      mean_shift: mean over channels of |moving mean - batch mean| / batch std.
      log_variance_ratio: mean over channels of |log(moving var / batch var)|.
      initial_weight: the weight the initializer (0 and 1) still carries in
        the moving statistics: 0 for zero-debiased averages after one update,
        decay ** steps for plain ones.
    """

    layer: str
    mean_shift: float
    log_variance_ratio: float
    initial_weight: float


def staleness(model: keras.Model, batch) -> list[Staleness]:
    """Compares every BN layer's moving statistics with a batch's own, per layer.

    Scale-free, so layers compare with each other: a mean shift of 1 means the
    moving mean is one standard deviation off. Values near 0 mean the moving
    statistics describe the batch; large ones mean validation with them will
    not reflect the model (the classic "val loss stays at ln(4)" symptom).
    Changes no variable. `batch` is `images` or `(images, labels, ...)`.
    """
    targets = _calibration_targets(model)
    moments = tf.function(lambda images: _calibration_moments(model, targets, images))(
        _images_of(batch)
    )
    report = []
    for i, (layer, layer_state) in enumerate(targets):
        if i not in moments:
            continue
        eps = layer.epsilon
        _, batch_mean, batch_var = (t.numpy() for t in moments[i])
        batch_var = batch_var + eps
        moving_var = layer.moving_variance.numpy() + eps
        decay = layer.momentum if layer_state.decay is None else layer_state.decay
        report.append(
            Staleness(
                layer=layer.path,
                mean_shift=float(
                    np.mean(
                        np.abs(layer.moving_mean.numpy() - batch_mean)
                        / np.sqrt(batch_var)
                    )
                ),
                log_variance_ratio=float(
                    np.mean(np.abs(np.log(moving_var / batch_var)))
                ),
                initial_weight=_initial_weight(
                    decay, int(layer_state.count.numpy()), layer_state.averaging
                ),
            )
        )
    return report


def freeze(model: keras.Model, *, train_scale_and_offset: bool = False) -> None:
    """Puts every BN layer of `model` in inference mode; statistics stop updating.

    For fine-tuning. With `train_scale_and_offset=True`, gamma and beta keep
    training (the layer normalizes with its moving statistics); otherwise the
    layers also become `trainable=False`. A train step built before the
    freeze notices it on its next call and traces again.
    """
    for layer, layer_state in _own_model(model):
        layer_state.frozen = True
        if not train_scale_and_offset:
            layer.trainable = False


def unfreeze(model: keras.Model) -> None:
    """Undoes `freeze`: BN layers train and update their statistics again."""
    for layer, layer_state in _own_model(model):
        layer_state.frozen = False
        layer.trainable = True
