"""Tests for tfloop.models: the Keras ports must match TF-slim's networks.

Expected parameter counts are computed here, independently of tfloop, from
tables of slim's layers transcribed from tensorflow/models
`research/slim/nets/{alexnet,inception_v1,resnet_v1}.py`.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tfloop import models

# --- Slim's architectures, transcribed from slim's source ------------------
# Counting rules, from slim.conv2d and slim.batch_norm:
#   * trainable: every conv kernel (k * k * c_in * c_out); a conv bias only when
#     no batch norm follows (the logits, all of AlexNet); BN beta always and
#     BN gamma only when `scale=True` (ResNet's arg_scope, not Inception's).
#   * BN moving mean and variance are slim's non-trainable model variables;
#     they are counted separately and compared with Keras' non-trainable ones.

# alexnet_v2: (kernel, c_in, c_out) of conv1..conv5, fc6, fc7; no BN.
ALEXNET_V2 = [
    (11, 3, 64),
    (5, 64, 192),
    (3, 192, 384),
    (3, 384, 384),
    (3, 384, 256),
    (5, 256, 4096),
    (1, 4096, 4096),
]
ALEXNET_V2_LOGITS_IN = 4096

# inception_v1_base: root convs (kernel, c_out) from a 3-channel input, then
# Mixed modules as (branch_0 1x1, branch_1 1x1, branch_1 3x3, branch_2 1x1,
# branch_2 3x3, branch_3 1x1 after the pool). Max pools have no parameters.
INCEPTION_V1_ROOT = [(7, 64), (1, 64), (3, 192)]
INCEPTION_V1_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}

# resnet_v1_50: root conv 7x7 -> 64, then blocks of (base_depth, num_units);
# each bottleneck unit is 1x1 -> base, 3x3 -> base, 1x1 -> 4 * base, plus a
# 1x1 projection shortcut when its input depth differs from 4 * base.
RESNET_V1_50_BLOCKS = [(64, 3), (128, 4), (256, 6), (512, 3)]
# resnet_v1_test.py's `_resnet_small`.
RESNET_V1_SMALL_BLOCKS = [(1, 3), (2, 3), (4, 3), (8, 2)]


def _conv(k: int, c_in: int, c_out: int, bn: str | None) -> tuple[int, int]:
    """(trainable, BN moving) counts of one slim.conv2d; bn: None, "beta", "beta+gamma"."""
    kernel = k * k * c_in * c_out
    if bn is None:
        return kernel + c_out, 0
    return kernel + c_out * len(bn.split("+")), 2 * c_out


def _total(convs: list[tuple[int, int]]) -> tuple[int, int]:
    return sum(t for t, _ in convs), sum(m for _, m in convs)


def slim_alexnet_v2(num_classes: int) -> tuple[int, int]:
    convs = [_conv(k, i, o, None) for k, i, o in ALEXNET_V2]
    convs.append(_conv(1, ALEXNET_V2_LOGITS_IN, num_classes, None))  # fc8
    return _total(convs)


def slim_inception_v1(num_classes: int) -> tuple[int, int]:
    convs, c = [], 3
    for k, c_out in INCEPTION_V1_ROOT:
        convs.append(_conv(k, c, c_out, "beta"))
        c = c_out
    for b0, b1a, b1b, b2a, b2b, b3 in INCEPTION_V1_MIXED.values():
        convs += [
            _conv(1, c, b0, "beta"),
            _conv(1, c, b1a, "beta"),
            _conv(3, b1a, b1b, "beta"),
            _conv(1, c, b2a, "beta"),
            _conv(3, b2a, b2b, "beta"),
            _conv(1, c, b3, "beta"),
        ]
        c = b0 + b1b + b2b + b3
    convs.append(_conv(1, c, num_classes, None))  # Logits/Conv2d_0c_1x1
    return _total(convs)


def slim_resnet_v1(blocks: list[tuple[int, int]], num_classes: int) -> tuple[int, int]:
    bn = "beta+gamma"
    convs, c = [_conv(7, 3, 64, bn)], 64
    for base, units in blocks:
        for _ in range(units):
            if c != 4 * base:
                convs.append(_conv(1, c, 4 * base, bn))  # shortcut
            convs += [
                _conv(1, c, base, bn),
                _conv(3, base, base, bn),
                _conv(1, base, 4 * base, bn),
            ]
            c = 4 * base
    convs.append(_conv(1, c, num_classes, None))  # logits
    return _total(convs)


SLIM_COUNTS = {
    "alexnet_v2": slim_alexnet_v2(1000),
    "inception_v1": slim_inception_v1(1000),
    "resnet_v1_50": slim_resnet_v1(RESNET_V1_50_BLOCKS, 1000),
    "resnet_v1_small": slim_resnet_v1(RESNET_V1_SMALL_BLOCKS, 1000),
}

# slim's default arg_scope settings per model: (bn momentum, epsilon, scale).
SLIM_BN = {
    "inception_v1": (0.9997, 1e-3, False),
    "resnet_v1_50": (0.997, 1e-5, True),
    "resnet_v1_small": (0.997, 1e-5, True),
}
SLIM_WEIGHT_DECAY = {
    "alexnet_v2": 5e-4,
    "inception_v1": 4e-5,
    "resnet_v1_50": 1e-4,
    "resnet_v1_small": 1e-4,
}
SLIM_DROPOUT = {"alexnet_v2": [0.5, 0.5], "inception_v1": [0.2]}
MIN_SIZE = {
    "alexnet_v2": 195,
    "inception_v1": 32,
    "resnet_v1_50": 32,
    "resnet_v1_small": 32,
}
# A second, odd size per model; 227 gives AlexNet a 2x2 fc7 map to pool.
OTHER_SIZE = {
    "alexnet_v2": 227,
    "inception_v1": 45,
    "resnet_v1_50": 45,
    "resnet_v1_small": 45,
}


def _count(weights: list) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


@pytest.fixture(scope="module")
def imagenet_models() -> dict[str, keras.Model]:
    """Every model at slim's 224x224 and 1000 classes, built once."""
    return {n: models.get(n, num_classes=1000, image_size=224) for n in models.NAMES}


