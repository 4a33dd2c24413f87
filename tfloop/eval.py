"""`tfloop-eval`: evaluate a checkpoint, the counterpart of slim's `eval_image_classifier.py`.

    tfloop-eval --model=inception_v1 --model_dir=/tmp/run
    tfloop-eval --model=inception_v1 --num_classes=1001 --checkpoint_path=inception_v1.ckpt
    tfloop-train --mode=eval ...   # the same

It takes the training binary's flags (model, data, `--model_dir`) plus slim's
`--checkpoint_path`, `--dataset_split_name` and `--max_num_batches`, and
prints the slim-era line, then recall@5 when there are more than 5 classes::

    precision @ 1 = 0.9883 val loss = 0.05
    recall @ 5 = 0.9990

The checkpoint is `--checkpoint_path` (a prefix or a directory; tfloop's own
or a slim one, told apart by their format) or else the latest of
`MODEL_DIR/checkpoints`, or of `MODEL_DIR/averaged` (the weight average with
its recalibrated BN) with `--moving_average_decay`. It is evaluated as saved:
tfloop's checkpoints already hold recalibrated BN statistics.
"""

from __future__ import annotations

import sys

import keras
import tensorflow as tf
from absl import app, flags, logging

from tfloop import data, models
from tfloop import flags as tfloop_flags
from tfloop.config import TrainConfig

__all__ = ["evaluate_checkpoint", "run"]

_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
# tf.train.Checkpoint writes this key; slim's name-based checkpoints have none.
_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"


def _say(line: str) -> None:
    print(line, flush=True)


def _resolve(config: TrainConfig) -> str:
    """The checkpoint prefix to evaluate (see the module doc)."""
    if config.checkpoint_path:
        path = config.checkpoint_path
        if not tf.io.gfile.isdir(path):
            return path  # A prefix; `_restore` says if it is none.
    elif config.model_dir:
        sub = "averaged" if config.moving_average_decay else "checkpoints"
        path = f"{config.model_dir}/{sub}"
    else:
        raise ValueError("Evaluation needs --checkpoint_path or --model_dir.")
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"No checkpoint in {path!r}.")
    return latest


def _restore(model: keras.Model, prefix: str) -> None:
    """Reads a tfloop checkpoint (model only) or a slim one into `model`."""
    try:
        keys = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
    except (tf.errors.NotFoundError, tf.errors.DataLossError) as error:
        raise ValueError(f"{prefix!r} is not a checkpoint.") from error
    if _OBJECT_GRAPH not in keys:
        models.load_slim_checkpoint(model, prefix)
        return
    try:
        status = tf.train.Checkpoint(model=model).read(prefix).expect_partial()
        status.assert_existing_objects_matched()  # Optimizer and BN state unused.
    except (AssertionError, ValueError) as error:
        first = str(error).strip().splitlines()[0]
        raise ValueError(
            f"Checkpoint {prefix!r} does not fit `{model.name}` with "
            f"{model.output_shape[-1]} classes: {first}"
        ) from error


def _sums(model: keras.Model, num_classes: int):
    """The traced per-batch sums: loss, top-1 and top-5 hits, examples."""
    k = min(5, num_classes)

    @tf.function
    def sums(images, labels):
        logits = model(images, training=False)
        labels = tf.cast(labels, tf.int32)
        hits = [
            tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, top), tf.float64))
            for top in (1, k)
        ]
        loss = tf.reduce_sum(tf.cast(_LOSS(labels, logits), tf.float64))
        return tf.stack([loss, *hits, tf.cast(tf.size(labels), tf.float64)])

    return sums


def evaluate_checkpoint(
    config: TrainConfig,
    *,
    split: str = "validation",
    max_num_batches: int | None = None,
) -> dict[str, float]:
    """Evaluates a checkpoint on a split; prints and returns `top1`, `loss`, `recall_5`.

    Ties in the logits count as hits (`tf.math.in_top_k`). `recall_5` is
    printed only with more than 5 classes (with 5 or fewer it is always 1).
    """
    dataset, classes = data.load(
        config.dataset,
        split=split,
        data_dir=config.data_dir,
        image_size=config.image_size,
        batch_size=config.batch_size,
        seed=config.seed,
        num_examples=config.val_examples if split != "train" else config.train_examples,
        augment=False,
    )
    num_classes = config.num_classes or classes
    model = models.get(
        config.model,
        num_classes=num_classes,
        bn_decay=config.bn_decay,
        image_size=config.image_size,
    )
    prefix = _resolve(config)
    _restore(model, prefix)
    logging.info("Evaluating %s on split %s", prefix, split)
    if max_num_batches:
        dataset = dataset.take(max_num_batches)
    sums = _sums(model, num_classes)
    total = tf.zeros([4], tf.float64)
    for images, labels in dataset:
        total += sums(images, labels)
    loss, top1, top5, count = (float(x) for x in total)
    if count == 0:
        raise ValueError(f"Split {split!r} of `{config.dataset}` has no examples.")
    result = {"top1": top1 / count, "loss": loss / count, "recall_5": top5 / count}
    _say(f"precision @ 1 = {result['top1']:.4f} val loss = {result['loss']:.2f}")
    if num_classes > 5:
        _say(f"recall @ 5 = {result['recall_5']:.4f}")
    return result


def evaluate_from_flags(config: TrainConfig) -> dict[str, float]:
    """`evaluate_checkpoint` with the eval flags (`--dataset_split_name`, ...)."""
    return evaluate_checkpoint(
        config,
        split=flags.FLAGS.dataset_split_name,
        max_num_batches=flags.FLAGS.max_num_batches,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    evaluate_from_flags(tfloop_flags.config_from_flags())


def run() -> None:
    """Console-script entry point (`tfloop-eval`)."""
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    run()
