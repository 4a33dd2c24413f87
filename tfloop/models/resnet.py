"""ResNet v1, a Keras port of TF-slim's `nets/resnet_v1.py` and `resnet_utils.py`.

Defaults are those of slim's `resnet_arg_scope`: every convolution but the
logits is followed by batch norm (decay 0.997, epsilon 1e-5, learned scale)
and so has no bias; weight decay is 1e-4; kernels use variance scaling. The
head is slim's with `global_pool=True` (global average pooling, then a 1x1
conv with bias); slim's ResNet has no dropout.

Slim's details, kept here because they change the outputs:
  * The bottleneck unit puts its stride on the 3x3 conv (conv2), not on the
    first 1x1, and a block's stride sits on its *last* unit, not its first.
  * The shortcut is a strided 1x1 conv + BN only when the depth changes;
    otherwise it is the input, subsampled by a 1x1 max pool when strided.
  * Strided convs are `conv2d_same`: explicit symmetric zero padding then a
    VALID conv, which differs from Keras' "same" padding on even sizes.
  * pool1 is a 3x3 stride-2 max pool with SAME padding.
"""

from __future__ import annotations

import keras

from tfloop.models import _layers

WEIGHT_DECAY = 1e-4
BN_DECAY = 0.997
BN_EPSILON = 1e-5
# Every layer pads SAME (or conv2d_same), so any size runs; 32 is the
# network's total stride, the smallest size at which each of its five stride-2
# layers still halves a map of at least 2x2 real (not padded) activations.
MIN_IMAGE_SIZE = 32

# (base_depth, num_units, stride) of each block, as slim's resnet_v1_block
# calls; a unit outputs 4 * base_depth channels.
_RESNET_V1_50 = ((64, 3, 2), (128, 4, 2), (256, 6, 2), (512, 3, 1))
# Slim's own "shallow and thin ResNet v1 for faster tests" (`_resnet_small` in
# resnet_v1_test.py): 11 units with outputs of 4 to 32 channels behind the full
# 64-channel root block; 14k weights before the logits (9.4k of them in conv1)
# instead of ResNet-50's 23.5M.
_RESNET_V1_SMALL = ((1, 3, 2), (2, 3, 2), (4, 3, 2), (8, 2, 1))


def resnet_v1_50(
    num_classes: int,
    *,
    image_size: int | None = None,
    bn_decay: float = BN_DECAY,
    weight_decay: float = WEIGHT_DECAY,
) -> keras.Model:
    """Builds slim's `resnet_v1_50(global_pool=True)` returning logits.

    Args:
      num_classes: Number of logits, at least 2.
      image_size: Height and width of the square input, at least 32
        (`MIN_IMAGE_SIZE`); None accepts any size at call time.
      bn_decay: Batch-norm moving-average decay (Keras `momentum`).
      weight_decay: Slim's L2 weight decay on every kernel.
    """
    return _resnet_v1(
        "resnet_v1_50", _RESNET_V1_50, num_classes, image_size, bn_decay, weight_decay
    )


def resnet_v1_small(
    num_classes: int,
    *,
    image_size: int | None = None,
    bn_decay: float = BN_DECAY,
    weight_decay: float = WEIGHT_DECAY,
) -> keras.Model:
    """Builds slim's test-only small ResNet v1, for fast tests of training code.

    It is `resnet_v1_50` with the blocks of slim's `_resnet_small`: depths
    (3, 3, 3, 2) units and bottleneck widths (1, 2, 4, 8), so outputs of 4, 8,
    16 and 32 channels. Same arguments, defaults and minimum size as
    `resnet_v1_50`.
    """
    return _resnet_v1(
        "resnet_v1_small",
        _RESNET_V1_SMALL,
        num_classes,
        image_size,
        bn_decay,
        weight_decay,
    )


def _resnet_v1(
    name: str,
    blocks: tuple[tuple[int, int, int], ...],
    num_classes: int,
    image_size: int | None,
    bn_decay: float,
    weight_decay: float,
) -> keras.Model:
    """Slim's `resnet_v1` generator: root block, bottleneck blocks, head."""
    scope = _layers.ArgScope(
        weight_decay=weight_decay,
        bn_decay=bn_decay,
        bn_epsilon=BN_EPSILON,
        bn_scale=True,
    )
    images = _layers.model_input(
        name, num_classes=num_classes, image_size=image_size, min_size=MIN_IMAGE_SIZE
    )
    x = _conv2d_same(images, scope, 64, 7, 2, name="conv1")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)
    for b, (base_depth, num_units, stride) in enumerate(blocks, start=1):
        for u in range(1, num_units + 1):
            x = _bottleneck(
                x,
                scope,
                depth=4 * base_depth,
                depth_bottleneck=base_depth,
                stride=stride if u == num_units else 1,
                name=f"block{b}_unit_{u}",
            )
    logits = _layers.logits(x, scope, num_classes, name="logits")
    return keras.Model(images, logits, name=name)


def _bottleneck(
    x: keras.KerasTensor,
    scope: _layers.ArgScope,
    *,
    depth: int,
    depth_bottleneck: int,
    stride: int,
    name: str,
) -> keras.KerasTensor:
    """Slim's `resnet_v1.bottleneck`: relu(shortcut + 1x1 -> 3x3/stride -> 1x1)."""
    if depth == x.shape[-1]:
        shortcut = x
        if stride > 1:
            shortcut = keras.layers.MaxPooling2D(
                1, strides=stride, padding="same", name=f"{name}_shortcut"
            )(x)
    else:
        shortcut = _layers.conv(
            x, scope, depth, 1, stride=stride, relu=False, name=f"{name}_shortcut"
        )
    residual = _layers.conv(x, scope, depth_bottleneck, 1, name=f"{name}_conv1")
    residual = _conv2d_same(
        residual, scope, depth_bottleneck, 3, stride, name=f"{name}_conv2"
    )
    residual = _layers.conv(residual, scope, depth, 1, relu=False, name=f"{name}_conv3")
    x = keras.layers.Add(name=f"{name}_add")([shortcut, residual])
    return keras.layers.ReLU(name=f"{name}_Relu")(x)


def _conv2d_same(
    x: keras.KerasTensor,
    scope: _layers.ArgScope,
    filters: int,
    kernel_size: int,
    stride: int,
    *,
    name: str,
) -> keras.KerasTensor:
    """Slim's `resnet_utils.conv2d_same`: conv + BN + ReLU padded like SAME.

    With stride > 1, Keras' "same" pads more at the end than at the start on
    even inputs; slim instead zero-pads (k - 1) // 2 before and the rest after,
    then convolves VALID, so outputs stay aligned with the input's corners.
    """
    if stride == 1:
        return _layers.conv(x, scope, filters, kernel_size, name=name)
    pad_beg = (kernel_size - 1) // 2
    pad = (pad_beg, kernel_size - 1 - pad_beg)
    x = keras.layers.ZeroPadding2D((pad, pad), name=f"{name}_pad")(x)
    return _layers.conv(
        x, scope, filters, kernel_size, stride=stride, padding="valid", name=name
    )
