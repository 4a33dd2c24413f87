"""Reads TF-slim checkpoints into `tfloop.models`, moving statistics included.

Why this module exists: the people tfloop is for fine-tune slim's published
ImageNet checkpoints (`inception_v1_2016_08_28`, `resnet_v1_50_2016_08_28`,
...). Those are TF1 name-based checkpoints whose keys are slim's variable
names; tfloop's nets hold the same variables under Keras names. This module
maps one to the other with slim's naming rule and reads the tensors with
`tf.train.load_checkpoint` (no TF1 graph, no tf-slim).

Slim name -> tfloop weight path: drop the network scope (`InceptionV1/`,
`resnet_v1_50/`, `alexnet_v2/`) and ResNet's `bottleneck_v1/`, join the layer
scopes with `_` (`BatchNorm` becomes the layer `<conv>_BatchNorm`), and rename
`weights`/`biases` to `kernel`/`bias`. Slim's one irregular name,
`InceptionV1/Mixed_5b/Branch_2/Conv2d_0a_3x3`, is `..._Conv2d_0b_3x3` here.
The code goes the other way (tfloop path -> slim name), since every model
variable needs its slim name, and exclusion scopes are slim's.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "SlimCheckpointLoad",
    "load_slim_checkpoint",
    "set_trainable_scopes",
    "slim_name",
    "slim_scope",
]

# tfloop model name -> the variable scope of slim's network.
_SCOPES = {
    "alexnet_v2": "alexnet_v2",
    "inception_v1": "InceptionV1",
    "resnet_v1_50": "resnet_v1_50",
    "resnet_v1_small": "resnet_v1_small",
}
# One slim scope component; underscores inside a component (`Conv2d_0a_1x1`,
# `Mixed_3b`, `Branch_0`, `unit_1`) are why the join with `_` needs a grammar.
_COMPONENT = re.compile(
    r"Conv2d_\d+[a-z]_\d+x\d+|Mixed_\d+[a-z]|Branch_\d+|unit_\d+|[A-Za-z0-9]+"
)
_VARIABLE_NAMES = {"kernel": "weights", "bias": "biases"}
_IRREGULAR = {
    "InceptionV1/Mixed_5b/Branch_2/Conv2d_0b_3x3": (
        "InceptionV1/Mixed_5b/Branch_2/Conv2d_0a_3x3"
    ),
}


@dataclasses.dataclass(frozen=True)
class SlimCheckpointLoad:
    """What `load_slim_checkpoint` did, by slim variable name.

    Attributes:
      loaded: model variables set from the checkpoint.
      skipped: model variables left as they were (excluded, or missing or of
        another shape with `ignore_missing=True`).
      unused: checkpoint tensors no model variable took (`global_step`,
        optimizer slots, moving averages, excluded ones).
    """

    loaded: tuple[str, ...]
    skipped: tuple[str, ...]
    unused: tuple[str, ...]


def slim_scope(model: keras.Model) -> str:
    """The variable scope of slim's version of `model` (e.g. `InceptionV1`)."""
    scope = _SCOPES.get(model.name)
    if scope is None:
        raise ValueError(
            f"`model` {model.name!r} is not one of tfloop.models "
            f"({', '.join(_SCOPES)}); slim checkpoints load into those only."
        )
    return scope


def slim_name(scope: str, path: str) -> str:
    """Slim's name of the tfloop variable `path` (e.g. `conv1_BatchNorm/beta`)."""
    layer, _, variable = path.rpartition("/")
    components, pos = [], 0
    while pos < len(layer):
        match = _COMPONENT.match(layer, pos)
        if match is None or layer[match.end() : match.end() + 1] not in ("", "_"):
            raise ValueError(f"Layer `{layer}` has no slim name (variable `{path}`).")
        components.append(match.group())
        if components[-1].startswith("unit_"):
            components.append("bottleneck_v1")
        pos = match.end() + 1
    name = "/".join([scope, *components])
    for tfloop_scope, irregular in _IRREGULAR.items():
        if name == tfloop_scope or name.startswith(f"{tfloop_scope}/"):
            name = irregular + name[len(tfloop_scope) :]
    return f"{name}/{_VARIABLE_NAMES.get(variable, variable)}"


def _checkpoint_prefix(checkpoint_path: str) -> str:
    """A checkpoint file prefix, or the latest checkpoint of a directory."""
    if tf.io.gfile.isdir(checkpoint_path):
        latest = tf.train.latest_checkpoint(checkpoint_path)
        if latest is None:
            raise ValueError(
                f"`checkpoint_path` {checkpoint_path!r} is a directory without a "
                "checkpoint (no `checkpoint` index file)."
            )
        return latest
    if not tf.io.gfile.exists(f"{checkpoint_path}.index"):
        raise ValueError(
            f"`checkpoint_path` {checkpoint_path!r} is neither a checkpoint "
            "prefix (no .index file) nor a directory."
        )
    return checkpoint_path


def _in_scopes(name: str, scopes: Iterable[str]) -> bool:
    return any(name == s or name.startswith(f"{s}/") for s in scopes)


def _top_scope(name: str) -> str:
    """The scope to exclude for `name`: the network scope and one more level."""
    return "/".join(name.split("/")[:2])


