"""Which variable a `gradient_multipliers` key names.

Why this module exists: optimize_loss keyed its multipliers by variable or
by TF1 name (`dense/kernel:0`) and silently skipped keys that named nothing,
so a typo trained that variable at the normal rate. Keras 3 variables have a
`path` and a `name`; here a key may be either (or a variable, or its
`ref()`), and must name exactly one trainable variable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _matches(key: Any, variables: Sequence[Any]) -> list[Any]:
    """The variables a `gradient_multipliers` key names."""
    if isinstance(key, str):
        name = key.removesuffix(":0")  # TF1 habit: "dense/kernel:0".
        by_path = [v for v in variables if v.path == name]
        return by_path or [v for v in variables if v.name == name]
    target = key.deref() if hasattr(key, "deref") else key
    return [v for v in variables if v is target or getattr(v, "value", None) is target]


def _describe(key: Any) -> str:
    """A short name for a multiplier key (a variable's repr prints its values)."""
    if isinstance(key, str):
        return key
    target = key.deref() if hasattr(key, "deref") else key
    return str(
        getattr(target, "path", None) or getattr(target, "name", type(key).__name__)
    )


def _resolve_multipliers(multipliers: Any, variables: Sequence[Any]) -> dict[int, Any]:
    """Maps `id(variable)` to its multiplier; every key must name exactly one variable.

    Unlike optimize_loss, which skipped unknown keys, a key that names no
    trainable variable raises: a typo would otherwise silently train that
    variable at the normal rate.
    """
    items = multipliers.items() if isinstance(multipliers, Mapping) else multipliers
    resolved: dict[int, Any] = {}
    for key, value in items:
        found = _matches(key, variables)
        if not found:
            raise ValueError(
                f"`gradient_multipliers` key {_describe(key)!r} names no trainable "
                "variable of the model."
            )
        if len(found) > 1:
            raise ValueError(
                f"`gradient_multipliers` key {key!r} names {len(found)} variables "
                f"({', '.join(v.path for v in found)}); use the variable path."
            )
        if id(found[0]) in resolved:
            raise ValueError(
                f"`gradient_multipliers` names `{found[0].path}` more than once."
            )
        resolved[id(found[0])] = value
    return resolved
