"""Does the input pipeline keep up? Images/s delivered vs consumed at 224 px.

Writes `--images` generated JPEGs (256x256, the `shapes` classes) once into a
temporary directory, as an image folder (`train/<class>/*.jpg`) and as
slim-format TFRecords (`train-0000i-of-0000N` + `labels.txt`), then times in
one process, interleaved over rounds:

- `folder` and `tfrecord`: `tfloop.data.load(..., split="train")` alone
  (read, decode, inception-style random crop and flip, resize to
  `--image_size`, batch, prefetch), `--batches` batches from a fresh
  iterator (start-up and shuffle-buffer fill included: a conservative
  figure); `+cache`: the same with `cache=True`, after a first pass;
- `step`: what the train step of `--model` consumes (the default tfloop
  step on one fixed batch at `--image_size`, no input pipeline).

It prints images/s of each and the medians over rounds of per-round ratios
pipeline / step (target: >= 3).

    python benchmarks/input_pipeline.py
    python benchmarks/input_pipeline.py --tiny      # seconds, for CI
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
import train_speed  # This directory: the small BN CNN.

import tfloop

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def write_data(directory: str, num_images: int, num_files: int) -> None:
    """An image folder and slim TFRecords of the same generated JPEGs."""
    examples = tfloop.data.shapes("train", num_examples=num_images, seed=0, size=256)
    writers = [
        tf.io.TFRecordWriter(
            os.path.join(directory, f"train-{i:05d}-of-{num_files:05d}")
        )
        for i in range(num_files)
    ]
    for index, (image, label) in enumerate(examples):
        encoded = tf.io.encode_jpeg(image, quality=90).numpy()
        name = tfloop.data.CLASS_NAMES[int(label)]
        class_dir = os.path.join(directory, "folder", "train", name)
        os.makedirs(class_dir, exist_ok=True)
        with open(os.path.join(class_dir, f"{index:06d}.jpg"), "wb") as f:
            f.write(encoded)
        example = tf.train.Example(
            features=tf.train.Features(
                feature={
                    "image/encoded": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[encoded])
                    ),
                    "image/class/label": tf.train.Feature(
                        int64_list=tf.train.Int64List(value=[int(label)])
                    ),
                }
            )
        )
        writers[index % num_files].write(example.SerializeToString())
    for writer in writers:
        writer.close()
    with open(os.path.join(directory, tfloop.data.LABELS_FILENAME), "w") as f:
        f.writelines(f"{i}:{n}\n" for i, n in enumerate(tfloop.data.CLASS_NAMES))


def pipeline_timer(name: str, data_dir: str, args, cache: bool):
    dataset, _ = tfloop.data.load(
        name,
        split="train",
        data_dir=data_dir,
        image_size=args.image_size,
        batch_size=args.batch_size,
        seed=0,
        cache=cache,
    )
    for _ in dataset:  # Warm-up; fills the cache.
        pass

    def timer() -> float:
        # A fresh iterator every time: a prefetch buffer filled while the
        # (slow) train step was timed must not count as throughput.
        start = time.perf_counter()
        for images, _ in dataset.take(args.batches):
            pass
        images.numpy()
        return time.perf_counter() - start

    return timer


def step_timer(args):
    if args.model == "small_cnn":
        model = train_speed.small_cnn(args.image_size)
    else:
        model = tfloop.models.get(args.model, num_classes=4, image_size=args.image_size)
    step = tfloop.make_train_step(model, keras.optimizers.SGD(1e-3, momentum=0.9), LOSS)
    rng = np.random.default_rng(0)
    size = (args.batch_size, args.image_size, args.image_size, 3)
    element = (rng.normal(size=size).astype("float32"), rng.integers(0, 4, size[0]))
    step(element)  # Traces.

    def timer() -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            metrics = step(element)
        float(metrics["loss"])
        return time.perf_counter() - start

    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="inception_v1", help="a tfloop.models name or small_cnn"
    )
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--files", type=int, default=8, help="TFRecord files")
    parser.add_argument("--batches", type=int, default=8, help="batches per timing")
    parser.add_argument("--steps", type=int, default=2, help="train steps per timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="seconds, for CI")
    args = parser.parse_args()
    if args.tiny:
        args.model, args.image_size, args.batch_size = "small_cnn", 32, 8
        args.images, args.files, args.batches, args.steps, args.rounds = 32, 2, 2, 1, 1

    with tempfile.TemporaryDirectory() as directory:
        write_data(directory, args.images, args.files)
        sources = {"folder": os.path.join(directory, "folder"), "tfrecord": directory}
        timers = {
            f"{name}{'+cache' if cache else ''}": pipeline_timer(
                name, data_dir, args, cache
            )
            for name, data_dir in sources.items()
            for cache in (False, True)
        }
        timers["step"] = step_timer(args)
        seconds = {name: [] for name in timers}
        names = list(timers)
        for round_index in range(args.rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                seconds[name].append(timers[name]())
    images = {
        name: args.batch_size * (args.steps if name == "step" else args.batches)
        for name in names
    }
    print(
        f"\n{args.image_size} px, batch {args.batch_size}, {args.images} JPEGs "
        f"(256x256), {args.files} TFRecord files, {args.rounds} rounds"
    )
    for name in names:
        rates = [images[name] / s for s in seconds[name]]
        print(f"{name:>15}: {statistics.median(rates):8.1f} images/s")
    ratios = {
        name: statistics.median(
            (images[name] / s) / (images["step"] / t)
            for s, t in zip(seconds[name], seconds["step"])
        )
        for name in names
        if name != "step"
    }
    print(
        f"\ninput pipeline / {args.model} train step (images/s; target >= 3): "
        + ", ".join(f"{name} {ratio:.1f}" for name, ratio in ratios.items())
    )


if __name__ == "__main__":
    main()
