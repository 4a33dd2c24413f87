"""Keras 3 ports of TF-slim image classifiers, with slim's defaults.

Each network copies the layer structure of its slim definition and the
defaults of its slim `arg_scope` (batch-norm decay and epsilon, weight decay,
initializers, dropout), so that training recipes written for slim carry over:

| name              | slim source                      | minimum image size |
|-------------------|----------------------------------|--------------------|
| `alexnet_v2`      | `alexnet.alexnet_v2`             | 195                |
| `inception_v1`    | `inception_v1.inception_v1`      | 32                 |
| `resnet_v1_50`    | `resnet_v1.resnet_v1_50`         | 32                 |
| `resnet_v1_small` | `resnet_v1_test._resnet_small`   | 32                 |

`load_slim_checkpoint` reads slim's TF1 checkpoints (published ImageNet
ones included) into these nets; `set_trainable_scopes` is slim's
`--trainable_scopes`. All use slim's `global_pool=True` head, so any size at or above the minimum
works. Models are functional `keras.Model`s from float NHWC images to logits
(no softmax). Batch norm layers are plain `keras.layers.BatchNormalization`,
whose moving statistics tfloop's training loop manages. Weight decay is in
`model.losses`, scaled to equal slim's `l2_regularizer` exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import keras

from tfloop.models.alexnet import alexnet_v2
from tfloop.models.inception import inception_v1
from tfloop.models.resnet import resnet_v1_50, resnet_v1_small
from tfloop.models.slim_checkpoint import (
    SlimCheckpointLoad,
    load_slim_checkpoint,
    set_trainable_scopes,
)

_BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "alexnet_v2": alexnet_v2,
    "inception_v1": inception_v1,
    "resnet_v1_50": resnet_v1_50,
    "resnet_v1_small": resnet_v1_small,
}

NAMES: tuple[str, ...] = tuple(_BUILDERS)

__all__ = [
    "NAMES",
    "SlimCheckpointLoad",
    "get",
    "load_slim_checkpoint",
    "set_trainable_scopes",
]


def get(
    name: str,
    *,
    num_classes: int,
    bn_decay: float | None = None,
    image_size: int | None = None,
    weight_decay: float | None = None,
    dropout_rate: float | None = None,
) -> keras.Model:
    """Builds the network `name` (one of `NAMES`) with slim's defaults.

    Args:
      name: Which network; see `NAMES` and the table in this module's doc.
      num_classes: Number of logits, at least 2.
      bn_decay: Batch-norm moving-average decay (Keras `momentum`); None keeps
        slim's (0.9997 for Inception, 0.997 for ResNet). AlexNet has no batch
        norm and accepts only None.
      image_size: Height and width of the square input; None builds a model
        for any size (then checked only when called). Below the model's
        minimum (see module doc) raises ValueError.
      weight_decay: Slim's L2 weight decay; None keeps slim's (5e-4 AlexNet,
        4e-5 Inception, 1e-4 ResNet).
      dropout_rate: Drop probability (1 - slim's keep_prob); None keeps slim's
        (0.5 AlexNet, 0.2 Inception). ResNet has no dropout and accepts only
        None.

    Returns:
      A functional model mapping (batch, size, size, 3) float images to
      (batch, num_classes) logits.

    Raises:
      ValueError: For an unknown name, an option the model does not have, or
        an out-of-range value; all messages are one line.
      TypeError: If num_classes is not an int.
    """
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"Unknown model `{name}`; valid names: {', '.join(NAMES)}.")
    options = {
        "bn_decay": bn_decay,
        "weight_decay": weight_decay,
        "dropout_rate": dropout_rate,
    }
    accepted = inspect.signature(builder).parameters
    for option, value in options.items():
        if value is not None and option not in accepted:
            raise ValueError(f"`{name}` has no {option}; leave it None, got {value}.")
    kwargs = {k: v for k, v in options.items() if v is not None}
    return builder(num_classes, image_size=image_size, **kwargs)
