"""Bad input: one line naming the bad value, a non-zero exit, nothing in --model_dir changed.

Each row of the README's bad-input table runs through `tfloop.train.main`
under `absl.app.run`, exactly as the binary does, in this process (a fresh
interpreter per row would cost ~10 s of imports each); two rows also run as
real subprocesses, which is where a stray traceback would show.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import binary
import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import app, flags

import tfloop
from tfloop import train

TINY = [
    "--model=resnet_v1_small",
    "--image_size=32",
    "--batch_size=4",
    "--epochs=1",
    "--steps_per_epoch=1",
    "--bn_recalibrate_batches=1",
    "--train_examples=16",
    "--val_examples=8",
]


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), np.uint8)
    path.write_bytes(tf.io.encode_png(pixels).numpy())


def _folder(root: Path, classes=("a", "b"), val_classes=None, per_class=4) -> Path:
    for split, names in (("train", classes), ("validation", val_classes or classes)):
        for c, name in enumerate(names):
            for i in range(per_class):
                _png(root / split / name / f"{i}.png", seed=100 * c + i)
    return root


def _tfrecords(root: Path, labels: list[int]) -> Path:
    root.mkdir(parents=True)
    (root / "labels.txt").write_text("0:a\n1:b\n")
    for split in ("train", "validation"):
        with tf.io.TFRecordWriter(str(root / f"{split}-00000-of-00001")) as writer:
            for i, label in enumerate(labels):
                pixels = np.full((40, 40, 3), 10 * i, np.uint8)
                feature = {
                    "image/encoded": tf.train.Feature(
                        bytes_list=tf.train.BytesList(
                            value=[tf.io.encode_png(pixels).numpy()]
                        )
                    ),
                    "image/class/label": tf.train.Feature(
                        int64_list=tf.train.Int64List(value=[label])
                    ),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())
    return root


def _corrupt(root: Path) -> Path:
    _folder(root)
    bad = root / "validation" / "b" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # A truncated PNG.
    return root


def _no_images(root: Path) -> Path:
    _folder(root)
    for image in (root / "train" / "b").iterdir():
        image.unlink()
    return root


def _empty_validation(root: Path) -> Path:
    _folder(root)
    for image in (root / "validation").rglob("*.png"):
        image.unlink()
    for folder in (root / "validation").iterdir():
        folder.rmdir()
    return root


def _a_file(root: Path) -> Path:
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_text("not a directory")
    return root


def _row(name, argv, expected, *, setup=None, env=None):
    """One bad input: flags (`{d}`: a path the setup may fill), the line seen."""
    return pytest.param(argv, setup, env, expected, id=name)


_FLAG_ERROR = "FATAL Flags parsing error: "
_SLIM_MODELS = r"<alexnet_v2\|inception_v1\|resnet_v1_50\|resnet_v1_small>"
_TF_CONFIG_INDEX = json.dumps(
    {"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}
)
FOLDER = ["--dataset=folder", "--data_dir={d}"]
TFRECORD = ["--dataset=tfrecord", "--data_dir={d}"]

ROWS = [
    _row(
        "no-data-dir",
        ["--dataset=folder"],
        _FLAG_ERROR + "flags dataset=folder, data_dir=None: --dataset=folder and "
        "--dataset=tfrecord need --data_dir",
    ),
    _row("missing-data-dir", FOLDER, r"`--data_dir`=\S+/nothing does not exist"),
    _row(
        "unreadable-data-dir",
        FOLDER,
        r"`--data_dir`=\S+ is not a directory",
        setup=_a_file,
    ),
    _row(
        "empty-data-dir",
        FOLDER,
        r"image folder `\S+/nothing/train` does not exist",
        setup=Path.mkdir,
    ),
    _row(
        "split-without-classes",
        FOLDER,
        r"no class sub-folders in `\S+/validation`",
        setup=_empty_validation,
    ),
    _row(
        "empty-tfrecord-dir",
        TFRECORD,
        r"no TFRecord files match `\S+`",
        setup=Path.mkdir,
    ),
    _row(
        "class-without-images",
        FOLDER,
        r"no JPEG/PNG images in class folder `\S+/train/b`",
        setup=_no_images,
    ),
    _row(
        "class-sets-differ",
        FOLDER,
        r"classes of `\S+/validation` differ from those of `\S+/train`: \['b', 'c'\]",
        setup=lambda d: _folder(d, val_classes=("a", "c")),
    ),
    _row(
        "corrupt-image",
        FOLDER,
        r"corrupt image `\S+/validation/b/3\.png`: remove or replace it",
        setup=_corrupt,
    ),
    _row(
        "label-out-of-range",
        TFRECORD,
        r"label 5 in the data is outside \[0, 2\)",
        setup=lambda d: _tfrecords(d, [0, 1, 5, 0]),
    ),
    _row(
        "num-classes",
        ["--num_classes=7"],
        r"`--num_classes`=7 disagrees with the 4 classes of `--dataset`=shapes",
    ),
    _row(
        "image-size",
        ["--image_size=16"],
        r"`resnet_v1_small` needs image_size >= 32, got 16",
    ),
    _row(
        "batch-larger-than-split",
        ["--batch_size=32"],
        r"`--batch_size`=32 is larger than the train split",
    ),
    _row(
        "unknown-model",
        ["--model=resnet_v9"],
        _FLAG_ERROR + "flag --model=resnet_v9: value should be one of " + _SLIM_MODELS,
    ),
    _row(
        "unknown-optimizer",
        ["--optimizer=Adamax"],
        _FLAG_ERROR + "flag --optimizer=Adamax: value should be one of",
    ),
    _row(
        "unknown-dataset",
        ["--dataset=imagenet"],
        _FLAG_ERROR + r"flag --dataset=imagenet: value should be one of <shapes\|",
    ),
    _row(
        "unknown-strategy",
        ["--strategy=tpu"],
        _FLAG_ERROR + "flag --strategy=tpu: value should be one of",
    ),
    _row(
        "bn-decay",
        ["--bn_decay=1.0"],
        _FLAG_ERROR + r"flag --bn_decay=1.0: --bn_decay must be in \[0, 1\)",
    ),
    _row(
        "learning-rate",
        ["--learning_rate=0"],
        _FLAG_ERROR + "flag --learning_rate=0.0: --learning_rate must be positive",
    ),
    _row(
        "batch-size",
        ["--batch_size=0"],
        _FLAG_ERROR + "flag --batch_size=0: 0 is not a positive integer",
    ),
    _row(
        "epochs",
        ["--epochs=-1"],
        _FLAG_ERROR + "flag --epochs=-1: -1 is not a positive integer",
    ),
    _row(
        "missing-flagfile",
        ["--flagfile={d}"],
        _FLAG_ERROR + "ERROR:: Unable to open flagfile: .*No such file",
    ),
    _row(
        "tf-config-json",
        ["--strategy=multi_worker"],
        r"`TF_CONFIG` is not valid JSON .*'\{cluster: worker\}'",
        env={"TF_CONFIG": "{cluster: worker}"},
    ),
    _row(
        "tf-config-index",
        ["--strategy=multi_worker"],
        r"`TF_CONFIG` task index 3 is not in \[0, 1\) for job `worker`",
        env={"TF_CONFIG": _TF_CONFIG_INDEX},
    ),
    _row(
        "unwritable-model-dir",
        ["--model_dir={d}/run"],
        r"`--model_dir`=\S+/run cannot be a directory: `\S+` is a file",
        setup=_a_file,
    ),
]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run_main(argv: list[str], capfd) -> tuple[int, str]:
    """`tfloop-train ARGV` in this process: (exit code, stderr)."""
    flags.FLAGS.unparse_flags()
    capfd.readouterr()
    sigterm = signal.getsignal(signal.SIGTERM)  # A run installs its own.
    try:
        with pytest.raises(SystemExit) as exit_info:
            app.run(train.main, argv=["tfloop-train", *argv])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        flags.FLAGS.unparse_flags()
    return exit_info.value.code or 0, capfd.readouterr().err


def _user_lines(stderr: str) -> list[str]:
    """What the user reads: stderr without TensorFlow's and absl's log lines."""
    log = re.compile(r"^([IWE]\d{4} |INFO:|WARNING:|WARNING: All log|I0000|W0000)")
    return [line for line in stderr.splitlines() if line and not log.match(line)]


@pytest.mark.parametrize("argv, setup, env, expected", ROWS)
def test_bad_input_gets_one_line(
    argv, setup, env, expected, tmp_path, capfd, monkeypatch
):
    data_dir = tmp_path / "nothing"
    if setup is not None:
        setup(data_dir)
    model_dir = tmp_path / "model"
    (model_dir / "checkpoints").mkdir(parents=True)
    (model_dir / "notes.txt").write_text("written by an earlier run")
    before = _tree(model_dir)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    argv = [a.format(d=data_dir) for a in argv]
    if not any(a.startswith("--model_dir") for a in argv):
        argv.append(f"--model_dir={model_dir}")
    code, stderr = _run_main([*TINY, *argv], capfd)
    lines = _user_lines(stderr)
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    assert lines and re.search(expected, lines[0]), lines
    # absl adds its usual hint after a flag error; nothing else is printed.
    assert lines[1:] in ([], ["Pass --helpshort or --helpfull to see help on flags."])
    assert _tree(model_dir) == before


def test_readme_table_lists_every_row():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("| Bad input") :].split("\n\n")[0]
    assert len(table.splitlines()) - 2 == len(ROWS), table


def _subprocess(argv, env=None):
    argv = [sys.executable, "-m", "tfloop.train", *TINY, *argv]
    return binary.run_command(
        argv, check=False, timeout=120, env=binary.env(**(env or {}))
    )


def test_binary_prints_one_line_for_a_bad_file_and_a_split_batch(tmp_path):
    """As a real process: the line on stderr, exit 1, no traceback."""
    result = _subprocess(["--dataset=folder", f"--data_dir={_corrupt(tmp_path)}"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert _user_lines(result.stderr) == [
        f"tfloop-train: corrupt image `{tmp_path}/validation/b/3.png`: "
        + "remove or replace it"
    ]
    # The batch check needs two replicas: here, not in the pytest process.
    result = _subprocess(
        ["--strategy=mirrored", "--num_cpu_devices=2", "--batch_size=5"]
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert _user_lines(result.stderr) == [
        "tfloop-train: `--batch_size`=5 cannot be split over 2 replicas; "
        + "use a multiple of 2"
    ]


# --------------------------------------------------------------------------
# The public API: `ValueError`s that say what was expected.

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


def _model(num_classes=3):
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(num_classes)(keras.layers.BatchNormalization()(inputs))
    return keras.Model(inputs, outputs)


def test_scalar_loss_fn_is_refused():
    averaged = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    step = tfloop.make_train_step(_model(), keras.optimizers.SGD(0.1), averaged)
    batch = (tf.zeros([8, 4]), tf.zeros([8], tf.int32))
    with pytest.raises(
        ValueError, match="per-example losses of shape .*reduction=None"
    ):
        step(batch)
    eval_step = tfloop.make_eval_step(_model(), averaged)
    with pytest.raises(
        ValueError, match="per-example losses of shape .*reduction=None"
    ):
        eval_step(batch)


def _message(step, batch) -> str:
    with pytest.raises(ValueError) as error:
        step(batch)
    return str(error.value)


def test_one_hot_labels_with_other_class_count_are_refused():
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    step = tfloop.make_train_step(_model(3), keras.optimizers.SGD(0.1), loss)
    labels = tf.one_hot(tf.zeros([8], tf.int32), 5)
    message = _message(step, (tf.zeros([8, 4]), labels))
    # Names both class counts and says one-hot labels were expected.
    assert "one-hot" in message and "5" in message and "3" in message, message


def test_labels_of_wrong_rank_are_refused():
    step = tfloop.make_train_step(_model(3), keras.optimizers.SGD(0.1), LOSS)
    message = _message(step, (tf.zeros([8, 4]), tf.zeros([8, 2, 2], tf.int32)))
    assert "(8, 2, 2)" in message and "(8, 3)" in message, message
    assert "expected" in message and "one-hot" in message, message
