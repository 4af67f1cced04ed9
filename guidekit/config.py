"""Config dataclasses that round-trip through ``config.json``: ``to_dict`` gives plain JSON
values and ``from_dict`` rebuilds the config.

A ``config.json`` is untrusted data, so ``from_dict`` checks every value against the field's
type hint (``int``, ``float``, ``bool``, ``str``, ``tuple[T, ...]``, ``T | None`` and nested
configs) and names the first key it does not know or whose value has the wrong type, in one
line; ranges are each config's own ``__post_init__`` checks.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, fields
from typing import Any, TypeVar

from guidekit.errors import GuidekitError

__all__ = [
    "ConfigMixin",
    "check_value",
    "config_field",
]


_C = TypeVar("_C", bound="ConfigMixin")
_MAX_ITEMS = 1 << 20  # a tuple field longer than this is not a config (β lists: one per step)


class ConfigMixin:
    """``to_dict``/``from_dict`` for a ``@dataclass`` config."""

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], d: Any) -> _C:
        """Inverse of :meth:`to_dict`: an unknown key, a value of the wrong type or a
        missing required key is a one-line error naming it."""
        name = cls.__name__
        if not isinstance(d, dict):
            raise GuidekitError(f"{name} must be a JSON object, got {_kind(d)}")
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(map(str, set(d) - set(known)))
        if unknown:
            raise GuidekitError(f"unknown {name} key(s) {', '.join(map(repr, unknown))}; "
                                f"known keys: {', '.join(sorted(known))}")
        try:
            hints = typing.get_type_hints(cls)
        except NameError:  # a hint only importable under TYPE_CHECKING: its checks only
            hints = {}
        values = {k: check_value(v, hints.get(k), f"{name}.{k}") for k, v in d.items()}
        try:
            return cls(**values)
        except TypeError as exc:  # a required field left out
            raise GuidekitError(f"{name}: {exc}") from None


def check_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` (lists become tuples, nested configs are
    built); a mismatch is a one-line :class:`GuidekitError` naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        errors = []
        for option in inner:
            try:
                return check_value(value, option, where)
            except GuidekitError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise GuidekitError(f"{where} must be a list, got {_kind(value)}")
        if len(value) > _MAX_ITEMS:
            raise GuidekitError(f"{where} has {len(value)} entries, more than {_MAX_ITEMS}")
        return tuple(check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(hint, type) and issubclass(hint, ConfigMixin):
        return value if isinstance(value, hint) else hint.from_dict(value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:  # abs() first: math.isfinite overflows on a 400-digit JSON integer
        ok = isinstance(value, int | float) and not isinstance(value, bool) and abs(
            value) < 1e300 and math.isfinite(value)
    elif hint is str:
        ok = isinstance(value, str)
    else:
        return value  # a type this checker does not cover: the config's own checks apply
    if not ok:
        what = "a finite number" if hint is float else hint.__name__
        raise GuidekitError(f"{where} must be {what}, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    """A short description of a JSON value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool | int | float):
        text = repr(value)
        return text if len(text) <= 40 else f"a number of {len(text)} digits"
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    return {"list": "a list", "dict": "an object", "tuple": "a list"}.get(
        type(value).__name__, type(value).__name__)


def config_field(d: dict[str, Any], key: str, types: tuple[type, ...], where: str,
                 default: Any = ..., low: float | None = None, high: float | None = None
                 ) -> Any:
    """``d[key]`` (``default`` when absent; an error when there is none) checked to be of
    ``types`` (``type(None)`` admits null) and, for numbers, finite and within [low, high]:
    a read config file is data, so anything else is a one-line error."""
    if key not in d:
        if default is ...:
            raise GuidekitError(f"{where} has no '{key}'")
        return default
    v = d[key]
    if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise GuidekitError(f"{where}: '{key}' must be {names}, got {v!r:.60}")
    if (low is not None or high is not None) and isinstance(v, (int, float)) and (
            not isinstance(v, bool)):
        inside = abs(v) < 1e300 and math.isfinite(v) and (low is None or v >= low) and (
            high is None or v <= high)
        if not inside:
            raise GuidekitError(f"{where}: '{key}' must lie in [{low}, {high}], got "
                                f"{str(v)[:60]}")
    return v
