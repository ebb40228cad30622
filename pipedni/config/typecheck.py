"""Checking YAML / command-line values against the config dataclasses' type hints."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if tp is dict or origin is dict:
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise TypeError; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg)
            except TypeError:
                pass
        raise TypeError
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        (item,) = typing.get_args(tp)
        return [coerce(v, item) for v in value]
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise TypeError from None
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # --run.name=2024 arrives as an int
    if tp in (int, float, str, bool) and type(value) is tp:
        return value
    raise TypeError