def _clean_scopes(
    scopes: Iterable[str], names: Iterable[str], *, argument: str
) -> tuple[str, ...]:
    """Stripped scopes; each must name at least one of `names` (typos refused)."""
    if isinstance(scopes, str):
        raise TypeError(
            f"`{argument}` must be a list of scopes, got the string {scopes!r}."
        )
    cleaned = tuple(s.strip().rstrip("/") for s in scopes if s.strip())
    names = list(names)
    for scope in cleaned:
        if not any(_in_scopes(n, [scope]) for n in names):
            tops = sorted({_top_scope(n) for n in names})
            raise ValueError(
                f"`{argument}` entry {scope!r} names no variable of the model; "
                f"its scopes are {', '.join(tops)}."
            )
    return cleaned


def set_trainable_scopes(
    model: keras.Model, trainable_scopes: Iterable[str]
) -> tuple[str, ...]:
    """Trains only the layers inside slim scopes; freezes every other layer.

    Slim's `--trainable_scopes`. A layer outside them becomes
    `trainable=False`: its weights stop training and, for batch norm, its
    moving statistics stay as they are (tfloop's step and
    `tfloop.bn.recalibrate` leave non-trainable BN layers alone, and Keras
    normalizes them with those statistics). No scopes: nothing changes.

    Returns:
      The slim names of the variables that remain trainable.

    Raises:
      ValueError: a scope that names no variable, or one that takes only part
        of a layer's trainable variables (a layer trains as a whole).
    """
    scope = slim_scope(model)
    names = {id(v): slim_name(scope, v.path) for v in model.weights}
    scopes = _clean_scopes(
        trainable_scopes, names.values(), argument="trainable_scopes"
    )
    if not scopes:
        return tuple(names[id(v)] for v in model.trainable_weights)
    outside = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if layer._layers or not layer.trainable_weights:
            continue  # Only leaf layers own variables in tfloop's nets.
        inside = [_in_scopes(names[id(v)], scopes) for v in layer.trainable_weights]
        if any(inside) and not all(inside):
            raise ValueError(
                f"`trainable_scopes` takes only part of layer `{layer.name}` "
                f"({names[id(layer.trainable_weights[0])]}, ...); name a whole "
                "layer's scope."
            )
        if not any(inside):
            outside.append(layer)
    for layer in outside:  # Only once every layer passed: errors change nothing.
        layer.trainable = False
    return tuple(names[id(v)] for v in model.trainable_weights)


def load_slim_checkpoint(
    model: keras.Model,
    checkpoint_path: str,
    *,
    exclude_scopes: Iterable[str] = (),
    ignore_missing: bool = False,
) -> SlimCheckpointLoad:
    """Sets `model`'s variables from a TF1 slim checkpoint, moving statistics included.

    Every variable is checked before any is set: on an error the model is
    unchanged. Scopes match whole name components, so `resnet_v1_50/logits`
    excludes `resnet_v1_50/logits/weights` but not `resnet_v1_50/logits2`.

    Args:
      model: one of `tfloop.models` (matched by its name), built.
      checkpoint_path: a checkpoint prefix (`.../model.ckpt-1000`) or a
        directory (its latest checkpoint).
      exclude_scopes: slim scopes to leave untouched, e.g. `InceptionV1/Logits`,
        `resnet_v1_50/logits` or `alexnet_v2/fc8` to fine-tune on other
        classes (slim's `--checkpoint_exclude_scopes`). An entry that names no
        variable of the model is an error (a typo would load everything).
      ignore_missing: skip, instead of refusing, variables the checkpoint lacks
        or holds with another shape (e.g. the 1001-class logits of slim's
        ImageNet Inception checkpoints).

    Returns:
      A `SlimCheckpointLoad`: loaded, skipped and unused names.

    Raises:
      ValueError: one line naming the first offending variable, its shapes and
        the scope to exclude; or a bad path or scope.
    """
    scope = slim_scope(model)
    reader = tf.train.load_checkpoint(_checkpoint_prefix(checkpoint_path))
    shapes = reader.get_variable_to_shape_map()
    named = [(slim_name(scope, v.path), v) for v in model.weights]
    scopes = _clean_scopes(
        exclude_scopes, [n for n, _ in named], argument="exclude_scopes"
    )
    if not any(n in shapes for n, _ in named):
        example = sorted(shapes)[:1]
        raise ValueError(
            f"Checkpoint {checkpoint_path!r} holds none of the {len(named)} variables "
            f"of `{model.name}` (slim scope `{scope}`), e.g. it has {example}: a "
            "checkpoint of another network?"
        )
    loads, skipped, problems = [], [], []
    for name, variable in named:
        if _in_scopes(name, scopes):
            skipped.append(name)
            continue
        if name not in shapes:
            problem = f"has no `{name}`"
        elif tuple(shapes[name]) != tuple(variable.shape):
            problem = (
                f"holds `{name}` with shape {list(shapes[name])}, the model "
                f"{list(variable.shape)}"
            )
        else:
            loads.append((name, variable))
            continue
        if ignore_missing:
            skipped.append(name)
        else:
            problems.append((name, problem))
    if problems:
        name, problem = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(
            f"Checkpoint {checkpoint_path!r} {problem}{more}; exclude scope "
            f"`{_top_scope(name)}` (`exclude_scopes`, --checkpoint_exclude_scopes) "
            "or pass `ignore_missing=True`."
        )
    for name, variable in loads:
        value = reader.get_tensor(name)
        variable.assign(np.asarray(value, dtype=variable.dtype))
    used = {n for n, _ in loads}
    return SlimCheckpointLoad(
        loaded=tuple(n for n, _ in loads),
        skipped=tuple(skipped),
        unused=tuple(sorted(set(shapes) - used)),
    )
