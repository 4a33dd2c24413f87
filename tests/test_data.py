"""Tests for `tfloop.data`: sources, preprocessing, batching and errors."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfloop import data


def _examples(dataset: tf.data.Dataset) -> list[tuple[np.ndarray, int]]:
    """Materialises an unbatched dataset as a list of (image, label)."""
    return [(image.numpy(), int(label)) for image, label in dataset]


def _random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


# --------------------------------------------------------------------------
# shapes


def test_shapes_is_deterministic_and_splits_differ():
    def images(split, seed):
        return np.stack(
            [x for x, _ in _examples(data.shapes(split, num_examples=8, seed=seed))]
        )

    train = images("train", 0)
    np.testing.assert_array_equal(train, images("train", 0))
    assert not np.array_equal(train, images("validation", 0))
    assert not np.array_equal(train, images("train", 1))
    # Example i does not depend on how many examples are requested.
    first = _examples(data.shapes("train", num_examples=3, seed=0))
    np.testing.assert_array_equal(np.stack([x for x, _ in first]), train[:3])


def test_shapes_types_and_balanced_labels():
    dataset = data.shapes("train", num_examples=2000, seed=0, size=40)
    assert dataset.element_spec == (
        tf.TensorSpec([40, 40, 3], tf.uint8),
        tf.TensorSpec([], tf.int32),
    )
    assert len(data.CLASS_NAMES) == 4
    labels = np.array([y for _, y in dataset.batch(500).as_numpy_iterator()]).ravel()
    counts = np.bincount(labels, minlength=4)
    assert counts.sum() == 2000 and len(counts) == 4
    assert all(400 <= c <= 600 for c in counts), counts


def test_shapes_is_learnable_by_a_tiny_cnn():
    """The documented difficulty: >= 0.9 validation accuracy in 150 steps."""
    keras.utils.set_random_seed(0)
    train, num_classes = data.load(
        "shapes", split="train", data_dir=None, image_size=32, batch_size=32, seed=0
    )
    val, _ = data.load(
        "shapes",
        split="validation",
        data_dir=None,
        image_size=32,
        batch_size=128,
        seed=0,
    )

    def conv(filters):
        return keras.layers.Conv2D(filters, 3, padding="same", activation="relu")

    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            conv(16),
            keras.layers.MaxPooling2D(),
            conv(32),
            keras.layers.MaxPooling2D(),
            conv(64),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(num_classes),
        ]
    )
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(train.repeat().take(150), shuffle=False, verbose=0)
    _, accuracy = model.evaluate(val, verbose=0)
    assert accuracy >= 0.9


# --------------------------------------------------------------------------
# Preprocessing and batching


@pytest.mark.parametrize("train", [True, False])
def test_preprocess_size_dtype_and_range(train):
    image = tf.constant(_random_image(np.random.default_rng(0), 50, 70))
    image = tf.tensor_scatter_nd_update(image, [[0, 0], [1, 1]], [[0] * 3, [255] * 3])
    out = data.preprocess(image, image_size=24, train=train, seed=[1, 2])
    assert out.shape == (24, 24, 3) and out.dtype == tf.float32
    assert -1.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0
    assert float(tf.reduce_max(out)) - float(tf.reduce_min(out)) > 1.0


def test_preprocess_eval_is_a_deterministic_central_crop():
    image = np.zeros((64, 64, 3), np.uint8)
    image[4:60, 4:60] = 255  # The central 87.5% (56x56) is white.
    outs = [data.preprocess(image, image_size=16, train=False) for _ in range(2)]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_allclose(outs[0], 1.0)


def test_preprocess_train_is_reproducible_from_its_seed():
    image = _random_image(np.random.default_rng(0), 48, 48)
    a, b, c = (
        data.preprocess(image, image_size=32, train=True, seed=s)
        for s in ([0, 1], [0, 1], [0, 2])
    )
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def _numbered(n: int) -> tf.data.Dataset:
    """n constant images; image i has value i and label i."""
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, 8, 8, 3), np.uint8
    )
    return tf.data.Dataset.from_tensor_slices((images, np.arange(n, dtype=np.int32)))


def test_eval_batches_keep_the_remainder_in_order():
    dataset = data.batches(
        _numbered(10), image_size=4, batch_size=4, train=False, seed=0
    )
    batches = list(dataset.as_numpy_iterator())
    assert [len(labels) for _, labels in batches] == [4, 4, 2]
    labels = np.concatenate([labels for _, labels in batches])
    np.testing.assert_array_equal(labels, np.arange(10))
    images, _ = batches[0]
    assert images.dtype == np.float32 and images.shape == (4, 4, 4, 3)
    # Constant images stay constant: image i maps to i / 127.5 - 1.
    np.testing.assert_allclose(images[:, 0, 0, 0], np.arange(4) / 127.5 - 1, atol=1e-6)


def test_train_batches_drop_the_remainder_and_reshuffle_reproducibly():
    def epochs(seed, n=2):
        dataset = data.batches(
            _numbered(10), image_size=4, batch_size=4, train=True, seed=seed
        )
        return [list(dataset.as_numpy_iterator()) for _ in range(n)]

    first, second = epochs(0)
    assert [len(labels) for _, labels in first] == [4, 4]
    first_labels = np.concatenate([labels for _, labels in first])
    assert len(set(first_labels)) == 8
    assert not np.array_equal(
        first_labels, np.concatenate([labels for _, labels in second])
    )
    again = epochs(0)
    for batch, batch_again in zip(first + second, again[0] + again[1]):
        for x, y in zip(batch, batch_again):
            np.testing.assert_array_equal(x, y)


def test_train_pipeline_position_is_checkpointable(tmp_path):
    dataset = data.batches(
        data.shapes("train", num_examples=64, seed=0),
        image_size=16,
        batch_size=8,
        train=True,
        seed=0,
    )
    iterator = iter(dataset)
    next(iterator)
    checkpoint = tf.train.Checkpoint(iterator=iterator)
    path = checkpoint.save(os.path.join(tmp_path, "ckpt"))
    expected = next(iterator)
    checkpoint.restore(path)
    for x, y in zip(expected, next(iterator)):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------
# Image folders


def test_image_folder_reads_jpeg_png_gray_and_rgba(tmp_path):
    rng = np.random.default_rng(0)
    # Each image gets its own size, so decoded images can be matched up.
    rgb, gray = _random_image(rng, 5, 6), rng.integers(0, 256, (7, 8), np.uint8)
    rgba = rng.integers(0, 256, (9, 10, 4), np.uint8)
    # JPEG is lossy and decoders differ slightly: use a smooth image.
    y, x = np.mgrid[0:16, 0:24]
    photo = np.stack([y * 15, x * 10, 255 - x * 5 - y * 5], -1).astype(np.uint8)
    for name in ["zebra", "ant"]:  # Created out of order; labels must be sorted.
        os.makedirs(tmp_path / "train" / name)
    Image.fromarray(rgb).save(tmp_path / "train" / "zebra" / "rgb.png")
    Image.fromarray(gray).save(tmp_path / "train" / "zebra" / "gray.PNG")
    Image.fromarray(rgba).save(tmp_path / "train" / "ant" / "rgba.png")
    Image.fromarray(photo).save(tmp_path / "train" / "ant" / "photo.jpg", quality=95)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    os.makedirs(tmp_path / "train" / ".ipynb_checkpoints")  # Not a class.

    dataset, class_names = data.image_folder(str(tmp_path), "train")
    assert class_names == ["ant", "zebra"]
    decoded = {x.shape[:2]: (x, y) for x, y in _examples(dataset)}
    assert len(decoded) == 4
    expected = {
        (5, 6): (rgb, 1),
        (7, 8): (np.stack([gray] * 3, axis=-1), 1),
        (9, 10): (rgba[..., :3], 0),
    }
    for size, (image, label) in expected.items():
        np.testing.assert_array_equal(decoded[size][0], image)
        assert decoded[size][1] == label
    jpeg, label = decoded[(16, 24)]
    assert label == 0
    pil_jpeg = np.asarray(Image.open(tmp_path / "train" / "ant" / "photo.jpg"))
    # tf.io.decode_image uses a faster, less exact IDCT than PIL.
    assert np.abs(jpeg.astype(int) - pil_jpeg).max() <= 8
    assert np.abs(jpeg.astype(int) - pil_jpeg).mean() < 2
    assert np.abs(jpeg.astype(int) - photo).mean() < 3


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"`.*missing.*` does not exist"):
        data.image_folder(str(tmp_path / "missing"), "train")
    os.makedirs(tmp_path / "train")
    with pytest.raises(ValueError, match=r"no class sub-folders in `.*train`"):
        data.image_folder(str(tmp_path), "train")
    os.makedirs(tmp_path / "train" / "cat")
    (tmp_path / "train" / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no JPEG/PNG images .*`.*cat`"):
        data.image_folder(str(tmp_path), "train")


def test_load_folder_checks_splits_have_the_same_classes(tmp_path):
    image = np.zeros((4, 4, 3), np.uint8)
    for split, classes in [("train", ["a", "b"]), ("validation", ["a", "c"])]:
        for name in classes:
            os.makedirs(tmp_path / split / name)
            Image.fromarray(image).save(tmp_path / split / name / "x.png")
    kwargs = {"data_dir": str(tmp_path), "image_size": 8, "batch_size": 2, "seed": 0}
    dataset, num_classes = data.load("folder", split="train", **kwargs)
    assert num_classes == 2
    images, labels = next(iter(dataset))
    assert images.shape == (2, 8, 8, 3) and sorted(labels.numpy()) == [0, 1]
    with pytest.raises(ValueError, match=r"classes of `.*validation` differ"):
        data.load("folder", split="validation", **kwargs)


def test_folder_shards_are_disjoint_files_that_cover_the_split(tmp_path):
    """Worker i of n reads files i, i + n, ... of `data.files`, whole."""
    for index in range(7):  # Each image its own size, to tell them apart.
        os.makedirs(tmp_path / "train" / f"c{index % 2}", exist_ok=True)
        image = np.zeros((index + 1, 3, 3), np.uint8)
        Image.fromarray(image).save(
            tmp_path / "train" / f"c{index % 2}" / f"{index}.png"
        )
    files = data.files("folder", data_dir=str(tmp_path), split="train")
    assert len(files) == 7
    seen = []
    for index in range(3):
        shard = (index, 3)
        dataset, _ = data.image_folder(str(tmp_path), "train", shard=shard)
        heights = [image.shape[0] for image, _ in _examples(dataset)]
        # The files of the shard, in their order.
        assert [os.path.basename(f) for f in files[index::3]] == [
            f"{h - 1}.png" for h in heights
        ]
        assert data.count_examples(
            "folder", data_dir=str(tmp_path), split="train", shard=shard
        ) == len(heights)
        seen += heights
    assert sorted(seen) == list(range(1, 8))
    with pytest.raises(ValueError, match=r"`shard` needs files"):
        data.load(
            "shapes",
            split="train",
            data_dir=None,
            image_size=8,
            batch_size=2,
            seed=0,
            shard=(0, 2),
        )


# --------------------------------------------------------------------------
# TFRecords


def _write_slim_tfrecord(path, images_and_labels) -> None:
    """Writes PNG examples as slim's `dataset_utils.image_to_tfexample`."""

    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    with tf.io.TFRecordWriter(str(path)) as writer:
        for image, label in images_and_labels:
            features = {
                "image/encoded": feature(tf.io.encode_png(image).numpy()),
                "image/format": feature(b"png"),
                "image/class/label": feature(label),
                "image/height": feature(image.shape[0]),
                "image/width": feature(image.shape[1]),
            }
            example = tf.train.Example(features=tf.train.Features(feature=features))
            writer.write(example.SerializeToString())