def test_names() -> None:
    assert models.NAMES == (
        "alexnet_v2",
        "inception_v1",
        "resnet_v1_50",
        "resnet_v1_small",
    )


def test_slim_tables_match_published_counts() -> None:
    """Guards the transcription: ResNet-50 v1 has 25,557,032 trainable weights."""
    assert SLIM_COUNTS["resnet_v1_50"][0] == 25_557_032


@pytest.mark.parametrize("name", models.NAMES)
def test_parameter_counts_match_slim(name, imagenet_models) -> None:
    model = imagenet_models[name]
    trainable, moving = SLIM_COUNTS[name]
    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == moving


@pytest.mark.parametrize(
    ("name", "feature_layer", "shape"),
    [  # Feature maps at 224x224 as slim's own tests assert them.
        ("alexnet_v2", "fc7_Relu", (1, 1, 4096)),
        ("inception_v1", "Mixed_5c", (7, 7, 1024)),
        ("resnet_v1_50", "block1_unit_3_Relu", (28, 28, 256)),
        ("resnet_v1_50", "block4_unit_3_Relu", (7, 7, 2048)),
    ],
)
def test_feature_map_shapes_at_224(name, feature_layer, shape, imagenet_models):
    layer = imagenet_models[name].get_layer(feature_layer)
    assert tuple(layer.output.shape[1:]) == shape


def test_resnet_strides_like_slim(imagenet_models) -> None:
    """Slim strides a block's last unit, on its 3x3 conv and its shortcut."""
    model = imagenet_models["resnet_v1_50"]
    assert model.get_layer("block1_unit_3_conv1").strides == (1, 1)
    assert model.get_layer("block1_unit_3_conv2").strides == (2, 2)
    assert model.get_layer("block1_unit_1_conv2").strides == (1, 1)
    assert model.get_layer("block2_unit_1_shortcut").strides == (1, 1)
    assert model.get_layer("block4_unit_3_conv2").strides == (1, 1)


def test_resnet_strided_conv_pads_like_slim() -> None:
    """Slim's conv2d_same equals a stride-1 SAME conv subsampled by 2.

    On even sizes Keras' own "same" padding with stride 2 differs from that,
    so this pins down the explicit padding of the port.
    """
    model = models.get("resnet_v1_small", num_classes=4)
    conv1 = model.get_layer("conv1")
    images = np.random.default_rng(0).random((1, 32, 32, 3), np.float32)
    ported = keras.Model(model.input, conv1.output)(images)
    dense = keras.ops.conv(images, conv1.kernel, strides=1, padding="same")
    np.testing.assert_allclose(ported, dense[:, ::2, ::2], rtol=1e-4, atol=1e-5)
    keras_same = keras.ops.conv(images, conv1.kernel, strides=2, padding="same")
    assert not np.allclose(ported, keras_same, rtol=1e-4, atol=1e-5)


def _layers_of(model: keras.Model, kind: type) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if isinstance(layer, kind)]


def _run(model: keras.Model, size: int) -> None:
    """A training-mode forward pass on two random images, checking the logits."""
    assert tuple(model.input.shape) == (None, size, size, 3)
    images = np.random.default_rng(0).random((2, size, size, 3), np.float32)
    logits = model(images, training=True)
    assert tuple(logits.shape) == (2, 4)
    assert np.all(np.isfinite(logits))


@pytest.mark.parametrize("name", models.NAMES)
def test_forward_pass_at_minimum_size(name) -> None:
    _run(models.get(name, num_classes=4, image_size=MIN_SIZE[name]), MIN_SIZE[name])


