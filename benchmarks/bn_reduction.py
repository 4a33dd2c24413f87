"""What does owning BN cost per train step on 2 replicas? Stock vs tfloop vs synced.

Times one train step of a small BN CNN (`resnet_v1_small`, 32x32, per-replica
batch 32) on 2 logical CPU devices under `MirroredStrategy`, three ways:

- `stock`: Keras BN left alone (`own_bn=False`): each replica updates its own
  copy of the moving statistics, no BN reduction at all (the bug tfloop fixes).
- `tfloop`: the default step: one fused all-reduce of all layers' moments,
  then debiased EMA updates.
- `synchronized`: stock step, every BN layer built `synchronized=True`:
  Keras all-reduces each layer's moments in the forward pass (and backward).

All run in one process on the same global batch (no input pipeline in the
timing), interleaved: every round times `--steps` steps of each variant, in
an order rotated every round. It prints each variant's median ms/step over
rounds, the medians of the per-round ratios to stock (robust to a slow
machine when the rounds are short) and the ratio of the fastest rounds.

    /tmp/venv/bin/python benchmarks/bn_reduction.py [--rounds 15] [--steps 10]

Measured on a shared 2-core CPU VM (TF 2.21, Keras 3.15; 20-40 rounds x 10
steps, four runs): stock 42-45 ms/step; tfloop/stock 1.005, 1.011, 1.03 and
once 1.09 (medians of per-round ratios; rounds vary +-20%); synchronized/stock
1.09-1.16. Tracing (the first step): stock 13-15 s, tfloop 14 s,
synchronized 61-68 s.
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
import train_speed  # This directory: the small BN CNN.

import tfloop
from tfloop import distribute, models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
VARIANTS = ("stock", "tfloop", "synchronized")


def synchronized_copy(model: keras.Model) -> keras.Model:
    """A copy of `model` (same weights) whose BN layers are `synchronized=True`."""

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization):
            config["synchronized"] = True
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def build_steps(
    strategy: tf.distribute.Strategy,
    model_name: str,
    image_size: int,
    variants: tuple[str, ...] = VARIANTS,
) -> dict[str, tfloop.TrainStep]:
    """One model, optimizer and train step per variant, equal initial weights."""
    trains = {}
    with strategy.scope():
        base = (
            train_speed.small_cnn(image_size)
            if model_name == "small_cnn"
            else models.get(model_name, num_classes=4, image_size=image_size)
        )
        for variant in variants:
            if variant == "synchronized":
                model = synchronized_copy(base)
            else:
                model = keras.models.clone_model(base)
                model.set_weights(base.get_weights())
            optimizer = keras.optimizers.SGD(1e-3, momentum=0.9)
            trains[variant] = tfloop.make_train_step(
                model,
                optimizer,
                LOSS,
                strategy=strategy,
                own_bn=variant == "tfloop",
            )
    if "synchronized" in trains:
        assert all(
            layer.synchronized
            for layer in tfloop.bn.layers(trains["synchronized"].model)
        )
    return trains


def time_steps(step, element, steps: int) -> float:
    """Seconds per step over `steps` steps (results fetched at the end)."""
    start = time.perf_counter()
    for _ in range(steps):
        metrics = step(element)
    float(metrics["loss"])
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="steps per timing")
    parser.add_argument("--per_replica_batch", type=int, default=32)
    parser.add_argument("--model", default="resnet_v1_small")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument(
        "--skip_synchronized",
        action="store_true",
        help="time stock and tfloop only (synchronized BN takes a minute to trace)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="small_cnn, 1 round of 1 step (CI)"
    )
    args = parser.parse_args()
    if args.tiny:
        args.model, args.rounds, args.steps, args.per_replica_batch = (
            "small_cnn",
            1,
            1,
            4,
        )
        args.skip_synchronized = True
    variants = VARIANTS[:2] if args.skip_synchronized else VARIANTS

    distribute.split_cpu(2)
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    trains = build_steps(strategy, args.model, args.image_size, variants)
    batch = 2 * args.per_replica_batch
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, args.image_size, args.image_size, 3))
    labels = rng.integers(0, 4, batch)
    dataset = tf.data.Dataset.from_tensors((images.astype("float32"), labels))
    element = next(iter(distribute.distribute(strategy, dataset)))

    for variant, step in trains.items():  # Trace and warm up.
        start = time.perf_counter()
        step(element)
        print(f"{variant:>12}: first step {time.perf_counter() - start:.1f} s")
        time_steps(step, element, 3)

    seconds = {variant: [] for variant in variants}
    for round_index in range(args.rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            seconds[variant].append(time_steps(trains[variant], element, args.steps))

    print(
        f"\n{args.model} {args.image_size}x{args.image_size}, 2 replicas x "
        f"{args.per_replica_batch} images, {args.rounds} rounds x {args.steps} steps"
    )
    for variant in variants:
        ms = [1000 * s for s in seconds[variant]]
        print(
            f"{variant:>12}: {statistics.median(ms):7.1f} ms/step "
            f"(min {min(ms):.1f}, max {max(ms):.1f})"
        )
    for variant in variants[1:]:
        ratios = [a / b for a, b in zip(seconds[variant], seconds["stock"])]
        fastest = min(seconds[variant]) / min(seconds["stock"])
        print(
            f"{variant + '/stock':>19}: {statistics.median(ratios):.3f} "
            f"(per-round min {min(ratios):.3f}, max {max(ratios):.3f}; "
            f"fastest/fastest {fastest:.3f})"
        )


if __name__ == "__main__":
    main()