@pytest.mark.parametrize(
    "names",
    [
        [
            "flowers_train_00000-of-00002.tfrecord",
            "flowers_train_00001-of-00002.tfrecord",
        ],
        ["train-00000-of-00002", "train-00001-of-00002"],
        ["cifar10_train.tfrecord"],
    ],
)
def test_tfrecords_in_slim_format(tmp_path, names):
    rng = np.random.default_rng(0)
    examples = [(_random_image(rng, 4 + i, 5), i % 3) for i in range(6)]
    shards = np.array_split(np.arange(len(examples)), len(names))
    for name, shard in zip(names, shards):
        _write_slim_tfrecord(tmp_path / name, [examples[i] for i in shard])
    # Other splits must not be picked up, not even 'trainval'.
    for other in ["flowers_validation_00000-of-00001.tfrecord", "trainval-00000"]:
        _write_slim_tfrecord(tmp_path / other, [(_random_image(rng, 3, 3), 0)])

    decoded = _examples(data.tfrecords(str(tmp_path), "train"))
    assert len(decoded) == len(examples)
    for (image, label), (expected_image, expected_label) in zip(decoded, examples):
        np.testing.assert_array_equal(image, expected_image)
        assert label == expected_label


def test_load_tfrecord_reads_num_classes_from_labels_txt(tmp_path):
    image = np.zeros((6, 6, 3), np.uint8)
    _write_slim_tfrecord(tmp_path / "validation-00000-of-00001", [(image, 2)] * 3)
    kwargs = {"data_dir": str(tmp_path), "image_size": 4, "batch_size": 2, "seed": 0}
    with pytest.raises(ValueError, match=r"`.*labels\.txt` does not exist"):
        data.load("tfrecord", split="validation", **kwargs)
    (tmp_path / "labels.txt").write_text("0:daisy\n1:rose\n2:tulip\n")
    assert data.read_label_file(str(tmp_path)) == {0: "daisy", 1: "rose", 2: "tulip"}
    dataset, num_classes = data.load("tfrecord", split="validation", **kwargs)
    assert num_classes == 3
    assert [list(labels) for _, labels in dataset.as_numpy_iterator()] == [[2, 2], [2]]


