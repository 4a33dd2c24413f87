"""Is a tfloop train step as fast as `model.fit`? And as the bare floor?

Per model, one process times these variants of the same training (same
initial weights, SGD with momentum, same repeated batch of random images,
top-1 computed by every variant):

- `fit`: Keras `model.fit(..., steps_per_epoch=S)` (compiled with a
  `SparseCategoricalAccuracy` metric, `jit_compile=False`), timed as one
  whole `fit` call of S steps: fit's per-call overhead is part of its cost.
- `floor`: a tfloop step that leaves BN to Keras (`own_bn=False`): a bare
  compiled tape step, the least a hand-written loop can do.
- `tfloop`: the default tfloop step (`make_train_step`), one call per step.
- `loop`: the same step, `step.run(iterator, n)`: n steps per call
  (`--steps_per_loop`).
- optional (`--variants`): `jit` (`jit_compile=True`), `bf16` and `fp16`
  (the model built under `mixed_bfloat16` / `mixed_float16`; fp16 with a
  `LossScaleOptimizer`).

All variants read from their own iterator over the same repeated dataset and
fetch the last loss at the end of a timing. Rounds are interleaved (every
round times S steps of each variant, in an order rotated every round), so
machine drift cancels in the per-round ratios; the summary line gives, per
model, the medians of per-round speed ratios (time of the other / time of
tfloop: > 1 means tfloop is faster). The first call of each variant (tracing
included) is timed separately: the time to the first step.

    python benchmarks/train_speed.py                     # the table in README
    python benchmarks/train_speed.py --tiny              # seconds, for CI
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import tfloop

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
BASE = ("fit", "floor", "tfloop", "loop")
EXTRA = ("jit", "bf16", "fp16")
POLICIES = {"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def small_cnn(image_size: int) -> keras.Model:
    """A small BN CNN: where per-call overhead matters most."""
    layers = [keras.Input((image_size, image_size, 3))]
    for filters in (16, 32):
        layers += [
            keras.layers.Conv2D(filters, 3, strides=2, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4)]
    return keras.Sequential(layers)


def _new_model(name: str, image_size: int) -> keras.Model:
    if name == "small_cnn":
        return small_cnn(image_size)
    return tfloop.models.get(name, num_classes=4, image_size=image_size)


def _model(name: str, image_size: int, weights: list, policy: str) -> keras.Model:
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = _new_model(name, image_size)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    model.set_weights(weights)
    return model


def _optimizer(variant: str) -> keras.optimizers.Optimizer:
    optimizer = keras.optimizers.SGD(1e-3, momentum=0.9)
    return (
        keras.optimizers.LossScaleOptimizer(optimizer)
        if variant == "fp16"
        else optimizer
    )


def build(variants, model_name: str, image_size: int, steps_per_loop: int, steps: int):
    """One timing function per variant: `timer()` runs `steps` steps, returns seconds."""
    keras.utils.set_random_seed(0)
    weights = _new_model(model_name, image_size).get_weights()
    timers = {}
    for variant in variants:
        model = _model(
            model_name, image_size, weights, POLICIES.get(variant, "float32")
        )
        if variant == "fit":
            model.compile(
                optimizer=_optimizer(variant),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=[keras.metrics.SparseCategoricalAccuracy()],
                jit_compile=False,
            )
            timers[variant] = _fit_timer(model, steps)
            continue
        step = tfloop.make_train_step(
            model,
            _optimizer(variant),
            LOSS,
            own_bn=variant != "floor",
            jit_compile=variant == "jit",
        )
        timers[variant] = _step_timer(
            step, steps, steps_per_loop if variant == "loop" else 0
        )
    return timers


_DATA: dict = {}


def _dataset(batch_size: int, image_size: int) -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch_size, image_size, image_size, 3)).astype("float32")
    labels = rng.integers(0, 4, batch_size)
    return tf.data.Dataset.from_tensors((images, labels)).repeat()


def _fit_timer(model: keras.Model, steps: int):
    dataset = _DATA["dataset"]

    def timer() -> float:
        start = time.perf_counter()
        model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
        return time.perf_counter() - start

    return timer


def _step_timer(step: tfloop.TrainStep, steps: int, steps_per_loop: int):
    iterator = iter(_DATA["dataset"])

    def timer() -> float:
        start = time.perf_counter()
        if steps_per_loop:
            for first in range(0, steps, steps_per_loop):
                metrics = step.run(iterator, min(steps_per_loop, steps - first))
        else:
            for _ in range(steps):
                metrics = step(next(iterator))
        float(metrics["loss"])
        return time.perf_counter() - start

    return timer


def measure(args, model_name: str, image_size: int) -> dict[str, list[float]]:
    _DATA["dataset"] = _dataset(args.batch_size, image_size)
    timers = build(
        args.variants, model_name, image_size, args.steps_per_loop, args.steps
    )
    first = {}
    for variant, timer in timers.items():
        first[variant] = timer()  # Traces: the time to the first S steps.
    seconds = {variant: [] for variant in timers}
    variants = list(timers)
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            seconds[variant].append(timers[variant]())
    print(
        f"\n{model_name} {image_size}x{image_size}, batch {args.batch_size}, "
        f"{args.rounds} rounds x {args.steps} steps"
    )
    for variant in variants:
        ms = [1000 * s / args.steps for s in seconds[variant]]
        print(
            f"{variant:>7}: {statistics.median(ms):8.1f} ms/step (min {min(ms):.1f}, "
            f"max {max(ms):.1f}); first call {first[variant]:.1f} s"
        )
    return seconds | {f"first:{v}": [first[v]] for v in variants}


def ratios(seconds: dict[str, list[float]]) -> dict[str, float]:
    """Median over rounds of time(other) / time(tfloop), per other variant."""
    return {
        variant: statistics.median(
            other / mine for other, mine in zip(times, seconds["tfloop"])
        )
        for variant, times in seconds.items()
        if variant != "tfloop" and not variant.startswith("first:")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="small_cnn:32,resnet_v1_small:32,inception_v1:32,resnet_v1_50:32",
        help="comma-separated model:image_size (`small_cnn` or a tfloop.models name)",
    )
    parser.add_argument("--variants", default=",".join(BASE))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=16, help="steps per timing")
    parser.add_argument("--steps_per_loop", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--tiny", action="store_true", help="small_cnn, 1 round of 2 steps (CI)"
    )
    args = parser.parse_args()
    if args.tiny:
        args.models, args.rounds, args.steps, args.steps_per_loop = (
            "small_cnn:32",
            1,
            2,
            2,
        )
        args.batch_size = 4
    args.variants = args.variants.split(",")
    unknown = set(args.variants) - set(BASE + EXTRA)
    if unknown or "tfloop" not in args.variants:
        parser.error(f"--variants: unknown {sorted(unknown)} or no `tfloop`")

    summary = []
    for entry in args.models.split(","):
        name, size = entry.split(":")
        seconds = measure(args, name, int(size))
        first = (
            seconds["first:tfloop"][0] / seconds["first:fit"][0]
            if "fit" in args.variants
            else float("nan")
        )
        summary.append(
            f"{name}@{size}: "
            + ", ".join(f"{v}/tfloop {r:.3f}" for v, r in ratios(seconds).items())
            + f", first call tfloop/fit {first:.2f}"
        )
    print(
        "\nspeed ratios (time of X / time of tfloop; > 1: tfloop faster): "
        + "; ".join(summary)
    )


if __name__ == "__main__":
    main()
