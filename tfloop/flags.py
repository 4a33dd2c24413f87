"""Flags of the `tfloop-train` binary (absl), and their conversion to a config.

Flagfiles in `flags/` hold ready experiments: `tfloop-train --flagfile=...`.
"""

from __future__ import annotations

from absl import flags

from tfloop import bn, distribute, models
from tfloop.config import MIXED_PRECISION_POLICIES, TrainConfig
from tfloop.optimize import OPTIMIZER_CLS_NAMES

_D = TrainConfig()  # Defaults live in one place: the config.

flags.DEFINE_enum("model", _D.model, list(models.NAMES), "Network (slim's defaults).")
flags.DEFINE_integer(
    "num_classes", None, "Classes; default: the dataset's.", lower_bound=2
)
flags.DEFINE_enum(
    "dataset", _D.dataset, ["shapes", "folder", "tfrecord"], "Input data."
)
flags.DEFINE_string("data_dir", None, "Data directory for `folder` and `tfrecord`.")
flags.DEFINE_integer(
    "image_size", _D.image_size, "Input height and width.", lower_bound=1
)
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size.", lower_bound=1)
flags.DEFINE_integer("epochs", _D.epochs, "Epochs to train.", lower_bound=0)
flags.DEFINE_integer(
    "steps_per_epoch",
    _D.steps_per_epoch,
    "Steps per epoch; 0: one pass over the data.",
    lower_bound=0,
)
flags.DEFINE_integer(
    "train_examples", None, "Size of the generated `shapes` train split.", lower_bound=1
)
flags.DEFINE_integer(
    "val_examples",
    None,
    "Size of the generated `shapes` validation split.",
    lower_bound=1,
)
flags.DEFINE_enum(
    "optimizer",
    _D.optimizer,
    list(OPTIMIZER_CLS_NAMES),
    "Optimizer.",
    case_sensitive=False,
)
flags.DEFINE_float("learning_rate", _D.learning_rate, "Learning rate.", lower_bound=0.0)
flags.DEFINE_float(
    "bn_decay", None, "BN moving-average decay; default: the model's (slim's)."
)
flags.DEFINE_enum(
    "bn_averaging", _D.bn_averaging, list(bn.AVERAGING_MODES), "BN averaging."
)
flags.DEFINE_integer(
    "bn_recalibrate_batches",
    _D.bn_recalibrate_batches,
    "Batches of precise-BN recalibration before every validation and "
    "checkpoint; 0 turns it off.",
    lower_bound=0,
)
flags.DEFINE_bool("sync_bn", _D.sync_bn, "Normalize with global-batch statistics.")
flags.DEFINE_enum("strategy", _D.strategy, list(distribute.STRATEGIES), "Distribution.")
flags.DEFINE_integer(
    "num_cpu_devices",
    _D.num_cpu_devices,
    "With `mirrored`: logical CPU devices to use.",
    lower_bound=0,
)
flags.DEFINE_string("model_dir", None, "Checkpoints and summaries; default: none.")
flags.DEFINE_integer("seed", _D.seed, "Seed of data, weights and augmentation.")
flags.DEFINE_integer(
    "log_every", _D.log_every, "Print a step line every N steps.", lower_bound=1
)
flags.DEFINE_bool(
    "compare_bn", False, "Run naive, decay-0.99 and tfloop's BN; write a PNG and table."
)

# Speed: benchmarks/README.md has the measurements behind the defaults.
flags.DEFINE_integer(
    "steps_per_loop",
    _D.steps_per_loop,
    "Train steps per tf.function call (chunks end at --log_every points).",
    lower_bound=1,
)
flags.DEFINE_bool("jit_compile", _D.jit_compile, "Compile the train step with XLA.")
flags.DEFINE_enum(
    "mixed_precision",
    _D.mixed_precision,
    list(MIXED_PRECISION_POLICIES),
    "Keras dtype policy of the model.",
)
flags.DEFINE_bool(
    "cache", _D.cache, "Cache decoded training images in memory (the first epoch)."
)

flags.register_validator(
    "bn_decay",
    lambda value: value is None or 0.0 <= value < 1.0,
    message="--bn_decay must be in [0, 1).",
)
flags.register_multi_flags_validator(
    ["dataset", "data_dir"],
    lambda f: f["dataset"] == "shapes" or bool(f["data_dir"]),
    message="--dataset=folder and --dataset=tfrecord need --data_dir.",
)


def config_from_flags() -> TrainConfig:
    """The parsed flags as a `TrainConfig`."""
    values = flags.FLAGS
    return TrainConfig(
        **{
            field: values[field].value
            for field in TrainConfig.__dataclass_fields__
            if field in values
        }
    )