def test_tfrecords_without_files_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"no TFRecord files match `.*train-\*"):
        data.tfrecords(str(tmp_path), "train")


# --------------------------------------------------------------------------
# load


def test_load_shapes_defaults():
    kwargs = {"data_dir": None, "image_size": 32, "batch_size": 64, "seed": 0}
    train, num_classes = data.load("shapes", split="train", **kwargs)
    val, _ = data.load("shapes", split="validation", **kwargs)
    assert num_classes == len(data.CLASS_NAMES)
    assert train.cardinality() == data.SHAPES_TRAIN_SIZE // 64
    assert val.cardinality() == data.SHAPES_VAL_SIZE // 64
    small, _ = data.load("shapes", split="validation", num_examples=10, **kwargs)
    assert small.cardinality() == 1
    assert train.element_spec == (
        tf.TensorSpec([64, 32, 32, 3], tf.float32),
        tf.TensorSpec([64], tf.int32),
    )


def test_load_errors():
    kwargs = {"split": "train", "image_size": 8, "batch_size": 2, "seed": 0}
    with pytest.raises(ValueError, match=r"unknown dataset `imagenet`"):
        data.load("imagenet", data_dir="/tmp", **kwargs)
    with pytest.raises(ValueError, match=r"`folder` needs a data directory"):
        data.load("folder", data_dir=None, **kwargs)


