"""Slim checkpoints for tests, written without tf-slim.

Slim's variable names are listed here from slim's sources
(`research/slim/nets/{alexnet,inception_v1,resnet_v1}.py`), independently of
`tfloop.models.slim_checkpoint`; checkpoints are TF1 graph variables under
those names saved with `tf.compat.v1.train.Saver`, as slim saved them.
"""

import numpy as np
import tensorflow as tf

_BN = ("BatchNorm/beta", "BatchNorm/moving_mean", "BatchNorm/moving_variance")
_BN_SCALE = ("BatchNorm/gamma", *_BN)


def _conv_names(scope, bn):
    if not bn:
        return [f"{scope}/weights", f"{scope}/biases"]
    return [f"{scope}/weights", *(f"{scope}/{v}" for v in bn)]


def _alexnet_v2():
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    return [n for layer in layers for n in _conv_names(f"alexnet_v2/{layer}", None)]


def _inception_v1():
    """`inception_v1_base` + logits, with slim's irregular Mixed_5b branch 2."""
    names = []
    for conv in ("Conv2d_1a_7x7", "Conv2d_2b_1x1", "Conv2d_2c_3x3"):
        names += _conv_names(f"InceptionV1/{conv}", _BN)
    mixed = ["3b", "3c", "4b", "4c", "4d", "4e", "4f", "5b", "5c"]
    for m in mixed:
        branch_2_3x3 = "Conv2d_0a_3x3" if m == "5b" else "Conv2d_0b_3x3"
        for conv in (
            "Branch_0/Conv2d_0a_1x1",
            "Branch_1/Conv2d_0a_1x1",
            "Branch_1/Conv2d_0b_3x3",
            "Branch_2/Conv2d_0a_1x1",
            f"Branch_2/{branch_2_3x3}",
            "Branch_3/Conv2d_0b_1x1",
        ):
            names += _conv_names(f"InceptionV1/Mixed_{m}/{conv}", _BN)
    return names + _conv_names("InceptionV1/Logits/Conv2d_0c_1x1", None)


def _resnet_v1(scope, units):
    """`resnet_v1` with bottleneck units; unit 1 of each block has a shortcut conv."""
    names = _conv_names(f"{scope}/conv1", _BN_SCALE)
    for b, n in enumerate(units, start=1):
        for u in range(1, n + 1):
            unit = f"{scope}/block{b}/unit_{u}/bottleneck_v1"
            convs = (["shortcut"] if u == 1 else []) + ["conv1", "conv2", "conv3"]
            for conv in convs:
                names += _conv_names(f"{unit}/{conv}", _BN_SCALE)
    return names + _conv_names(f"{scope}/logits", None)


SLIM_NAMES = {
    "alexnet_v2": _alexnet_v2(),
    "inception_v1": _inception_v1(),
    "resnet_v1_50": _resnet_v1("resnet_v1_50", [3, 4, 6, 3]),
    "resnet_v1_small": _resnet_v1("resnet_v1_small", [3, 3, 3, 2]),
}
LOGITS_SCOPE = {
    "alexnet_v2": "alexnet_v2/fc8",
    "inception_v1": "InceptionV1/Logits",
    "resnet_v1_50": "resnet_v1_50/logits",
    "resnet_v1_small": "resnet_v1_small/logits",
}


def tfloop_path(slim_name):
    """The issue's rule, slim name -> tfloop weight path."""
    name = slim_name.replace(
        "Mixed_5b/Branch_2/Conv2d_0a_3x3", "Mixed_5b/Branch_2/Conv2d_0b_3x3"
    )
    parts = [p for p in name.split("/")[1:] if p != "bottleneck_v1"]
    variable = {"weights": "kernel", "biases": "bias"}.get(parts[-1], parts[-1])
    return "_".join(parts[:-1]) + "/" + variable


def random_value(name, shape, rng):
    """Values of a trained net's scale; BN variances positive."""
    if name.endswith(("moving_variance", "gamma")):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name.endswith("weights"):
        fan_in = int(np.prod(shape[:-1]))
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def write_slim_checkpoint(prefix, tensors):
    """Saves `tensors` {slim name: array} as slim did: TF1 variables, Saver."""
    with tf.Graph().as_default():
        variables = {
            name: tf.compat.v1.Variable(tf.zeros(v.shape, v.dtype))
            for name, v in tensors.items()
        }
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session() as session:
            for name, variable in variables.items():
                variable.load(tensors[name], session)  # Fed: no giant constants.
            return saver.save(session, str(prefix))


def slim_tensors(name, model, rng, *, num_classes=None):
    """Random values for every slim variable of `name`, shaped as `model`'s."""
    shapes = {v.path: tuple(v.shape) for v in model.weights}
    tensors = {}
    for slim_name in SLIM_NAMES[name]:
        shape = shapes[tfloop_path(slim_name)]
        if num_classes and slim_name.startswith(LOGITS_SCOPE[name]):
            shape = shape[:-1] + (num_classes,)
        tensors[slim_name] = random_value(slim_name, shape, rng)
    return tensors
