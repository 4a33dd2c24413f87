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
    sync_bn: bool = False
    strategy: str = "default"
    num_cpu_devices: int = 0
    model_dir: str | None = None
    seed: int = 0
    log_every: int = 50
    # Speed (benchmarks/README.md has the measurements behind the defaults).
    steps_per_loop: int = 1
    jit_compile: bool = False
    mixed_precision: str = "float32"
    cache: bool = False
    # Not a flag: leave BN to stock Keras (the naive loop), for comparisons.
    stock_bn: bool = False