def test_cached_pipeline_yields_the_same_batches_every_epoch():
    kwargs = {
        "split": "train",
        "data_dir": None,
        "image_size": 16,
        "batch_size": 8,
        "seed": 3,
        "num_examples": 24,
    }
    plain, _ = data.load("shapes", **kwargs)
    cached, _ = data.load("shapes", cache=True, **kwargs)
    for epoch in range(2):  # The second epoch reads the cache.
        for (a, la), (b, lb) in zip(plain, cached, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"{epoch}")
            np.testing.assert_array_equal(la.numpy(), lb.numpy())


def _counted_batches(reads, *, known_size=True):
    """4 batches of 2 (images [2, 3] float32, labels); `reads` counts source reads."""

    def read(i):
        reads.append(int(i))
        return np.full([3], i, np.float32)

    source = tf.data.Dataset.range(8)
    if not known_size:
        source = source.filter(lambda i: True)  # Unknown cardinality.
    images = source.map(
        lambda i: tf.ensure_shape(tf.numpy_function(read, [i], tf.float32), [3])
    )
    return tf.data.Dataset.zip(images, source).batch(2)


def test_in_memory_reads_the_source_once_partial_passes_included():
    reads = []
    dataset = data.in_memory(_counted_batches(reads), batch_size=2)
    assert sorted(reads) == list(range(8))  # The one pass, now.
    first = [x.numpy().tolist() for x, _ in dataset.take(1)]  # A partial pass...
    whole = [x.numpy().tolist() for x, _ in dataset]
    assert first == whole[:1] and len(whole) == 4
    assert whole[3] == [[6.0] * 3, [7.0] * 3]
    assert sorted(reads) == list(range(8))  # ...and a full one: no new reads.


@pytest.mark.parametrize(
    ("known_size", "max_batches", "max_bytes", "cached", "batches"),
    [
        (True, None, 4 * 2 * (3 * 4 + 8), True, 4),  # Exactly the budget.
        (True, None, 4 * 2 * (3 * 4 + 8) - 1, False, 4),
        (False, None, 10**9, False, 4),  # Size unknown: streamed.
        (False, 3, 3 * 2 * (3 * 4 + 8), True, 3),  # Bounded by `max_batches`.
    ],
)
def test_in_memory_keeps_only_what_is_known_to_fit(
    known_size, max_batches, max_bytes, cached, batches
):
    reads = []
    dataset = data.in_memory(
        _counted_batches(reads, known_size=known_size),
        batch_size=2,
        max_batches=max_batches,
        max_bytes=max_bytes,
    )
    for _ in range(2):
        assert sum(1 for _ in dataset) == batches
    # Kept: read once, when built; else: once per pass.
    assert len(reads) == (1 if cached else 2) * batches * 2
