"""What does `--checkpoint_every_steps` cost? One checkpoint as a fraction of a step.

Builds what `tfloop-train` builds for slim's ResNet v1 50 at 64x64 on
`shapes` (batch 32, Adam, the checked train step with `--on_nonfinite=stop`)
and its checkpoint (model, optimizer slots, BN counts, the train-data
iterator with its shuffle buffer, RNG, skipped steps), then times, in this
process: `--steps` train steps (each followed by the host-side non-finite
check and the preemption check the binary makes), and `--saves` calls of
`Checkpoints.save` (the finiteness check of every tensor plus
`tf.train.CheckpointManager.save`). It prints the medians, the ratio
save / step, the checkpoint's size and the finiteness check's share; with
`--checkpoint_every_steps=N` the overhead is ratio / N of the training time.

    python benchmarks/checkpoint_cost.py [--steps 20 --saves 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import keras
import tensorflow as tf

import tfloop
from tfloop import checkpointing, distribute, nonfinite
from tfloop.runner import LOSS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet_v1_50")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--saves", type=int, default=5)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    strategy = tf.distribute.get_strategy()
    train_data, classes = tfloop.data.load(
        "shapes",
        split="train",
        data_dir=None,
        image_size=args.image_size,
        batch_size=args.batch_size,
        seed=0,
    )
    iterator = iter(train_data.repeat())
    model = tfloop.models.get(
        args.model, num_classes=classes, image_size=args.image_size
    )
    step = tfloop.optimize_loss(
        model,
        LOSS,
        learning_rate=1e-3,
        optimizer="Adam",
        check_numerics=False,
        on_nonfinite="stop",
    )
    skipped = tf.Variable(0, dtype=tf.int64)
    with tempfile.TemporaryDirectory() as model_dir:
        checkpoints = checkpointing.Checkpoints(
            model_dir=model_dir,
            items={
                "model": model,
                "optimizer": step.optimizer,
                "train_data": iterator,
                "rng": checkpointing.seed_states(model),
                "nonfinite_steps": skipped,
                "bn": tfloop.bn.state(model),
            },
            metadata={"model": args.model},
            strategy=strategy,
            chief=True,
            guarded=model.variables + step.optimizer.variables,
        )
        step(distribute.split_batch(strategy, next(iterator)))  # Trace.
        step_times = []
        for number in range(2, args.steps + 2):
            start = time.perf_counter()
            metrics = step(distribute.split_batch(strategy, next(iterator)))
            nonfinite.check_step(number, metrics, mode="stop")
            checkpoints.after_step(number)
            step_times.append(time.perf_counter() - start)
        save_times = []
        for number in range(args.steps + 2, args.steps + 2 + args.saves):
            start = time.perf_counter()
            path = checkpoints.save(number)
            save_times.append(time.perf_counter() - start)
        check_times = []
        for _ in range(args.saves):
            start = time.perf_counter()
            nonfinite.nonfinite_variables(model.variables + step.optimizer.variables)
            check_times.append(time.perf_counter() - start)
        size = sum(
            os.path.getsize(os.path.join(checkpoints.directory, name))
            for name in os.listdir(checkpoints.directory)
            if name.startswith(os.path.basename(path) + ".")
        )
        checkpoints.close()
    step_time = statistics.median(step_times)
    save_time = statistics.median(save_times)
    print(
        f"{args.model} {args.image_size}x{args.image_size} batch {args.batch_size}: "
        f"step {step_time * 1e3:.0f} ms, checkpoint {save_time * 1e3:.0f} ms "
        f"({size / 2**20:.0f} MiB) = {save_time / step_time:.2f} steps; "
        f"every N steps costs {save_time / step_time:.2f}/N of training time; "
        f"of it the finiteness check {statistics.median(check_times) * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
