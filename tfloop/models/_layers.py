"""Keras building blocks that stand in for TF-slim's `arg_scope` machinery.

Slim networks are written as bare `slim.conv2d(...)` calls whose weight decay,
initializer, normalizer and activation come from an enclosing `arg_scope`. Here
that scope is an explicit, immutable `ArgScope` value handed to `conv`, so each
model file can read like its slim original without repeating those settings.

This is a private module: its names are shared by the model files only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras

Initializer = Callable[[], keras.initializers.Initializer]


def he_normal() -> keras.initializers.Initializer:
    """Slim's `variance_scaling_initializer()` (factor 2, fan-in, truncated normal).

    Slim draws from a normal truncated at 2 stddev with stddev sqrt(1.3 * 2 / n);
    Keras draws the same shape with stddev sqrt(2 / n) / 0.8796, i.e. with
    sqrt(1.29 * 2 / n): the same initializer up to slim's rounding of 1.29.
    """
    return keras.initializers.HeNormal()


def truncated_normal(stddev: float) -> Initializer:
    """Slim's `trunc_normal(stddev)`; both truncate at two standard deviations."""
    return lambda: keras.initializers.TruncatedNormal(stddev=stddev)


def l2(weight_decay: float) -> keras.regularizers.Regularizer | None:
    """The Keras twin of `slim.l2_regularizer(weight_decay)`.

    Slim's regularizer is `weight_decay * tf.nn.l2_loss(w)`, which is
    `weight_decay * sum(w**2) / 2`, while Keras' `L2(l)` is `l * sum(w**2)`;
    `L2(weight_decay / 2)` therefore adds exactly slim's loss term.
    """
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


@dataclasses.dataclass(frozen=True)
class ArgScope:
    """What a slim arg_scope sets for every `slim.conv2d` of one network.

    Attributes:
      weight_decay: Slim's `weight_decay` (see `l2` for the Keras conversion);
        like slim it applies to conv kernels only, never to biases or BN.
      kernel_initializer: Makes a fresh initializer per layer (one unseeded
        Keras initializer object would give every layer identical weights).
      bn_decay: Batch-norm moving-average decay (Keras `momentum`); None means
        the network has no batch norm and its convolutions carry biases.
      bn_epsilon: Batch-norm variance epsilon.
      bn_scale: Whether batch norm learns a gamma (slim's `scale`).
      bias_init: Constant initial bias of convolutions without batch norm.
    """

    weight_decay: float
    kernel_initializer: Initializer = he_normal
    bn_decay: float | None = None
    bn_epsilon: float = 1e-3
    bn_scale: bool = False
    bias_init: float = 0.0

    def __post_init__(self) -> None:
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if self.bn_decay is not None and not 0 <= self.bn_decay < 1:
            raise ValueError(f"bn_decay must be in [0, 1), got {self.bn_decay}.")


def conv(
    x: keras.KerasTensor,
    scope: ArgScope,
    filters: int,
    kernel_size: int,
    *,
    name: str,
    stride: int = 1,
    padding: str = "same",
    relu: bool = True,
    normalize: bool = True,
    kernel_initializer: Initializer | None = None,
    bias_init: float | None = None,
) -> keras.KerasTensor:
    """`slim.conv2d` under `scope`: convolution, then batch norm, then ReLU.

    As in slim, the convolution has a bias only when no batch norm follows it
    (BN's beta would make a bias redundant). `normalize=False` is slim's
    `normalizer_fn=None` and `relu=False` its `activation_fn=None`; the
    initializer and bias arguments override the scope for one layer.
    """
    with_bn = normalize and scope.bn_decay is not None
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=stride,
        padding=padding,
        use_bias=not with_bn,
        kernel_initializer=(kernel_initializer or scope.kernel_initializer)(),
        bias_initializer=keras.initializers.Constant(
            scope.bias_init if bias_init is None else bias_init
        ),
        kernel_regularizer=l2(scope.weight_decay),
        name=name,
    )(x)
    if with_bn:
        # A plain Keras BN layer (not synchronized, not subclassed): tfloop's
        # training loop manages these layers' moving statistics itself.
        x = keras.layers.BatchNormalization(
            momentum=scope.bn_decay,
            epsilon=scope.bn_epsilon,
            scale=scope.bn_scale,
            name=f"{name}_BatchNorm",
        )(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_Relu")(x)
    return x


def model_input(
    model: str, *, num_classes: int, image_size: int | None, min_size: int
) -> keras.KerasTensor:
    """Checks the arguments every model takes, then returns its image input.

    The input is float NHWC, (None, image_size, image_size, 3); with
    `image_size=None` it is (None, None, None, 3) and the size is only checked,
    by TensorFlow itself, when the model is called.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {num_classes!r}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    if image_size is not None and image_size < min_size:
        raise ValueError(f"`{model}` needs image_size >= {min_size}, got {image_size}.")
    return keras.Input((image_size, image_size, 3), name="images")


def dropout(x: keras.KerasTensor, rate: float, *, name: str) -> keras.KerasTensor:
    """`slim.dropout` with keep probability `1 - rate`."""
    if not 0 <= rate < 1:
        raise ValueError(f"dropout_rate must be in [0, 1), got {rate}.")
    return keras.layers.Dropout(rate, name=name)(x)


def logits(
    x: keras.KerasTensor,
    scope: ArgScope,
    num_classes: int,
    *,
    name: str,
    dropout_rate: float | None = None,
    dropout_name: str = "Dropout",
    kernel_initializer: Initializer | None = None,
) -> keras.KerasTensor:
    """Slim's classifier with `global_pool=True`: pool, dropout, 1x1 conv.

    Global average pooling (slim's `reduce_mean` over height and width) makes
    the head independent of the input size. The logits are a 1x1 convolution
    with a zero-initialized bias and no BN or ReLU, squeezed to
    (batch, num_classes); there is no softmax.
    """
    x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="global_pool")(x)
    if dropout_rate is not None:
        x = dropout(x, dropout_rate, name=dropout_name)
    x = conv(
        x,
        scope,
        num_classes,
        1,
        name=name,
        relu=False,
        normalize=False,
        kernel_initializer=kernel_initializer,
        bias_init=0.0,
    )
    return keras.layers.Flatten(name=f"{name}_SpatialSqueeze")(x)
