"""Input pipelines: image sources, inception-style preprocessing and batching.

Every source returns an *unbatched* `tf.data.Dataset` of
`(image uint8 [H, W, 3], label int32 [])`; `batches` turns one into
`(images float32 [B, S, S, 3] in [-1, 1], labels int32 [B])`.

Sources:

* `shapes`: a procedurally generated 4-class set that needs no download; the
  default for tests, examples and smoke runs.
* `image_folder`: `DATA_DIR/<split>/<class>/*.{jpg,jpeg,png,...}`.
* `tfrecords`: TFRecords of `tf.train.Example`s in TF-slim's format.

All randomness is stateless and derived from explicit seeds, so a pipeline is
reproducible from its seed and its position can be saved with
`tf.train.Checkpoint` (no Python generators or `py_function`s anywhere).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Iterator, Sequence

import tensorflow as tf

CLASS_NAMES = ("circle", "square", "triangle", "cross")
"""Class names of `shapes`, in label order."""

SHAPES_TRAIN_SIZE = 4096
SHAPES_VAL_SIZE = 512

LABELS_FILENAME = "labels.txt"
"""Label map next to slim TFRecords: one `label:class_name` per line."""

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

# Eval keeps the central 87.5% of the image, as slim's inception preprocessing.
_CENTRAL_FRACTION = 0.875
# Train crops cover 60-100% of the image area. Slim's inception preprocessing
# uses (0.05, 1.0), tuned for ImageNet's large photos; on small images (such as
# `shapes`) such crops often cut the object out, so the label becomes noise.
_TRAIN_AREA_RANGE = (0.6, 1.0)
_TRAIN_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)

_SOURCES = ("shapes", "folder", "tfrecord")

# `shapes` difficulty: the shape's half-extent as a fraction of the image
# side, and the standard deviation of the pixel noise (pixels are in [0, 1]).
_SHAPE_HALF_RANGE = (0.3, 0.45)
_SHAPE_NOISE_STDDEV = 0.05
# Texture inside the shape: stripe period in pixels, and how much darker the
# dark stripes are than the foreground colour.
_TEXTURE_PERIOD = 8
_TEXTURE_CONTRAST = 0.7


# --------------------------------------------------------------------------
# shapes: procedurally generated images.


def shapes(
    split: str, *, num_examples: int, seed: int, size: int = 48
) -> tf.data.Dataset:
    """Returns `num_examples` generated images of one of `CLASS_NAMES`.

    Each image is a filled circle, square, triangle (apex up) or cross of
    random colour, size (60-90% of the image side) and position on a
    background of another random colour, plus Gaussian pixel noise. Inside
    the shape, each class has its own texture (horizontal stripes, vertical
    stripes, checkerboard, none). Colour and position say nothing about the
    class. Easy on purpose: slim's Inception v1 at 32x32 (Adam 1e-3, batches
    of 32) passes 0.9 validation accuracy after about 64 steps, so BN
    experiments take minutes on a CPU; a 3-conv CNN without batch norm
    passes 0.9 within 150 SGD steps (`tests/test_data.py`).

    Example `i` is a pure function of `(seed, split, i)`: it is built by
    `Dataset.range(num_examples).map(...)` with `tf.random.stateless_*` ops,
    so the dataset is deterministic, needs no download, runs in parallel
    and is checkpointable by tf.data. Different `split` strings (e.g.
    'train', 'validation') give different examples.
    """
    if num_examples < 1:
        raise ValueError(f"`num_examples` must be positive, got {num_examples}")
    # crc32 (unlike `hash`) is stable across processes, so splits are too.
    base_key = tf.constant([seed, zlib.crc32(split.encode())], tf.int64)

    def make(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        key = tf.random.experimental.stateless_fold_in(base_key, index)
        return _shape_image(key, size)

    return tf.data.Dataset.range(num_examples).map(
        make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


def _shape_image(key: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Draws one `shapes` example from the stateless seed `key`."""
    keys = tf.random.experimental.stateless_split(key, 6)
    label = tf.random.stateless_uniform(
        [], keys[0], minval=0, maxval=len(CLASS_NAMES), dtype=tf.int32
    )
    # Half-extent h of the shape, then a centre that keeps it inside.
    half = tf.random.stateless_uniform([], keys[1], *_SHAPE_HALF_RANGE) * size
    centre = tf.random.stateless_uniform([2], keys[2], half, size - half)
    # Pixel-centre coordinates relative to the shape's centre.
    coords = tf.range(size, dtype=tf.float32) + 0.5
    dy = coords[:, None] - centre[0]
    dx = coords[None, :] - centre[1]
    ady, adx = tf.abs(dy), tf.abs(dx)
    arm = half / 3
    masks = tf.stack(
        [
            dx**2 + dy**2 <= half**2,  # circle
            tf.maximum(adx, ady) <= 0.8 * half,  # square of similar area
            (ady <= half) & (adx <= (dy + half) / 2),  # triangle, apex up
            ((adx <= arm) & (ady <= half)) | ((ady <= arm) & (adx <= half)),
        ]
    )
    # Each class also has its own texture inside the shape: horizontal or
    # vertical stripes, a checkerboard, or none (period `_TEXTURE_PERIOD`).
    # Local texture is what networks ending in global average pooling (slim's
    # Inception and ResNet) pick up fastest; shape alone takes them hundreds
    # of steps longer, which would make every BN experiment needlessly slow.
    stripes = tf.cast((tf.range(size) // (_TEXTURE_PERIOD // 2)) % 2, tf.float32)
    rows = stripes[:, None] * tf.ones([1, size])
    columns = tf.transpose(rows)
    textures = tf.stack(
        [rows, columns, tf.math.floormod(rows + columns, 2.0), tf.ones([size, size])]
    )
    texture = tf.gather(textures, label)[..., None]
    mask = tf.cast(tf.gather(masks, label), tf.float32)[..., None]
    # Colours in [0, 1]; per channel the foreground sits 0.3-0.7 away from
    # the background on the colour circle, i.e. >= 0.3 away in value.
    background = tf.random.stateless_uniform([3], keys[3])
    offset = tf.random.stateless_uniform([3], keys[4], 0.3, 0.7)
    foreground = tf.math.floormod(background + offset, 1.0)
    foreground = foreground * (1 - _TEXTURE_CONTRAST * (1 - texture))
    image = mask * foreground + (1 - mask) * background
    image += tf.random.stateless_normal(
        [size, size, 3], keys[5], stddev=_SHAPE_NOISE_STDDEV
    )
    image = tf.cast(tf.round(tf.clip_by_value(image, 0, 1) * 255), tf.uint8)
    return image, label


# --------------------------------------------------------------------------
# Image folders.


def image_folder(
    data_dir: str, split: str, *, shard: tuple[int, int] | None = None
) -> tuple[tf.data.Dataset, list[str]]:
    """Reads `data_dir/<split>/<class>/*` images; returns them and the classes.

    Labels are indices into the sorted class-directory names, which are
    returned too. JPEG, PNG, BMP and GIF (first frame) files are decoded to
    RGB, so grayscale and RGBA files work as well; other files, and hidden
    ones such as `.ipynb_checkpoints`, are ignored.
    Paths go through `tf.io.gfile`, so e.g. `gs://` folders work.

    Examples come in a fixed pseudo-random order (sorted by a hash of
    `<class>/<file>`) rather than class by class: a shuffle buffer smaller
    than the dataset would otherwise fill batches with one or two classes,
    which skews gradients and batch-norm statistics alike. `shard=(i, n)`
    keeps every n-th file of that order from the i-th (see `files`).

    Raises:
      ValueError: if the split folder does not exist, has no class
        sub-folders, or a class folder has no images.
    """
    paths, labels, class_names = _folder_examples(os.path.join(data_dir, split))
    dataset = tf.data.Dataset.from_tensor_slices(
        (_shard(paths, shard), tf.constant(_shard(labels, shard), tf.int32))
    )

    def read(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return _decode(tf.io.read_file(path)), label

    dataset = dataset.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset, class_names


def _folder_examples(split_dir: str) -> tuple[list[str], list[int], list[str]]:
    """`_image_files` in `image_folder`'s reading order (by a hash of the path)."""
    paths, labels, class_names = _image_files(split_dir)
    order = sorted(
        range(len(paths)),
        key=lambda i: hashlib.md5(
            os.path.relpath(paths[i], split_dir).encode()
        ).hexdigest(),
    )
    return [paths[i] for i in order], [labels[i] for i in order], class_names


def _shard(items: list, shard: tuple[int, int] | None) -> list:
    """Items `i, i + n, i + 2n, ...` for `shard=(i, n)`, as `Dataset.shard(n, i)`."""
    if shard is None:
        return items
    index, count = shard
    return items[index::count]


def _image_files(split_dir: str) -> tuple[list[str], list[int], list[str]]:
    """Image paths under `split_dir/<class>/`, their labels, and the classes."""
    class_names = _class_names(split_dir)
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(split_dir, name)
        files = [
            f
            for f in tf.io.gfile.listdir(class_dir)
            if f.lower().endswith(_IMAGE_EXTENSIONS) and not f.startswith(".")
        ]
        if not files:
            raise ValueError(f"no JPEG/PNG images in class folder `{class_dir}`")
        paths += [os.path.join(class_dir, f) for f in files]
        labels += [label] * len(files)
    return paths, labels, class_names


def _class_names(split_dir: str) -> list[str]:
    """Sorted names of the sub-directories of `split_dir` (one per class)."""
    if not tf.io.gfile.isdir(split_dir):
        raise ValueError(f"image folder `{split_dir}` does not exist")
    names = sorted(
        name.rstrip("/")
        for name in tf.io.gfile.listdir(split_dir)
        if not name.startswith(".") and tf.io.gfile.isdir(os.path.join(split_dir, name))
    )
    if not names:
        raise ValueError(f"no class sub-folders in `{split_dir}`")
    return names


def _decode(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG/PNG/BMP/GIF bytes to uint8 RGB [H, W, 3]."""
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


# --------------------------------------------------------------------------
# TFRecords in TF-slim's format.


def _tfrecord_patterns(split: str) -> tuple[str, ...]:
    """File-name globs for a split, covering slim's `datasets/` conventions.

    * `<split>-*`: ImageNet (`train-00000-of-01024`).
    * `<split>.tfrecord*`, `<split>_*.tfrecord*`: plain names.
    * `*_<split>.tfrecord*`: cifar10 / mnist (`cifar10_train.tfrecord`).
    * `*_<split>_*.tfrecord*`: flowers (`flowers_train_00000-of-00005.tfrecord`).

    The separators around `<split>` keep 'train' from matching 'trainval'.
    """
    return (
        f"{split}-*",
        f"{split}.tfrecord*",
        f"{split}_*.tfrecord*",
        f"*_{split}.tfrecord*",
        f"*_{split}_*.tfrecord*",
    )


def tfrecords(
    data_dir: str, split: str, *, shard: tuple[int, int] | None = None
) -> tf.data.Dataset:
    """Reads TFRecords of `tf.train.Example`s written by TF-slim's converters.

    Uses the features `image/encoded` (JPEG/PNG bytes) and
    `image/class/label` (int64); the others slim writes are ignored. Files
    are those in `data_dir` matching any of the globs `<split>-*`,
    `<split>.tfrecord*`, `<split>_*.tfrecord*`, `*_<split>.tfrecord*` or
    `*_<split>_*.tfrecord*` (slim's ImageNet, cifar10/mnist and flowers
    naming). They are read one after the other in sorted order (slim's
    converters shuffle examples before writing them); `shard=(i, n)` reads
    every n-th file from the i-th (see `files`).

    Raises:
      ValueError: if no file matches.
    """

    def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        example = tf.io.parse_single_example(record, _TFRECORD_FEATURES)
        label = tf.cast(example["image/class/label"], tf.int32)
        return _decode(example["image/encoded"]), label

    files = _shard(_tfrecord_files(data_dir, split), shard)
    return tf.data.TFRecordDataset(files).map(
        parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )


_TFRECORD_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
}


def _tfrecord_files(data_dir: str, split: str) -> list[str]:
    files = sorted(
        {
            path
            for pattern in _tfrecord_patterns(split)
            for path in tf.io.gfile.glob(os.path.join(data_dir, pattern))
        }
    )
    if not files:
        pattern = os.path.join(data_dir, f"{{{','.join(_tfrecord_patterns(split))}}}")
        raise ValueError(f"no TFRecord files match `{pattern}`")
    return files


def files(name: str, *, data_dir: str | None, split: str) -> list[str]:
    """The files `load` reads a split from, in reading order.

    An image folder's images, or the TFRecord files; none for `shapes`
    (generated). `load(..., shard=(i, n))` reads items `i, i + n, ...` of
    this list: worker i of n reads only its own files (file sharding).
    """
    if name == "folder":
        return _folder_examples(os.path.join(data_dir, split))[0]
    if name == "tfrecord":
        return _tfrecord_files(data_dir, split)
    return []


def count_examples(
    name: str, *, data_dir: str, split: str, shard: tuple[int, int] | None = None
) -> int:
    """Examples in the files of `split` (of `shard`, see `files`), without decoding.

    An image folder holds one per file; TFRecords are counted record by
    record (read, not parsed).
    """
    if name == "tfrecord":
        records = tf.data.TFRecordDataset(
            _shard(_tfrecord_files(data_dir, split), shard)
        )
        return int(records.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
    return len(_shard(files(name, data_dir=data_dir, split=split), shard))


def encoded_images(
    name: str, *, data_dir: str | None, splits: Sequence[str]
) -> Iterator[tuple[str, tf.Tensor]]:
    """`(where, encoded bytes)` of every image file or record of `splits`.

    For finding a corrupt image after tf.data failed to decode one (its error
    names no file): `where` is a path, or `file record i` for TFRecords.
    `shapes` has no files and yields nothing.
    """
    for split in splits:
        if name == "folder":
            for path in _image_files(os.path.join(data_dir, split))[0]:
                yield path, tf.io.read_file(path)
        elif name == "tfrecord":
            for path in _tfrecord_files(data_dir, split):
                for i, record in enumerate(tf.data.TFRecordDataset(path)):
                    example = tf.io.parse_single_example(record, _TFRECORD_FEATURES)
                    yield f"{path} record {i}", example["image/encoded"]


def read_label_file(data_dir: str) -> dict[int, str]:
    """Reads slim's `labels.txt` (`label:class_name` per line) in `data_dir`.

    Raises:
      ValueError: if the file is missing or a line is not `label:name`.
    """
    path = os.path.join(data_dir, LABELS_FILENAME)
    if not tf.io.gfile.exists(path):
        raise ValueError(f"label file `{path}` does not exist")
    with tf.io.gfile.GFile(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    labels = {}
    for line in lines:
        label, sep, name = line.partition(":")
        if not sep or not label.strip().isdigit():
            raise ValueError(f"bad line {line!r} in `{path}`: expected `label:name`")
        labels[int(label)] = name
    if not labels:
        raise ValueError(f"label file `{path}` is empty")
    return labels


# --------------------------------------------------------------------------
# Preprocessing and batching.


def preprocess(
    image: tf.Tensor,
    *,
    image_size: int,
    train: bool,
    seed: tf.Tensor | Sequence[int] | None = None,
) -> tf.Tensor:
    """Maps a uint8 [H, W, 3] image to float32 [image_size, image_size, 3].

    Inception style, as slim's `inception_preprocessing` without colour
    distortion: training takes a random crop (60-100% of the area, aspect
    ratio 3/4-4/3) and a random horizontal flip; evaluation takes the central
    87.5%. Both then resize bilinearly and scale to [-1, 1].

    Training randomness is stateless: `seed` (shape [2] integers) fixes the
    crop and the flip, so augmentation is reproducible. Without a seed one
    is drawn from the global generator. Evaluation is deterministic and
    ignores `seed`.
    """
    image = tf.convert_to_tensor(image)
    if train:
        if seed is None:
            seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int32)
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed))
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image),
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=crop_seed,
            min_object_covered=0.0,
            aspect_ratio_range=_TRAIN_ASPECT_RATIO_RANGE,
            area_range=_TRAIN_AREA_RANGE,
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.slice(image, begin, crop_size)
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    else:
        image = tf.image.central_crop(image, _CENTRAL_FRACTION)
    image = tf.image.resize(image, [image_size, image_size])
    # Bilinear interpolation never overshoots, so this stays in [-1, 1].
    image = image / 127.5 - 1.0
    return tf.ensure_shape(image, [image_size, image_size, 3])


def batches(
    dataset: tf.data.Dataset,
    *,
    image_size: int,
    batch_size: int,
    train: bool,
    seed: int,
    shuffle_buffer: int = 4096,
) -> tf.data.Dataset:
    """Preprocesses and batches a source; yields `(images, labels)`.

    Training shuffles (re-shuffled on every iteration, i.e. epoch), augments
    with a per-example seed and drops the last partial batch, so every step
    sees a full batch (batch-norm statistics always come from `batch_size`
    examples). Evaluation neither shuffles nor augments, and keeps the last
    partial batch, so every example is seen exactly once.

    The pipeline is parallel but deterministic: the same `seed` gives the
    same batches, epoch after epoch, on every run. It does not repeat; the
    caller decides the number of epochs.
    """
    if train:
        dataset = dataset.shuffle(
            shuffle_buffer, seed=seed, reshuffle_each_iteration=True
        )
        # One [2] int64 seed per example, new ones each epoch, all from `seed`.
        example_seeds = tf.data.Dataset.random(
            seed=seed + 1, rerandomize_each_iteration=True
        ).batch(2)
        dataset = tf.data.Dataset.zip(dataset, example_seeds).map(
            lambda example, example_seed: (
                preprocess(
                    example[0], image_size=image_size, train=True, seed=example_seed
                ),
                example[1],
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    else:
        dataset = dataset.map(
            lambda image, label: (
                preprocess(image, image_size=image_size, train=False),
                label,
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    dataset = dataset.batch(batch_size, drop_remainder=train)
    return dataset.prefetch(tf.data.AUTOTUNE)


def load(
    name: str,
    *,
    split: str,
    data_dir: str | None,
    image_size: int,
    batch_size: int,
    seed: int,
    num_examples: int | None = None,
    augment: bool | None = None,
    cache: bool = False,
    shard: tuple[int, int] | None = None,
) -> tuple[tf.data.Dataset, int]:
    """Returns batched `(images, labels)` of a named source and its class count.

    `name` is 'shapes' (generated; `data_dir` is ignored and `num_examples`
    defaults to `SHAPES_TRAIN_SIZE` for 'train', else `SHAPES_VAL_SIZE`),
    'folder' (`image_folder`) or 'tfrecord' (`tfrecords`; the class count
    comes from slim's `labels.txt` in `data_dir`, as the largest label + 1,
    because scanning the records would take a pass over the data).
    `num_examples` is only used by 'shapes'. Split 'train' is shuffled,
    augmented and drops the last partial batch; other splits are not.
    `augment=False` gives a train split the evaluation treatment (central
    crop, every example once, in order), e.g. to recalibrate BN statistics
    on the input distribution validation sees. `cache=True` keeps the decoded
    (not yet augmented) images in memory after the first pass, so later
    epochs skip reading and decoding; it needs memory for the whole split.
    `shard=(i, n)` reads only items `i, i + n, ...` of `files` (worker i of
    n reads its own files); `shapes` has no files to shard.

    Raises:
      ValueError: for an unknown name, a missing `data_dir`, or any error of
        the underlying source.
    """
    train = split == "train"
    augment = train if augment is None else augment
    if name == "shapes":
        if shard is not None:
            raise ValueError("`shard` needs files; dataset `shapes` is generated")
        if num_examples is None:
            num_examples = SHAPES_TRAIN_SIZE if train else SHAPES_VAL_SIZE
        source = shapes(split, num_examples=num_examples, seed=seed)
        num_classes = len(CLASS_NAMES)
    elif name in _SOURCES:
        if not data_dir:
            raise ValueError(f"dataset `{name}` needs a data directory")
        if name == "folder":
            source, class_names = image_folder(data_dir, split, shard=shard)
            _check_same_classes(data_dir, split, class_names)
            num_classes = len(class_names)
        else:
            source = tfrecords(data_dir, split, shard=shard)
            num_classes = max(read_label_file(data_dir)) + 1
    else:
        raise ValueError(f"unknown dataset `{name}`; expected one of {_SOURCES}")
    if cache:
        source = source.cache()
    dataset = batches(
        source, image_size=image_size, batch_size=batch_size, train=augment, seed=seed
    )
    return dataset, num_classes


def _check_same_classes(data_dir: str, split: str, class_names: list[str]) -> None:
    """Fails if `split` has other classes than the train split.

    Labels are positions in the sorted class list, so a class missing from
    one split would silently shift every later label.
    """
    train_dir = os.path.join(data_dir, "train")
    if split == "train" or not tf.io.gfile.isdir(train_dir):
        return
    train_names = _class_names(train_dir)
    if train_names != class_names:
        diff = sorted(set(train_names) ^ set(class_names))
        raise ValueError(
            f"classes of `{os.path.join(data_dir, split)}` differ from those of "
            f"`{train_dir}`: {diff}"
        )


# Validation and recalibration data kept in memory up to this size (the main
# command's are 6 and 20 MB; ImageNet's validation split at 224 px is not).
IN_MEMORY_BYTES = 512 * 2**20


def in_memory(
    dataset: tf.data.Dataset,
    *,
    batch_size: int,
    max_batches: int | None = None,
    max_bytes: int = IN_MEMORY_BYTES,
) -> tf.data.Dataset:
    """The batches of an evaluation-treatment dataset, read once and kept.

    Validation and recalibration read the same batches in the same order at
    every validation: decoding and preprocessing them again each time took
    a third of a validation phase in the main command
    (`benchmarks/README.md`). The cache is filled now, by one full pass, so
    that later partial passes (recalibration's early stop, the stale check
    on the first batches) read from it too: `tf.data` keeps an in-memory
    cache only once a pass has reached the end.

    Returns `dataset` as it is when its size is not known to be at most
    `max_bytes`: from its cardinality, or `max_batches` when it is unknown
    (the dataset is cut to `max_batches` batches either way).
    """
    if max_batches is not None:
        dataset = dataset.take(max_batches)
    batches = int(dataset.cardinality())
    if batches < 0:
        if max_batches is None:
            return dataset
        batches = max_batches
    sizes = [
        (spec.shape[1:].num_elements(), spec.dtype.size)
        for spec in tf.nest.flatten(dataset.element_spec)
    ]
    if any(n is None for n, _ in sizes):  # Images of varying shapes.
        return dataset
    if batches * batch_size * sum(n * size for n, size in sizes) > max_bytes:
        return dataset
    cached = dataset.cache()
    for _ in cached:
        pass
    return cached
