"""Inception v1 (GoogLeNet), a Keras port of TF-slim's `nets/inception_v1.py`.

Defaults are those of slim's `inception_v1_arg_scope`: every convolution is
followed by batch norm (decay 0.9997, epsilon 0.001, no learned scale, since
slim's `batch_norm_scale` defaults to False) and ReLU, so it has no bias;
weight decay is 4e-5. The head is slim's with `global_pool=True`: global
average pooling, dropout with keep probability 0.8, and a 1x1 conv with bias
and no batch norm.

Layer names follow slim's scopes with "/" replaced by "_" (Keras forbids "/");
slim's one irregular name, Mixed_5b/Branch_2/Conv2d_0a_3x3, is regularized.
"""

from __future__ import annotations

import dataclasses

import keras

from tfloop.models import _layers

WEIGHT_DECAY = 4e-5
BN_DECAY = 0.9997
BN_EPSILON = 1e-3
DROPOUT_RATE = 0.2  # slim's dropout_keep_prob=0.8
# All layers pad SAME, so any size runs; 32 is the network's total stride, the
# smallest size at which each of its five stride-2 layers still halves a map
# of at least 2x2 real (not padded) activations.
MIN_IMAGE_SIZE = 32

# Everything after MaxPool_3a_3x3: a Mixed module is given by its widths in
# slim's branch order, branch 0 (1x1), branch 1 (1x1 -> 3x3), branch 2
# (1x1 -> 3x3), branch 3 (3x3 max pool -> 1x1); a stride-2 max pool between
# groups of modules by its window size.
_BODY: tuple[tuple[str, tuple[int, ...] | int], ...] = (
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("MaxPool_4a_3x3", 3),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("MaxPool_5a_2x2", 2),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)


def inception_v1(
    num_classes: int,
    *,
    image_size: int | None = None,
    bn_decay: float = BN_DECAY,
    weight_decay: float = WEIGHT_DECAY,
    dropout_rate: float = DROPOUT_RATE,
) -> keras.Model:
    """Builds slim's `inception_v1(global_pool=True)` returning logits.

    Args:
      num_classes: Number of logits, at least 2.
      image_size: Height and width of the square input, at least 32
        (`MIN_IMAGE_SIZE`); None accepts any size at call time.
      bn_decay: Batch-norm moving-average decay (Keras `momentum`).
      weight_decay: Slim's L2 weight decay on every kernel.
      dropout_rate: Drop probability before the logits.
    """
    # The base network overrides the scope's initializer with
    # trunc_normal(0.01); only the logits keep the scope's variance scaling.
    base = _layers.ArgScope(
        weight_decay=weight_decay,
        kernel_initializer=_layers.truncated_normal(0.01),
        bn_decay=bn_decay,
        bn_epsilon=BN_EPSILON,
    )
    images = _layers.model_input(
        "inception_v1",
        num_classes=num_classes,
        image_size=image_size,
        min_size=MIN_IMAGE_SIZE,
    )
    x = _layers.conv(images, base, 64, 7, stride=2, name="Conv2d_1a_7x7")
    x = _max_pool(x, 3, 2, "MaxPool_2a_3x3")
    x = _layers.conv(x, base, 64, 1, name="Conv2d_2b_1x1")
    x = _layers.conv(x, base, 192, 3, name="Conv2d_2c_3x3")
    x = _max_pool(x, 3, 2, "MaxPool_3a_3x3")
    for name, spec in _BODY:
        if isinstance(spec, int):
            x = _max_pool(x, spec, 2, name)
        else:
            x = _mixed(x, base, spec, name)
    logits = _layers.logits(
        x,
        dataclasses.replace(base, kernel_initializer=_layers.he_normal),
        num_classes,
        dropout_rate=dropout_rate,
        dropout_name="Logits_Dropout_0b",
        name="Logits_Conv2d_0c_1x1",
    )
    return keras.Model(images, logits, name="inception_v1")


def _mixed(
    x: keras.KerasTensor, scope: _layers.ArgScope, widths: tuple[int, ...], name: str
) -> keras.KerasTensor:
    """One Inception module: four parallel branches concatenated on channels."""
    b0, b1a, b1b, b2a, b2b, b3 = widths
    branch_0 = _layers.conv(x, scope, b0, 1, name=f"{name}_Branch_0_Conv2d_0a_1x1")
    branch_1 = _layers.conv(x, scope, b1a, 1, name=f"{name}_Branch_1_Conv2d_0a_1x1")
    branch_1 = _layers.conv(
        branch_1, scope, b1b, 3, name=f"{name}_Branch_1_Conv2d_0b_3x3"
    )
    branch_2 = _layers.conv(x, scope, b2a, 1, name=f"{name}_Branch_2_Conv2d_0a_1x1")
    branch_2 = _layers.conv(
        branch_2, scope, b2b, 3, name=f"{name}_Branch_2_Conv2d_0b_3x3"
    )
    branch_3 = _max_pool(x, 3, 1, f"{name}_Branch_3_MaxPool_0a_3x3")
    branch_3 = _layers.conv(
        branch_3, scope, b3, 1, name=f"{name}_Branch_3_Conv2d_0b_1x1"
    )
    return keras.layers.Concatenate(axis=-1, name=name)(
        [branch_0, branch_1, branch_2, branch_3]
    )


def _max_pool(
    x: keras.KerasTensor, size: int, stride: int, name: str
) -> keras.KerasTensor:
    """Slim's max pool inside `inception_v1_base`, which pads SAME throughout."""
    return keras.layers.MaxPooling2D(size, strides=stride, padding="same", name=name)(x)
