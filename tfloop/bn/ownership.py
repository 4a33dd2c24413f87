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
import tensorflow as tf


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