@pytest.mark.parametrize("name", models.NAMES)
def test_overrides_and_forward_pass_at_other_size(name) -> None:
    """Every option a model has overrides slim's default; also runs another size."""
    options = {"weight_decay": 1e-3}
    if name in SLIM_BN:
        options["bn_decay"] = 0.9
    if name in SLIM_DROPOUT:
        options["dropout_rate"] = 0.1
    size = OTHER_SIZE[name]
    model = models.get(name, num_classes=4, image_size=size, **options)
    _run(model, size)
    bns = _layers_of(model, keras.layers.BatchNormalization)
    assert {bn.momentum for bn in bns} == ({0.9} if name in SLIM_BN else set())
    rates = [d.rate for d in _layers_of(model, keras.layers.Dropout)]
    assert rates == [0.1] * len(SLIM_DROPOUT.get(name, []))
    for conv in _layers_of(model, keras.layers.Conv2D):
        assert conv.kernel_regularizer.l2 == pytest.approx(1e-3 / 2)


def test_any_size_model() -> None:
    model = models.get("resnet_v1_small", num_classes=3)
    assert tuple(model.input.shape) == (None, None, None, 3)
    logits = model(np.zeros((1, 40, 56, 3), np.float32), training=False)
    assert tuple(logits.shape) == (1, 3)


@pytest.mark.parametrize("name", models.NAMES)
def test_batch_norm_settings(name, imagenet_models) -> None:
    bns = _layers_of(imagenet_models[name], keras.layers.BatchNormalization)
    if name not in SLIM_BN:
        assert not bns
        return
    momentum, epsilon, scale = SLIM_BN[name]
    assert bns
    for bn in bns:
        assert type(bn) is keras.layers.BatchNormalization  # not subclassed
        assert not bn.synchronized
        assert bn.momentum == pytest.approx(momentum)
        assert bn.epsilon == pytest.approx(epsilon)
        assert bn.scale is scale
        assert bn.center


@pytest.mark.parametrize("name", models.NAMES)
def test_dropout_rates(name, imagenet_models) -> None:
    rates = [d.rate for d in _layers_of(imagenet_models[name], keras.layers.Dropout)]
    assert rates == SLIM_DROPOUT.get(name, [])


@pytest.mark.parametrize("name", models.NAMES)
def test_weight_decay_is_slims(name, imagenet_models) -> None:
    """Keras L2(wd / 2) on every kernel and nothing else, as slim's l2_regularizer."""
    model = imagenet_models[name]
    convs = _layers_of(model, keras.layers.Conv2D)
    for conv in convs:
        assert conv.kernel_regularizer.l2 == pytest.approx(SLIM_WEIGHT_DECAY[name] / 2)
        assert conv.bias_regularizer is None
    assert len(model.losses) == len(convs)


def test_weight_decay_loss_value() -> None:
    """The regularization loss equals slim's wd * sum(w ** 2) / 2."""
    model = models.get("resnet_v1_small", num_classes=4, weight_decay=0.01)
    kernels = [conv.kernel for conv in _layers_of(model, keras.layers.Conv2D)]
    expected = 0.01 * sum(np.sum(np.square(k.numpy())) for k in kernels) / 2
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-5)


def _one_line_error(match: str, **kwargs) -> None:
    with pytest.raises(ValueError, match=match) as err:
        models.get(**kwargs)
    assert "\n" not in str(err.value)


def test_unknown_name() -> None:
    _one_line_error(
        r"`vgg_16`.*alexnet_v2.*resnet_v1_small", name="vgg_16", num_classes=4
    )


@pytest.mark.parametrize("name", models.NAMES)
def test_too_small_image(name) -> None:
    size = MIN_SIZE[name] - 1
    _one_line_error(
        rf"`{name}`.*>= {MIN_SIZE[name]}.*{size}",
        name=name,
        num_classes=4,
        image_size=size,
    )


@pytest.mark.parametrize(
    ("match", "kwargs"),
    [
        ("num_classes", {"name": "resnet_v1_small", "num_classes": 1}),
        ("bn_decay", {"name": "resnet_v1_small", "num_classes": 4, "bn_decay": 1.5}),
        (
            "weight_decay",
            {"name": "inception_v1", "num_classes": 4, "weight_decay": -1},
        ),
        ("dropout_rate", {"name": "inception_v1", "num_classes": 4, "dropout_rate": 1}),
        (
            "`alexnet_v2` has no bn_decay",
            {"name": "alexnet_v2", "num_classes": 4, "bn_decay": 0.9},
        ),
        (
            "`resnet_v1_50` has no dropout_rate",
            {"name": "resnet_v1_50", "num_classes": 4, "dropout_rate": 0.5},
        ),
    ],
)
def test_bad_options(match, kwargs) -> None:
    _one_line_error(match, **kwargs)


def test_num_classes_must_be_int() -> None:
    with pytest.raises(TypeError, match="num_classes"):
        models.get("resnet_v1_small", num_classes=4.0)
