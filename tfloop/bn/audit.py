"""The audit: BN layers a train step would leave without statistics updates."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from tfloop.bn.ownership import _Collector, _LayerState


class BatchNormAuditError(ValueError):
    """Raised by a train step when a BN layer would not learn, or not through tfloop.

    With `bn_audit='error'` for layers that report no moments; always for BN
    subclasses whose own `call` updates their statistics.
    """

    # AutoGraph re-raises errors from converted code (a user's `tf.function`
    # around `replica_fn`) with their own type only for a few built-in types
    # and for types whose `__init__` is `Exception.__init__`; any other type
    # becomes a `StagingError`, which `except BatchNormAuditError` misses.
    __init__ = Exception.__init__


def _silent_layers(
    owned: Sequence[tuple[keras.layers.Layer, _LayerState]], collector: _Collector
) -> list[str]:
    """Names the layers whose statistics this forward pass would not update."""
    silent = []
    for layer, layer_state in owned:
        if layer_state.frozen or collector.reported(layer, layer_state):
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


def _check_honoured(collector: _Collector) -> None:
    """Refuses BN subclasses whose own `call` updated statistics in training.

    Such a layer's moving statistics would be assigned by stock Keras code
    inside its `call`: per replica, not debiased, invisible to tfloop.
    """
    if collector.self_updating:
        layer = collector.self_updating[0]
        raise BatchNormAuditError(
            f"BatchNormalization subclass `{type(layer).__name__}` (layer "
            f"`{layer.path}`) overrides `call` and computes batch moments in "
            "training, so its moving statistics would be updated by its own "
            "call, per replica and not debiased; tfloop owns only layers with "
            "the stock `call`: use keras.layers.BatchNormalization, or set "
            "`trainable=False` on this layer to keep its statistics fixed."
        )


def _audit_message(silent: Sequence[str]) -> str:
    return (
        f"{len(silent)} BatchNormalization layer(s) will keep their moving "
        "statistics unchanged in training: " + "; ".join(silent)
    )
