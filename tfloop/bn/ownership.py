"""Ownership of BN layers: the owned `call` and the collector of batch moments.

A step takes over a stock `BatchNormalization` by replacing its `call` on the
instance: inside a step's forward pass (an active `_Collector`) the layer
normalizes with its batch moments and reports them instead of assigning its
moving statistics; outside, it is the stock layer.
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

# Keras' symbolic shape inference runs layers in a scratch graph; nothing it
# computes is a real forward pass. (Keras has no public accessor for it.)
from keras.src.backend.common.symbolic_scope import in_symbolic_scope

from tfloop.bn.moments import _batch_moments, _Moments, _pool


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


# The stock `call`: a subclass that overrides it is honoured, not owned.
_STOCK_CALL = keras.layers.BatchNormalization.call

# Update count that marks moving statistics restored from elsewhere (a stock
# Keras checkpoint, `model.fit`, pretrained or slim weights): an infinitely
# long history, so every averaging mode keeps them with weight `decay`.
_HISTORY_COUNT = 2**40


@dataclasses.dataclass(eq=False)
class _Accumulator:
    """Per-replica running (count, mean, M2) of one layer's inputs in one step.

    Used where a layer is called inside `tf.cond`, `tf.while_loop` or a nested
    `tf.function`: tensors cannot leave such a graph, so the owned call merges
    its moments into these variables (Chan's update, float64) and the step
    reads and clears them after the forward pass. `ON_READ` variables keep one
    copy per replica, so every replica accumulates its own shard.
    """

    count: tf.Variable
    mean: tf.Variable
    m2: tf.Variable

    @classmethod
    def create(cls, layer: keras.layers.BatchNormalization) -> _Accumulator:
        channels = layer.moving_mean.shape[0]

        def variable(shape, name):
            return tf.Variable(
                tf.zeros(shape, tf.float64),
                trainable=False,
                name=f"{layer.name}_{name}",
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM,
            )

        with tf.init_scope(), _variables_scope(layer):
            return cls(
                variable([], "n"),
                variable([channels], "mean"),
                variable([channels], "m2"),
            )

    def add(self, count: tf.Tensor, mean: tf.Tensor, variance: tf.Tensor) -> None:
        """Merges one call's moments (Chan et al.), inside the nested graph."""
        n0, m0, q0 = (
            self.count.read_value(),
            self.mean.read_value(),
            self.m2.read_value(),
        )
        n = tf.cast(count, tf.float64)
        total = n0 + n
        weight = tf.math.divide_no_nan(n, total)
        delta = tf.where(n > 0, tf.cast(mean, tf.float64) - m0, 0.0)
        self.mean.assign(m0 + delta * weight)
        self.m2.assign(
            q0
            + tf.where(n > 0, tf.cast(variance, tf.float64), 0.0) * n
            + tf.square(delta) * n0 * weight
        )
        self.count.assign(total)

    def take(self) -> _Moments:
        """The moments accumulated in this step; clears them for the next."""
        n, mean, m2 = (
            self.count.read_value(),
            self.mean.read_value(),
            self.m2.read_value(),
        )
        with tf.control_dependencies([n, mean, m2]):
            for variable in (self.count, self.mean, self.m2):
                variable.assign(tf.zeros_like(variable))
        return _Moments(n, mean, tf.math.divide_no_nan(m2, n), synced=False)


@dataclasses.dataclass(eq=False)
class _LayerState:
    """What tfloop keeps per owned layer, beside the layer's own variables."""

    count: tf.Variable  # Number of batches the moving statistics summarize.
    # The initializer's moving mean and variance: statistics that differ from
    # them at count 0 came from elsewhere and count as history.
    initial: tuple[np.ndarray, np.ndarray] | None = None
    accumulator: _Accumulator | None = None
    frozen: bool = False
    # `trainable` as `freeze` found it, so that `unfreeze` restores it.
    trainable_before_freeze: bool | None = None
    # How the last step that updated the layer averages (for `staleness`),
    # recorded when that step traces its update.
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
    it still loads into a stock model and the other way round. Only layers
    tfloop owns (see `layers`) have a counter.
    """
    return _BatchNormState([s.count for _, s in _own_model(model)])


def honoured(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """BN layers whose class overrides `call`: tfloop runs their own `call`.

    Detection-style frozen BN (a subclass whose `call` forces
    `training=False`) keeps working as its author wrote it. A train step
    refuses such a layer if its `call` computes batch moments in training,
    since its moving statistics would then be updated by stock Keras code
    (per replica, not debiased) behind tfloop's back.
    """
    return [layer for layer in layers(model) if not _is_stock(layer)]


def _is_stock(layer: keras.layers.BatchNormalization) -> bool:
    return type(layer).call is _STOCK_CALL


def _own(layer: keras.layers.BatchNormalization) -> _LayerState:
    """Takes over `layer`'s statistics updates (idempotent); returns its state."""
    layer_state = _STATES.get(layer)
    if layer_state is not None:
        return layer_state
    if layer.renorm:
        raise ValueError(
            f"BatchNormalization layer `{layer.path}` uses `renorm=True`, "
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
    if layer.built:
        layer_state.initial = _initial_values(layer)
        layer_state.accumulator = _Accumulator.create(layer)
    _STATES[layer] = layer_state
    stock_call = _STOCK_CALL.__get__(layer)
    layer.call = types.MethodType(_make_owned_call(stock_call), layer)
    return layer_state


def _initial_values(layer) -> tuple[np.ndarray, np.ndarray] | None:
    """The moving statistics' initial values, if the initializers are constant."""
    shape = layer.moving_mean.shape
    values = []
    for initializer in (
        layer.moving_mean_initializer,
        layer.moving_variance_initializer,
    ):
        if not isinstance(
            initializer,
            (
                keras.initializers.Zeros,
                keras.initializers.Ones,
                keras.initializers.Constant,
            ),
        ):
            return None
        with tf.init_scope():
            values.append(np.asarray(initializer(shape, dtype=layer.moving_mean.dtype)))
    return values[0], values[1]


def _variables_scope(layer: keras.layers.BatchNormalization):
    """The scope of the strategy `layer`'s variables live in, if not current."""
    variable = getattr(layer, "moving_mean", None)
    strategy = getattr(getattr(variable, "value", None), "distribute_strategy", None)
    if strategy is None or tf.distribute.has_strategy():
        return contextlib.nullcontext()
    return strategy.scope()


def _own_model(model: keras.Model) -> list[tuple[keras.layers.Layer, _LayerState]]:
    """Owns every stock BN layer of `model`; honoured subclasses are left out."""
    owned = []
    for layer in layers(model):
        if _is_stock(layer):
            owned.append((layer, _own(layer)))
        else:
            _watch(layer)
    return owned


class _Collector:
    """Receives the moments owned layers report during one forward pass."""

    def __init__(self, *, sync: bool = False, calibrate: bool = False):
        self.sync = sync
        # Calibration: normalize with (and report) batch moments even in
        # inference mode, so that dropout and the like stay off.
        self.calibrate = calibrate
        self.moments: dict[int, list[_Moments]] = {}
        # Layers called inside control flow: they report through accumulators.
        self.nested: set[int] = set()
        # Honoured layers (own `call`) that computed training moments.
        self.self_updating: list[keras.layers.Layer] = []
        self.graph = tf.compat.v1.get_default_graph()

    def __enter__(self) -> None:
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self)

    def __exit__(self, *exc) -> None:
        _local.stack.pop()

    def reported(self, layer, layer_state: _LayerState) -> bool:
        return id(layer) in self.moments or id(layer) in self.nested

    def take(self, layer, layer_state: _LayerState) -> _Moments:
        """The layer's moments of this pass, all its calls pooled."""
        parts = list(self.moments.get(id(layer), []))
        if id(layer) in self.nested:
            parts.append(layer_state.accumulator.take())
        return _pool(parts)


def _active_collector() -> tuple[_Collector | None, bool]:
    """The collector of this thread's forward pass, and whether the call is nested.

    A call in the collector's own graph reports tensors. A call in a graph
    nested in it (`tf.cond` and `tf.while_loop` branches, a nested
    `tf.function`) cannot hand tensors out, so it reports through the layer's
    accumulator. Keras' symbolic shape inference (a scratch graph) and any
    unrelated graph report nothing.
    """
    stack = getattr(_local, "stack", None)
    if not stack or in_symbolic_scope():
        return None, False
    collector = stack[-1]
    graph = tf.compat.v1.get_default_graph()
    if graph is collector.graph:
        return collector, False
    while (graph := getattr(graph, "outer_graph", None)) is not None:
        if graph is collector.graph:
            return collector, True
    return None, False


def _make_owned_call(stock_call: Callable) -> Callable:
    """Builds the `call` that replaces a stock BN layer's `call`."""

    def call(layer, inputs, training=None, mask=None):
        layer_state = _STATES[layer]
        if layer_state.frozen:
            training = False
        collector, nested = _active_collector()
        reporting = (
            collector is not None
            and not layer_state.frozen
            and layer.trainable
            and (training or collector.calibrate)
        )
        if not reporting:
            return stock_call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        sync = collector.sync or layer.synchronized
        if nested and sync:
            raise ValueError(
                f"BatchNormalization layer `{layer.path}` is called inside "
                "control flow (tf.cond, tf.while_loop or a nested tf.function) "
                "and asks for synchronized moments (`sync_bn=True` or "
                "`synchronized=True`): an all-reduce there can deadlock replicas; "
                "use per-replica moments for this layer."
            )
        mean, variance, moments = _batch_moments(layer, x, mask, sync=sync)
        if nested:
            if layer_state.accumulator is None:  # Built inside the first trace.
                layer_state.accumulator = _Accumulator.create(layer)
            layer_state.accumulator.add(moments.count, moments.mean, moments.variance)
            collector.nested.add(id(layer))
        else:
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


def _watch(layer: keras.layers.BatchNormalization) -> None:
    """Notes when an honoured layer computes training moments in a forward pass."""
    if "_moments" in vars(layer):
        return
    stock_moments = layer._moments

    def moments(inputs, mask):
        stack = getattr(_local, "stack", None)
        if stack and not in_symbolic_scope():
            stack[-1].self_updating.append(layer)
        return stock_moments(inputs, mask)

    layer._moments = moments


def _broadcastable(layer, vector, x) -> tf.Tensor:
    """Reshapes a per-channel vector so it broadcasts against `x` on `layer.axis`."""
    if layer.axis in (-1, x.shape.rank - 1):  # Channels last: it already does.
        return tf.cast(vector, x.dtype)
    shape = [1] * x.shape.rank
    shape[layer.axis] = -1
    return tf.reshape(tf.cast(vector, x.dtype), shape)
