"""The audit: BN layers a train step would leave without statistics updates."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from tfloop.bn.ownership import _Collector, _LayerState


class BatchNormAuditError(ValueError):
    """Raised by a train step with `bn_audit='error'` when a BN layer would not learn."""


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


