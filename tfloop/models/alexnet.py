"""AlexNet v2, a Keras port of TF-slim's `nets/alexnet.py`.

This is the "One weird trick" AlexNet (no LRN, no grouping) that slim calls
`alexnet_v2`, with the defaults of `alexnet_v2_arg_scope`: ReLU, weight decay
5e-4, biases initialized to 0.1, no batch norm. As in slim the fully connected
layers are convolutions (fc6 a 5x5 VALID conv, fc7 and fc8 1x1 convs), and
`global_pool=True` averages fc7's output so inputs above 224 also work.
"""

from __future__ import annotations

import keras

from tfloop.models import _layers

WEIGHT_DECAY = 5e-4
DROPOUT_RATE = 0.5  # slim's dropout_keep_prob=0.5
# fc6 is a 5x5 VALID conv, so pool5 must be at least 5x5: pool5 <- 11x11
# conv5 <- pool2 23x23 <- 47x47 conv1 <- (47 - 1) * 4 + 11 = 195 pixels.
MIN_IMAGE_SIZE = 195


def alexnet_v2(
    num_classes: int,
    *,
    image_size: int | None = None,
    weight_decay: float = WEIGHT_DECAY,
    dropout_rate: float = DROPOUT_RATE,
) -> keras.Model:
    """Builds slim's `alexnet_v2(global_pool=True)` returning logits.

    Args:
      num_classes: Number of logits, at least 2.
      image_size: Height and width of the square input, at least 195
        (`MIN_IMAGE_SIZE`); None accepts any size at call time.
      weight_decay: Slim's L2 weight decay on every kernel.
      dropout_rate: Drop probability of dropout6 and dropout7.
    """
    scope = _layers.ArgScope(
        weight_decay=weight_decay,
        kernel_initializer=keras.initializers.GlorotUniform,  # slim's xavier
        bias_init=0.1,
    )
    images = _layers.model_input(
        "alexnet_v2",
        num_classes=num_classes,
        image_size=image_size,
        min_size=MIN_IMAGE_SIZE,
    )
    x = _layers.conv(images, scope, 64, 11, stride=4, padding="valid", name="conv1")
    x = _max_pool(x, "pool1")
    x = _layers.conv(x, scope, 192, 5, name="conv2")
    x = _max_pool(x, "pool2")
    x = _layers.conv(x, scope, 384, 3, name="conv3")
    x = _layers.conv(x, scope, 384, 3, name="conv4")
    x = _layers.conv(x, scope, 256, 3, name="conv5")
    x = _max_pool(x, "pool5")
    fc_init = _layers.truncated_normal(0.005)
    x = _layers.conv(
        x, scope, 4096, 5, padding="valid", kernel_initializer=fc_init, name="fc6"
    )
    x = _layers.dropout(x, dropout_rate, name="dropout6")
    x = _layers.conv(x, scope, 4096, 1, kernel_initializer=fc_init, name="fc7")
    logits = _layers.logits(
        x,
        scope,
        num_classes,
        dropout_rate=dropout_rate,
        dropout_name="dropout7",
        kernel_initializer=fc_init,
        name="fc8",
    )
    return keras.Model(images, logits, name="alexnet_v2")


def _max_pool(x: keras.KerasTensor, name: str) -> keras.KerasTensor:
    """Slim's 3x3 stride-2 max pool; `alexnet_v2_arg_scope` makes it VALID."""
    return keras.layers.MaxPooling2D(3, strides=2, padding="valid", name=name)(x)
