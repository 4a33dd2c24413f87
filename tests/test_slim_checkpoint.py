"""`tfloop.models.load_slim_checkpoint`: TF1 slim checkpoints into tfloop's nets.

Checkpoints are written the way slim wrote them (TF1 graph variables under
slim's names, `tf.compat.v1.train.Saver`), from slim names listed in
`slim_reference.py` from slim's sources, independently of the module's
name mapping.
Where tf-slim itself imports, its real nets write the checkpoint and compute
the reference logits.
"""

import importlib
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from slim_reference import (
    SLIM_NAMES,
    random_value,
    slim_tensors,
    tfloop_path,
    write_slim_checkpoint,
)

import tfloop

# tf-slim 1.1.0's alexnet_v2 and inception_v1 have no global pool: 224 px.
REAL_SLIM_SIZE = {"alexnet_v2": 224, "inception_v1": 224, "resnet_v1_50": 64}

# --- Names -----------------------------------------------------------------


@pytest.mark.parametrize("name", tfloop.models.NAMES)
def test_every_variable_has_its_slim_name(name):
    model = tfloop.models.get(name, num_classes=7)
    scope = tfloop.models.slim_checkpoint.slim_scope(model)
    names = [
        tfloop.models.slim_checkpoint.slim_name(scope, v.path) for v in model.weights
    ]
    assert sorted(names) == sorted(SLIM_NAMES[name])
    assert [tfloop_path(n) for n in names] == [v.path for v in model.weights]


# --- Loading ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["alexnet_v2", "inception_v1", "resnet_v1_50"])
def test_checkpoint_loads_every_tensor(name, tmp_path):
    model = tfloop.models.get(name, num_classes=5)
    tensors = slim_tensors(name, model, np.random.default_rng(0))
    extra = {"global_step": np.int64(1000)}
    prefix = write_slim_checkpoint(tmp_path / "model.ckpt-1000", {**tensors, **extra})
    result = tfloop.models.load_slim_checkpoint(model, str(tmp_path))  # A directory.
    assert sorted(result.loaded) == sorted(tensors)
    assert result.skipped == () and result.unused == ("global_step",)
    for v in model.weights:
        slim_name = next(n for n in tensors if tfloop_path(n) == v.path)
        np.testing.assert_array_equal(v.numpy(), tensors[slim_name], err_msg=v.path)
    assert prefix.endswith("model.ckpt-1000")


def test_logits_after_loading_match_numpy(tmp_path):
    """resnet_v1_small's logits from the loaded weights, recomputed in float64."""
    model = tfloop.models.get("resnet_v1_small", num_classes=3, image_size=32)
    tensors = slim_tensors("resnet_v1_small", model, np.random.default_rng(1))
    prefix = write_slim_checkpoint(tmp_path / "model.ckpt", tensors)
    tfloop.models.load_slim_checkpoint(model, prefix)
    images = np.random.default_rng(2).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    expected = _numpy_resnet_v1_small(tensors, images.astype(np.float64))
    logits = model(images, training=False).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_loads_into_every_replica(tmp_path, mirrored):
    with mirrored.scope():
        model = tfloop.models.get("resnet_v1_small", num_classes=4)
    tensors = slim_tensors("resnet_v1_small", model, np.random.default_rng(9))
    prefix = write_slim_checkpoint(tmp_path / "ckpt", tensors)
    tfloop.models.load_slim_checkpoint(model, prefix)
    for v in model.weights:
        name = next(n for n in tensors if tfloop_path(n) == v.path)
        replicas = mirrored.experimental_local_results(v.value)
        assert len(replicas) == 2
        for value in replicas:
            np.testing.assert_array_equal(value.numpy(), tensors[name], err_msg=name)


