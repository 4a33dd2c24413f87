"""`TrainConfig`: everything the binary's training run depends on, frozen.

The flags (`tfloop.flags`) are one way to fill it; tests and `tfloop.demo`
build it directly, so the run is the same whichever way it was configured.
"""

from __future__ import annotations

import dataclasses

# Keras dtype policies of `--mixed_precision`.
MIXED_PRECISION_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run of `tfloop.train.train`; fields mirror the flags."""

    model: str = "inception_v1"
    num_classes: int | None = None
    dataset: str = "shapes"
    data_dir: str | None = None
    image_size: int = 32
    batch_size: int = 32
    epochs: int = 3
    steps_per_epoch: int = 0
    train_examples: int | None = None
    val_examples: int | None = None
    optimizer: str = "Adam"
    learning_rate: float = 0.001
    bn_decay: float | None = None
    bn_averaging: str = "debias"
    bn_recalibrate_batches: int = 50  # benchmarks/recalibration_batches.py
    bn_recalibrate_tolerance: float = 0.02  # benchmarks/README.md, section 3.
    bn_stale_check_batches: int = 4
    sync_bn: bool = False
    strategy: str = "default"
    num_cpu_devices: int = 0
    model_dir: str | None = None
    seed: int = 0
    log_every: int = 50
    # Issue 11: SavedModel and .keras file after the final recalibration.
    export_dir: str | None = None
    # Runs that survive (checkpoints, non-finite values).
    checkpoint_every_steps: int = 0
    deterministic: bool = False
    on_nonfinite: str = "stop"
    # Speed (benchmarks/README.md has the measurements behind the defaults).
    steps_per_loop: int = 1
    jit_compile: bool = False
    mixed_precision: str = "float32"
    cache: bool = False
    # Not a flag: leave BN to stock Keras (the naive loop), for comparisons.
    stock_bn: bool = False
    # Slim's train_image_classifier.py flags (README: "Coming from slim").
    checkpoint_path: str | None = None
    checkpoint_exclude_scopes: str | None = None  # Comma-separated slim scopes.
    trainable_scopes: str | None = None  # Comma-separated slim scopes.
    ignore_missing_vars: bool = False
    learning_rate_decay_type: str = "fixed"
    learning_rate_decay_factor: float = 0.94
    num_epochs_per_decay: float = 2.0
    end_learning_rate: float = 0.0001
    warmup_epochs: float = 0.0
    weight_decay: float | None = None  # None: the model's arg_scope default.
    label_smoothing: float = 0.0
    momentum: float | None = None  # None (all optimizer knobs): Keras' default.
    rmsprop_decay: float | None = None
    rmsprop_momentum: float | None = None
    opt_epsilon: float | None = None
    adam_beta1: float | None = None
    adam_beta2: float | None = None
    max_number_of_steps: int | None = None
    moving_average_decay: float | None = None
