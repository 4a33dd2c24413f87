"""Flags of the `tfloop-train` binary (absl), and their conversion to a config.

Flagfiles in `flags/` hold ready experiments: `tfloop-train --flagfile=...`.
"""

from __future__ import annotations

from absl import flags

from tfloop import bn, distribute, models, nonfinite, schedules
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
flags.DEFINE_integer("epochs", _D.epochs, "Epochs to train.", lower_bound=1)
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
    "checkpoint (at most, with --bn_recalibrate_tolerance); 0 turns it off.",
    lower_bound=0,
)
flags.DEFINE_float(
    "bn_recalibrate_tolerance",
    _D.bn_recalibrate_tolerance,
    "Stop recalibrating once every BN layer's statistics have this relative "
    "standard error (RMS over channels); 0: always use all batches.",
    lower_bound=0.0,
)
flags.DEFINE_integer(
    "bn_stale_check_batches",
    _D.bn_stale_check_batches,
    "Validation batches on which the moving averages are evaluated for the "
    "`stale` line and the moving-average summaries; 0: all.",
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

# Issue 11: export.
flags.DEFINE_string(
    "export_dir",
    None,
    "After the final recalibration, write a SavedModel (serving signatures with "
    "preprocessing) and a .keras file here; must be new or empty.",
)
flags.register_multi_flags_validator(
    ["export_dir", "compare_bn"],
    lambda f: not (f["export_dir"] and f["compare_bn"]),
    message="--export_dir does not apply to --compare_bn (four runs, no one model).",
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

# Runs that survive: checkpoints, determinism, non-finite values.
flags.DEFINE_integer(
    "checkpoint_every_steps",
    _D.checkpoint_every_steps,
    "Also checkpoint every N steps (with --model_dir); 0: at epoch ends only.",
    lower_bound=0,
)
flags.DEFINE_bool(
    "deterministic",
    _D.deterministic,
    "Op determinism on: a resumed run is bit-identical to an uninterrupted one.",
)
flags.DEFINE_enum(
    "on_nonfinite",
    _D.on_nonfinite,
    list(nonfinite.MODES),
    "A step with a NaN/Inf loss, gradient or BN statistic: `stop` the run, or "
    "`skip` the step (counted). Such a step is never applied.",
)
flags.register_validator(
    "learning_rate",
    lambda value: value > 0,
    message="--learning_rate must be positive.",
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


# --- Slim's train_image_classifier.py / eval_image_classifier.py flags ------
# Same names and meanings as slim's, so a slim command line carries over; the
# README's migration table lists every difference.
flags.DEFINE_enum(
    "mode", "train", ["train", "eval"], "`eval`: evaluate a checkpoint (tfloop-eval)."
)
flags.DEFINE_string(
    "checkpoint_path",
    None,
    "Train: slim checkpoint (prefix or directory) to fine-tune from, used only "
    "when --model_dir holds no checkpoint. Eval: the checkpoint to evaluate "
    "(tfloop's or slim's); default: --model_dir's latest.",
)
flags.DEFINE_string(
    "checkpoint_exclude_scopes",
    None,
    "Comma-separated slim scopes not loaded from --checkpoint_path.",
)
flags.DEFINE_string(
    "trainable_scopes",
    None,
    "Comma-separated slim scopes to train; other layers (BN statistics "
    "included) stay fixed. Default: all.",
)
flags.DEFINE_bool(
    "ignore_missing_vars",
    _D.ignore_missing_vars,
    "Skip variables --checkpoint_path lacks or holds with another shape.",
)
flags.DEFINE_enum(
    "learning_rate_decay_type",
    _D.learning_rate_decay_type,
    list(schedules.DECAY_TYPES),
    "Learning-rate decay (slim's, plus cosine over the run).",
)
flags.DEFINE_float(
    "learning_rate_decay_factor",
    _D.learning_rate_decay_factor,
    "Exponential decay factor.",
)
flags.DEFINE_float(
    "num_epochs_per_decay",
    _D.num_epochs_per_decay,
    "Epochs per exponential decay step; length of the polynomial decay.",
)
flags.DEFINE_float(
    "end_learning_rate",
    _D.end_learning_rate,
    "Final rate of polynomial and cosine decay.",
    lower_bound=0.0,
)
flags.DEFINE_float(
    "warmup_epochs", _D.warmup_epochs, "Epochs of linear warm-up.", lower_bound=0.0
)
flags.DEFINE_float(
    "weight_decay", None, "L2 weight decay; default: the model's (slim arg_scope)."
)
flags.DEFINE_float(
    "label_smoothing", _D.label_smoothing, "Label smoothing of the training loss."
)
flags.DEFINE_float("momentum", None, "--optimizer=momentum: momentum (default 0.9).")
flags.DEFINE_float("rmsprop_decay", None, "--optimizer=rmsprop: decay (rho).")
flags.DEFINE_float("rmsprop_momentum", None, "--optimizer=rmsprop: momentum.")
flags.DEFINE_float(
    "opt_epsilon", None, "Epsilon of adam, adamw, rmsprop, adagrad; default Keras'."
)
flags.DEFINE_float("adam_beta1", None, "Adam's beta_1.")
flags.DEFINE_float("adam_beta2", None, "Adam's beta_2.")
flags.DEFINE_integer(
    "max_number_of_steps",
    None,
    "Stop training at this global step (or after --epochs, if sooner).",
    lower_bound=1,
)
flags.DEFINE_alias("log_every_n_steps", "log_every")
flags.DEFINE_float(
    "moving_average_decay",
    None,
    "Keep an EMA of the weights; validate and export it with recalibrated BN "
    "(MODEL_DIR/averaged). Eval: evaluate MODEL_DIR/averaged.",
)
flags.DEFINE_enum(
    "dataset_split_name", "validation", ["train", "validation"], "Eval: the split."
)
flags.DEFINE_integer(
    "max_num_batches", None, "Eval: at most this many batches.", lower_bound=1
)
