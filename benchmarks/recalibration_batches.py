"""How many batches does `--bn_recalibrate_batches` need? Precise BN against K.

Trains the seed experiment (`flags/seed_inception_v1.flags`: slim's Inception
v1 on 32x32 `shapes`, batch 32, Adam 1e-3, BN decay 0.9997, debiased averages;
128 steps an epoch) and stops at two points: step 32 (the weights still change
fast) and step 128 (the end of epoch 1). At each point it validates with the
moving averages, then for every K in `KS` restores the same moving statistics
(and update counts), recalibrates with the first K training batches (eval
preprocessing, as `tfloop-train` does; K=128 is the whole train split) and
validates again. Training continues from the moving averages, not from the
recalibrated statistics.

It prints, per point, K -> validation loss and top-1, |loss - loss with all
128 batches|, seconds per `tfloop.bn.recalibrate` call and that time as a
share of one training epoch (both timed in this process), and then the
smallest K within `TOP1_TOLERANCE` / `LOSS_TOLERANCE` of the whole split at
both points. Timings are medians (`--repeats` calls of `recalibrate` per K;
all the steady-state train steps for the epoch), and a linear fit splits a
call's cost into a fixed part and a per-batch part: a `recalibrate` call
traces its own `tf.function`, which every validation of `tfloop-train` pays.

    /tmp/venv/bin/python benchmarks/recalibration_batches.py
    /tmp/venv/bin/python benchmarks/recalibration_batches.py --tiny   # CI
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
import numpy as np
import train_speed  # This directory: the small BN CNN.

import tfloop

KS = (1, 2, 5, 10, 20, 50, 128)
CHECKPOINTS = (32, 128)  # Train steps after which to measure.
TOP1_TOLERANCE = 0.005
LOSS_TOLERANCE = (0.05, 0.01)  # Relative, absolute: the looser one applies.

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def bn_variables(model: keras.Model) -> list:
    """Every variable `recalibrate` may change: moving statistics and counts."""
    moving = [
        variable
        for layer in tfloop.bn.layers(model)
        for variable in (layer.moving_mean, layer.moving_variance)
    ]
    return moving + list(tfloop.bn.state(model).variables)


def restore(variables: list, values: list) -> None:
    for variable, value in zip(variables, values):
        variable.assign(value)


def measure(model, eval_step, val_data, calib_data, repeats: int) -> dict:
    """Validation with the moving averages ('moving') and after each K.

    Timings go round-robin over K, so that load from other processes hits
    every K alike; the last round also validates.
    """
    variables = bn_variables(model)
    saved = [variable.numpy() for variable in variables]
    results = {"moving": tfloop.evaluate(eval_step, val_data)}
    seconds = {k: [] for k in KS}
    for round_ in range(repeats):
        for k in KS:
            restore(variables, saved)
            start = time.perf_counter()
            used = tfloop.bn.recalibrate(model, calib_data, num_batches=k)
            seconds[k].append(time.perf_counter() - start)
            if used != k:
                raise RuntimeError(f"recalibrated with {used} batches, wanted {k}")
            if round_ == repeats - 1:
                results[k] = tfloop.evaluate(eval_step, val_data)
    for k in KS:
        results[k]["seconds"] = statistics.median(seconds[k])
    restore(variables, saved)
    return results


def within_tolerance(result: dict, reference: dict) -> bool:
    relative, absolute = LOSS_TOLERANCE
    loss_tolerance = max(relative * reference["loss"], absolute)
    return (
        abs(result["top1"] - reference["top1"]) <= TOP1_TOLERANCE
        and abs(result["loss"] - reference["loss"]) <= loss_tolerance
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tiny", action="store_true", help="small_cnn, 2 batches, K in (1, 2) (CI)"
    )
    args = parser.parse_args()
    global KS, CHECKPOINTS
    train_examples = None
    if args.tiny:
        KS, CHECKPOINTS, train_examples, args.repeats = (1, 2), (1, 2), 64, 1

    keras.utils.set_random_seed(args.seed)
    load = {"data_dir": None, "image_size": 32, "batch_size": 32, "seed": args.seed}
    train_data, num_classes = tfloop.data.load(
        "shapes", split="train", num_examples=train_examples, **load
    )
    val_data, _ = tfloop.data.load("shapes", split="validation", **load)
    calib_data, _ = tfloop.data.load("shapes", split="train", augment=False, **load)
    steps_per_epoch = int(train_data.cardinality())
    if args.tiny:
        model = train_speed.small_cnn(32)
    else:
        model = tfloop.models.get(
            "inception_v1", num_classes=num_classes, bn_decay=0.9997, image_size=32
        )
    train_step = tfloop.make_train_step(
        model, keras.optimizers.Adam(1e-3), LOSS, bn_averaging="debias"
    )
    eval_step = tfloop.make_eval_step(model, LOSS)

    batches = iter(train_data.repeat())
    step_times, results, done = [], {}, 0
    for point in CHECKPOINTS:
        for _ in range(point - done):
            start = time.perf_counter()
            train_step(next(batches))
            step_times.append(time.perf_counter() - start)
        done = point
        results[point] = measure(model, eval_step, val_data, calib_data, args.repeats)
    # The first step traces the train step: steady-state steps only.
    step_seconds = statistics.median(step_times[1:])
    epoch_seconds = step_seconds * steps_per_epoch
    print(
        f"\none training epoch: {epoch_seconds:.2f} s ({steps_per_epoch} steps, "
        f"median step {1000 * step_seconds:.1f} ms)"
    )

    full = KS[-1]
    for point, rows in results.items():
        moving = rows["moving"]
        print(
            f"\nafter step {point}: moving averages (no recalibration): "
            f"val loss {moving['loss']:.4f}, top-1 {moving['top1']:.4f}"
        )
        print("|   K | val loss | top-1  | |dloss| vs K=128 | recal s | of epoch |")
        print("|----:|---------:|-------:|----------------:|--------:|---------:|")
        for k in KS:
            row = rows[k]
            print(
                f"| {k:3d} | {row['loss']:8.4f} | {row['top1']:.4f} | "
                f"{abs(row['loss'] - rows[full]['loss']):15.4f} | "
                f"{row['seconds']:7.2f} | {row['seconds'] / epoch_seconds:7.1%} |"
            )
        per_batch, fixed = np.polyfit(KS, [rows[k]["seconds"] for k in KS], 1)
        print(
            f"recalibration cost (linear fit): {fixed:.2f} s fixed per call "
            f"(tf.function trace) + {1000 * per_batch:.1f} ms per batch "
            f"(= {per_batch / step_seconds:.2f} train steps)"
        )

    good = [
        k
        for k in KS
        if all(within_tolerance(rows[k], rows[full]) for rows in results.values())
    ]
    print(
        f"\nrecommendation: --bn_recalibrate_batches={good[0]}, the smallest K "
        f"with top-1 within {TOP1_TOLERANCE} and loss within "
        f"{LOSS_TOLERANCE[0]:.0%} or {LOSS_TOLERANCE[1]} of K={full} (whole train "
        f"split) after steps {' and '.join(map(str, CHECKPOINTS))}"
    )


if __name__ == "__main__":
    main()
