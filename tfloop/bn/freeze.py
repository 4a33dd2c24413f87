"""Freezing BN layers for fine-tuning, and undoing exactly that."""

from __future__ import annotations

import keras

from tfloop.bn.ownership import _own_model


def freeze(model: keras.Model, *, train_scale_and_offset: bool = False) -> None:
    """Puts every BN layer of `model` in inference mode; statistics stop updating.

    For fine-tuning. With `train_scale_and_offset=True`, gamma and beta keep
    training (the layer normalizes with its moving statistics); otherwise the
    layers also become `trainable=False`. A train step built before the
    freeze notices it on its next call and traces again.
    """
    for layer, layer_state in _own_model(model):
        if not layer_state.frozen:
            layer_state.trainable_before_freeze = layer.trainable
        layer_state.frozen = True
        if not train_scale_and_offset:
            layer.trainable = False


def unfreeze(model: keras.Model) -> None:
    """Undoes `freeze`: every layer gets back the `trainable` that `freeze` found.

    A layer inside a sub-model the user froze (`backbone.trainable = False`)
    stays frozen; layers `freeze` never touched are left alone.
    """
    for layer, layer_state in _own_model(model):
        if not layer_state.frozen:
            continue
        layer_state.frozen = False
        layer.trainable = layer_state.trainable_before_freeze
        layer_state.trainable_before_freeze = None
