"""The one ``k=v,...`` option parser: CLI strings and Python dicts into frozen option dataclasses.

    "w8a8:method=entropy,exclude=A;B"   head ":" then items      (--quantize)
    "2:4,exclude=lm_head"               head "," then items      (--prune)
    "keep=0.2,grid=8x32x32"             items only               (--sparse-attention)

Values are converted by the dataclass field's type: ``int``, ``float``, ``bool``, ``str``,
``tuple[int, ...]`` written ``AxBxC``, ``tuple[str, ...]`` written ``a;b``. A dict given from Python
goes through the same checks: an unknown key is refused, never ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any

from edgec.errors import UserError

__all__ = ["split_spec", "convert_items", "parse_options"]


def split_spec(text: str, what: str, head: str | None = None) -> tuple[str | None, dict[str, str]]:
    """``"[HEAD<head>]k=v,k=v"`` → (HEAD or None, {k: v}); ``head`` is ``":"``, ``","`` or None."""
    text = str(text).strip()
    first = None
    if head == ":":
        first, _, text = text.partition(":")
    elif head == ",":
        first, _, text = text.partition(",")
    items: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise UserError(f"{what} option {part!r} is not key=value")
        if key.strip() in items:
            raise UserError(f"{what} option {key.strip()!r} is given twice; give it once")
        items[key.strip()] = value.strip()
    return (first.strip() if first is not None else None), items


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _convert(tp: Any, raw: str) -> Any:
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        item = args[0] if args else str
        sep = "x" if item is int else ";"
        parts = [p.strip() for p in raw.lower().split(sep)] if item is int else [
            p.strip() for p in raw.split(sep)]
        values = tuple(item(p) for p in parts if p)
        fixed = [a for a in args if a is not Ellipsis]
        if len(args) > 1 and args[-1] is not Ellipsis and len(values) != len(fixed):
            raise ValueError(f"expected {len(fixed)} values")
        return values
    if tp is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if tp in (int, float, str):
        return tp(raw)
    return raw


def _expected(cls: type, key: str) -> str:
    field = next(f for f in dataclasses.fields(cls) if f.name == key)
    if "format" in field.metadata:
        return field.metadata["format"]
    tp = _strip_optional(_field_types(cls)[key])
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return "AxBxC" if args and args[0] is int else "A;B"
    return getattr(tp, "__name__", str(tp))


def convert_items(cls: type, items: Mapping[str, Any], what: str,
                  head: tuple[str, ...] = ()) -> dict[str, Any]:
    """``items`` checked against ``cls``'s fields; strings converted by the field's type.

    ``head``: the fields the caller sets itself (``--quantize``'s scheme, ``--rotate``'s
    method, given before ":"), refused as keys. Non-string values (from Python) are kept as
    given, lists become tuples; the dataclass's own ``__post_init__`` validates ranges and
    combinations.
    """
    types_ = {k: v for k, v in _field_types(cls).items() if k not in head}
    out: dict[str, Any] = {}
    for key, raw in items.items():
        if key in head:  # cls(scheme=..., **{"scheme": ...}) was a TypeError (exit 1)
            raise UserError(f"{what} option {key!r} is not a key=value option; give the {key} "
                            "before ':' only")
        if key not in types_:
            raise UserError(f"unknown {what} option {key!r}; known: {', '.join(types_)}")
        if isinstance(raw, str):
            try:
                out[key] = _convert(types_[key], raw)
            except ValueError:
                raise UserError(f"{what} option {key}={raw!r} is not valid (expected "
                                f"{_expected(cls, key)})") from None
        else:
            out[key] = tuple(raw) if isinstance(raw, list) else raw
    return out


def parse_options(cls: type, spec: str | Mapping[str, Any] | None, what: str, **fixed: Any):
    """``cls`` from ``"k=v,..."`` or a dict of the same keys (``fixed`` are set by the caller)."""
    if isinstance(spec, cls):
        return spec
    if spec is None:
        items: Mapping[str, Any] = {}
    elif isinstance(spec, Mapping):
        items = spec
    else:
        items = split_spec(spec, what)[1]
    try:
        return cls(**fixed, **convert_items(cls, items, what, tuple(fixed)))
    except TypeError as e:  # a required field missing
        raise UserError(f"{what}: {e}") from None