def test_published_imagenet_checkpoint_and_excluded_logits(tmp_path):
    """Slim's Inception checkpoints have 1001 classes; fine-tuning excludes them."""
    full = tfloop.models.get("inception_v1", num_classes=1001)
    tensors = slim_tensors("inception_v1", full, np.random.default_rng(3))
    prefix = write_slim_checkpoint(tmp_path / "inception_v1.ckpt", tensors)
    assert len(tfloop.models.load_slim_checkpoint(full, prefix).loaded) == 230

    model = tfloop.models.get("inception_v1", num_classes=4)
    before = {v.path: v.numpy() for v in model.weights}
    with pytest.raises(ValueError) as error:
        tfloop.models.load_slim_checkpoint(model, prefix)
    message = str(error.value)
    assert (
        "`InceptionV1/Logits/Conv2d_0c_1x1/weights` with shape [1, 1, 1024, 1001]"
        in message
    )
    assert "exclude scope `InceptionV1/Logits`" in message and "\n" not in message
    for v in model.weights:  # Refused before anything was set.
        np.testing.assert_array_equal(v.numpy(), before[v.path])

    result = tfloop.models.load_slim_checkpoint(
        model, prefix, exclude_scopes=["InceptionV1/Logits"]
    )
    assert len(result.loaded) == 228
    assert (
        sorted(result.skipped)
        == sorted(result.unused)
        == [
            "InceptionV1/Logits/Conv2d_0c_1x1/biases",
            "InceptionV1/Logits/Conv2d_0c_1x1/weights",
        ]
    )
    logits = model.get_layer("Logits_Conv2d_0c_1x1")
    np.testing.assert_array_equal(logits.kernel.numpy(), before[logits.kernel.path])
    ignored = tfloop.models.get("inception_v1", num_classes=4)
    result = tfloop.models.load_slim_checkpoint(ignored, prefix, ignore_missing=True)
    assert len(result.loaded) == 228 and len(result.skipped) == 2


def test_resnet_published_checkpoint_has_1000_classes(tmp_path):
    model = tfloop.models.get("resnet_v1_small", num_classes=1000)
    tensors = slim_tensors("resnet_v1_small", model, np.random.default_rng(4))
    prefix = write_slim_checkpoint(tmp_path / "ckpt", tensors)
    assert len(tfloop.models.load_slim_checkpoint(model, prefix).loaded) == 192


