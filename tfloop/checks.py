"""Checks of what users hand the binary: flags, files and environment.

Why this module exists: a wrong shape or a bad flag that TensorFlow only
notices deep inside a traced step ends in a dozen frames of traceback, or
worse, in a wrong number with no error (a `loss_fn` that already averages
over the batch is averaged again; logits with the wrong number of classes
broadcast). Each check here fails early with one sentence naming the
offending value and what was expected, as a `tfloop.errors.InputError`
(printed as one line by `tfloop-train`). The steps check their own
arguments (`ValueError`s, `tfloop.steps`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator

import tensorflow as tf

from tfloop.errors import InputError

# --------------------------------------------------------------------------
# Inputs of the binary: flags, files and environment, before anything runs.


@contextlib.contextmanager
def input_errors() -> Iterator[None]:
    """Turns the `ValueError`s of the data and model builders into `InputError`s.

    Their messages already name the bad value (a folder, a size, a name).
    """
    try:
        yield
    except InputError:
        raise
    except ValueError as error:
        raise InputError(str(error)) from None


def check_environment(
    *, strategy: str, data_dir: str | None, model_dir: str | None
) -> None:
    """`TF_CONFIG`, `--data_dir` and `--model_dir`, before TensorFlow starts."""
    if strategy == "multi_worker":
        _check_tf_config(os.environ.get("TF_CONFIG"))
    if data_dir:
        if not tf.io.gfile.exists(data_dir):
            raise InputError(f"`--data_dir`={data_dir} does not exist")
        if not tf.io.gfile.isdir(data_dir):
            raise InputError(f"`--data_dir`={data_dir} is not a directory")
    if model_dir:
        _check_writable(model_dir)


def _check_tf_config(raw: str | None) -> None:
    """A `TF_CONFIG` MultiWorkerMirroredStrategy can use (absent: one worker)."""
    if raw is None:
        return
    try:
        config = json.loads(raw)
    except ValueError as error:
        raise InputError(f"`TF_CONFIG` is not valid JSON ({error}): {raw!r}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise InputError(
            "`TF_CONFIG` must be a JSON object with `cluster` and `task`, e.g. "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": '
            f'"worker", "index": 0}}; got {raw!r}'
        )
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(
            isinstance(a, str) and re.fullmatch(r".+:\d+", a) for a in addresses
        ):
            raise InputError(
                f"`TF_CONFIG` cluster job `{job}` must list `host:port` strings, "
                f"got {addresses!r}"
            )
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster:
        raise InputError(
            f"`TF_CONFIG` task type {kind!r} is not a job of the cluster "
            f"{sorted(cluster)}"
        )
    if not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise InputError(
            f"`TF_CONFIG` task index {index!r} is not in [0, {len(cluster[kind])}) "
            f"for job `{kind}`"
        )


def _check_writable(model_dir: str) -> None:
    """`model_dir` is, or can be created as, a writable local directory."""
    if "://" in model_dir:  # gs:// and the like: the first write will tell.
        return
    path = os.path.abspath(model_dir)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise InputError(
            f"`--model_dir`={model_dir} cannot be a directory: `{path}` is a file"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"`--model_dir`={model_dir} is not writable (`{path}`)")


def check_num_classes(num_classes: int | None, classes: int, dataset: str) -> int:
    """The model's number of classes: `--num_classes`, which must match the data's."""
    if num_classes is not None and num_classes != classes:
        raise InputError(
            f"`--num_classes`={num_classes} disagrees with the {classes} classes "
            f"of `--dataset`={dataset}"
        )
    return classes


def check_batch(batch_size: int, *, num_replicas: int, train_batches: int) -> None:
    """The global batch splits evenly over the replicas and fits the train split."""
    if batch_size % num_replicas:
        raise InputError(
            f"`--batch_size`={batch_size} cannot be split over {num_replicas} "
            f"replicas; use a multiple of {num_replicas}"
        )
    if train_batches == 0:
        raise_empty_train(batch_size)


def check_worker_files(batch_size: int, examples: list[int]) -> None:
    """Every worker's own training files hold at least its batch.

    `examples[i]` are the examples in worker i's files. A worker whose files
    hold less than its share of `batch_size` would never yield one batch,
    and the others would wait for it forever.
    """
    worker_batch = batch_size // len(examples)
    for index, count in enumerate(examples):
        if count < worker_batch:
            raise InputError(
                f"worker {index}'s training files hold {count} examples, fewer "
                f"than its batch of {worker_batch} (`--batch_size`={batch_size} "
                f"over {len(examples)} workers); use a smaller `--batch_size`, "
                "fewer workers or more files"
            )


def raise_empty_train(batch_size: int) -> None:
    raise InputError(
        f"`--batch_size`={batch_size} is larger than the train split: not one "
        "full batch"
    )


# --------------------------------------------------------------------------
# Errors TensorFlow raises while the data flows, turned into one line.

_LABEL_ERROR = re.compile(
    r"Received a label value of (-?\d+) which is outside the valid range of "
    r"\[0, (\d+)\)"
)


def data_error(error: tf.errors.OpError, *, images: Callable) -> InputError | None:
    """The `InputError` an error of the input pipeline stands for, if any.

    `images()` yields `(name, encoded bytes)` of every image of the data
    (`tfloop.data.encoded_images`): tf.data's decode error names no file, so
    they are decoded one by one to find the culprits (only on failure).
    """
    label = _LABEL_ERROR.search(error.message)
    if label:
        value, classes = label.groups()
        return InputError(
            f"label {value} in the data is outside [0, {classes}) "
            f"(`--num_classes`={classes}); fix the data or `--num_classes`"
        )
    if not isinstance(error, tf.errors.InvalidArgumentError):
        return None
    bad = [name for name, encoded in images() if not _decodes(encoded)]
    if not bad:
        return None
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return InputError(
        f"corrupt image {', '.join(f'`{name}`' for name in bad[:3])}{more}: "
        "remove or replace it"
    )


def _decodes(encoded: tf.Tensor) -> bool:
    try:
        tf.io.decode_image(encoded, channels=3, expand_animations=False)
    except tf.errors.OpError:
        return False
    return True
