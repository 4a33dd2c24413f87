"""What the examples share: flags for their size, the model, the data, the loss.

Every example trains slim's small ResNet on the built-in `shapes` data, so
that they differ only in the trainer around tfloop's steps.
"""

import keras
from absl import flags

import tfloop

flags.DEFINE_integer("image_size", 32, "Input height and width.")
flags.DEFINE_integer("num_examples", 4096, "Size of the train split (1/8 validation).")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
FLAGS = flags.FLAGS

# Per-example losses: tfloop's steps average over the global batch themselves.
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def model() -> keras.Model:
    """slim's small ResNet v1 for the 4 `shapes` classes (build under a scope)."""
    return tfloop.models.get(
        "resnet_v1_small", num_classes=4, image_size=FLAGS.image_size
    )


def datasets():
    """Train (augmented), calibration and validation batches.

    Calibration batches are training images as validation sees them (central
    crop, no augmentation): precise BN measures the inference-time inputs.
    """
    load = {
        "data_dir": None,
        "image_size": FLAGS.image_size,
        "batch_size": FLAGS.batch_size,
        "seed": 0,
    }
    train = FLAGS.num_examples
    val = max(1, FLAGS.num_examples // 8)
    train_data, _ = tfloop.data.load(
        "shapes", split="train", num_examples=train, **load
    )
    calib_data, _ = tfloop.data.load(
        "shapes", split="train", num_examples=train, augment=False, **load
    )
    val_data, _ = tfloop.data.load(
        "shapes", split="validation", num_examples=val, **load
    )
    return train_data, calib_data, val_data