def test_missing_variable_and_bad_arguments_are_named(tmp_path):
    model = tfloop.models.get("resnet_v1_small", num_classes=4)
    tensors = slim_tensors("resnet_v1_small", model, np.random.default_rng(5))
    missing = "resnet_v1_small/block2/unit_1/bottleneck_v1/conv2/BatchNorm/moving_mean"
    del tensors[missing]
    prefix = write_slim_checkpoint(tmp_path / "ckpt", tensors)
    load = tfloop.models.load_slim_checkpoint
    with pytest.raises(
        ValueError, match=f"has no `{missing}`.*`resnet_v1_small/block2`"
    ):
        load(model, prefix)
    result = load(model, prefix, exclude_scopes=["resnet_v1_small/block2/"])
    block2 = [n for n in SLIM_NAMES["resnet_v1_small"] if "/block2/" in n]
    assert sorted(result.skipped) == sorted(block2) and len(result.loaded) == 192 - 50
    with pytest.raises(ValueError, match="'resnet_v1_small/block9' names no variable"):
        load(model, prefix, exclude_scopes=["resnet_v1_small/block9"])
    with pytest.raises(ValueError, match="'resnet_v1_small/block2/unit_1/bottleneck'"):
        load(model, prefix, exclude_scopes=["resnet_v1_small/block2/unit_1/bottleneck"])
    with pytest.raises(TypeError, match="`exclude_scopes`"):
        load(model, prefix, exclude_scopes="resnet_v1_small/logits")
    with pytest.raises(ValueError, match="neither a checkpoint prefix"):
        load(model, str(tmp_path / "nothing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="directory without a checkpoint"):
        load(model, str(empty))
    other = tfloop.models.get("inception_v1", num_classes=4)
    with pytest.raises(ValueError, match="none of the 230 variables.*another network"):
        load(other, prefix)


# --- Fine-tuning: trainable scopes, restored BN statistics ----------------


def _loaded_resnet(tmp_path, seed=7):
    model = tfloop.models.get("resnet_v1_small", num_classes=4, image_size=32)
    tensors = slim_tensors("resnet_v1_small", model, np.random.default_rng(seed))
    prefix = write_slim_checkpoint(tmp_path / "ckpt", tensors)
    tfloop.models.load_slim_checkpoint(model, prefix)
    return model, tensors


def _train(model, steps, seed=8):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    step = tfloop.make_train_step(
        model, keras.optimizers.SGD(0.1), loss, bn_audit="off"
    )
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        images = rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
        step((images, rng.integers(0, 4, 8)))


def test_trainable_scopes_train_inside_and_keep_everything_else(tmp_path):
    """Slim's --trainable_scopes: outside them weights and BN statistics stay."""
    model, tensors = _loaded_resnet(tmp_path)
    scopes = ["resnet_v1_small/logits", "resnet_v1_small/block4/unit_2"]
    trained = tfloop.models.set_trainable_scopes(model, scopes)
    inside = [n for n in SLIM_NAMES["resnet_v1_small"] if n.startswith(tuple(scopes))]
    # Trainable: weights, gamma and beta inside the scopes (not moving stats).
    assert sorted(trained) == sorted(n for n in inside if "moving_" not in n)
    _train(model, steps=3)
    for v in model.weights:
        name = next(n for n in tensors if tfloop_path(n) == v.path)
        if name in inside:
            assert not np.array_equal(v.numpy(), tensors[name]), name
        else:
            np.testing.assert_array_equal(v.numpy(), tensors[name], err_msg=name)


def test_trainable_scopes_refuse_half_layers_and_typos():
    model = tfloop.models.get("resnet_v1_small", num_classes=4)
    with pytest.raises(ValueError, match="only part of layer `logits`"):
        tfloop.models.set_trainable_scopes(model, ["resnet_v1_small/logits/weights"])
    with pytest.raises(ValueError, match="`trainable_scopes` entry 'Logits' names no"):
        tfloop.models.set_trainable_scopes(model, ["Logits"])
    assert all(layer.trainable for layer in model.layers)


def test_first_step_after_loading_keeps_the_restored_statistics(tmp_path):
    """Loaded statistics are history: one step is slim's EMA update from them.

    Relies on the core's rule that statistics restored from elsewhere count
    as a long history under debiased averaging (else the step would replace
    them with the batch's).
    """
    model, tensors = _loaded_resnet(tmp_path)
    loaded = tensors["resnet_v1_small/conv1/BatchNorm/moving_mean"]
    rng = np.random.default_rng(8)
    images = rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    conv1 = keras.Model(model.input, model.get_layer("conv1").output)
    batch_mean = conv1(images).numpy().mean(axis=(0, 1, 2))
    _train(model, steps=1)
    after = model.get_layer("conv1_BatchNorm").moving_mean.numpy()
    expected = 0.997 * loaded + 0.003 * batch_mean  # ResNet's BN decay.
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-7)


# --- A float64 numpy ResNet v1, from slim's resnet_v1.py -------------------


def _np_conv(x, w, stride=1, pad=None):
    """Convolution; `pad` (before, after) then VALID; None pads like SAME at stride 1."""
    k = w.shape[0]
    pad = ((k - 1) // 2, k - 1 - (k - 1) // 2) if pad is None else pad
    x = np.pad(x, ((0, 0), pad, pad, (0, 0)))
    oh, ow = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    out = 0.0
    for i in range(k):
        for j in range(k):
            window = x[:, i : i + stride * oh : stride, j : j + stride * ow : stride]
            out = out + np.einsum("nhwc,co->nhwo", window, w[i, j])
    return out


def _np_conv_bn(t, scope, x, stride=1, pad=None, relu=True):
    """slim.conv2d with batch norm (inference, epsilon 1e-5, scale) and ReLU."""
    x = _np_conv(x, t[f"{scope}/weights"], stride, pad)
    bn = {
        v: t[f"{scope}/BatchNorm/{v}"]
        for v in ("gamma", "beta", "moving_mean", "moving_variance")
    }
    x = (x - bn["moving_mean"]) / np.sqrt(bn["moving_variance"] + 1e-5)
    x = x * bn["gamma"] + bn["beta"]
    return np.maximum(x, 0) if relu else x


def _np_conv2d_same(t, scope, x, k, stride):
    """resnet_utils.conv2d_same: explicit padding when strided."""
    if stride == 1:
        return _np_conv_bn(t, scope, x)
    return _np_conv_bn(t, scope, x, stride, ((k - 1) // 2, k - 1 - (k - 1) // 2))


def _numpy_resnet_v1_small(tensors, images):
    """`_resnet_small` of slim's resnet_v1_test.py, global pool, logits."""
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    x = _np_conv2d_same(t, "resnet_v1_small/conv1", images, 7, 2)
    x = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=-np.inf)
    x = np.max(
        [x[:, i : i + 15 : 2, j : j + 15 : 2] for i in range(3) for j in range(3)],
        axis=0,
    )  # max_pool2d 3x3, stride 2, SAME: 16 -> 8.
    for b, (base, units, stride) in enumerate(
        [(1, 3, 2), (2, 3, 2), (4, 3, 2), (8, 2, 1)], 1
    ):
        for u in range(1, units + 1):
            s = stride if u == units else 1
            unit = f"resnet_v1_small/block{b}/unit_{u}/bottleneck_v1"
            if x.shape[-1] == 4 * base:
                shortcut = x[:, ::s, ::s]
            else:
                shortcut = _np_conv_bn(t, f"{unit}/shortcut", x, s, (0, 0), relu=False)
            r = _np_conv_bn(t, f"{unit}/conv1", x)
            r = _np_conv2d_same(t, f"{unit}/conv2", r, 3, s)
            r = _np_conv_bn(t, f"{unit}/conv3", r, relu=False)
            x = np.maximum(shortcut + r, 0)
    pooled = x.mean(axis=(1, 2))
    weights = t["resnet_v1_small/logits/weights"][0, 0]
    return pooled @ weights + t["resnet_v1_small/logits/biases"]


# --- The real tf-slim nets, where they import -------------------------------


def _real_slim():
    """tf-slim's nets (tf-keras aliased for the BN nets, as in the notes)."""
    slim = pytest.importorskip("tf_slim")
    try:
        for mod in (
            "tf_keras.src.legacy_tf_layers",
            "tf_keras.src.legacy_tf_layers.normalization",
        ):
            sys.modules[mod.replace(".src", "", 1)] = importlib.import_module(mod)
        bn_nets = True
    except ImportError:
        bn_nets = False
    from tf_slim.nets import alexnet, inception_v1, resnet_v1

    return (
        slim,
        {"alexnet": alexnet, "inception_v1": inception_v1, "resnet_v1": resnet_v1},
        bn_nets,
    )


def _real_slim_logits(name, num_classes, prefix, rng):
    """Builds the real slim net, sets every variable at random, saves, returns logits."""
    slim, nets, bn_nets = _real_slim()
    if name != "alexnet_v2" and not bn_nets:
        pytest.skip("tf-slim's BN nets need tf-keras (pip install --no-deps tf-keras)")
    size = REAL_SLIM_SIZE[name]
    images = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    module, net, arg_scope = {
        "alexnet_v2": ("alexnet", "alexnet_v2", "alexnet_v2_arg_scope"),
        "inception_v1": ("inception_v1", "inception_v1", "inception_v1_arg_scope"),
        "resnet_v1_50": ("resnet_v1", "resnet_v1_50", "resnet_arg_scope"),
    }[name]
    with tf.Graph().as_default():
        with slim.arg_scope(getattr(nets[module], arg_scope)()):
            logits, _ = getattr(nets[module], net)(
                tf.constant(images), num_classes=num_classes, is_training=False
            )
        if logits.shape.rank == 4:  # resnet_v1 keeps the spatial dimensions.
            logits = tf.squeeze(logits, [1, 2])
        variables = tf.compat.v1.global_variables()
        with tf.compat.v1.Session() as session:
            for v in variables:
                shape = v.shape.as_list()
                v.load(random_value(v.op.name, shape, rng), session)
            tf.compat.v1.train.Saver(variables).save(session, prefix)
            return images, session.run(logits), [v.op.name for v in variables]


@pytest.mark.parametrize(
    "name,num_classes",
    [("alexnet_v2", 10), ("inception_v1", 1001), ("resnet_v1_50", 1000)],
)
def test_real_slim_checkpoint_and_logits(name, num_classes, tmp_path):
    """A checkpoint of tf-slim's own net loads whole; the logits agree to 1e-5."""
    prefix = str(tmp_path / "model.ckpt")
    images, expected, slim_names = _real_slim_logits(
        name, num_classes, prefix, np.random.default_rng(6)
    )
    assert sorted(slim_names) == sorted(SLIM_NAMES[name])
    model = tfloop.models.get(name, num_classes=num_classes, image_size=len(images[0]))
    result = tfloop.models.load_slim_checkpoint(model, prefix)
    assert len(result.loaded) == len(slim_names) and not result.unused
    logits = model(images, training=False).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
