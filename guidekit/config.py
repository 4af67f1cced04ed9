"""Config dataclasses that round-trip through ``config.json``: ``to_dict`` gives plain JSON
values and ``from_dict`` rebuilds the config, naming any key it does not know (a checkpoint
from another version, or a typo in a hand-written config)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, TypeVar

from guidekit.errors import GuidekitError

__all__ = [
    "ConfigMixin",
]


_C = TypeVar("_C", bound="ConfigMixin")


class ConfigMixin:
    """``to_dict``/``from_dict`` for a ``@dataclass`` config."""

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], d: dict[str, Any]) -> _C:
        """Inverse of :meth:`to_dict`; an unknown key is a one-line error."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise GuidekitError(f"unknown {cls.__name__} key(s) {', '.join(map(repr, unknown))}; "
                                f"known keys: {', '.join(sorted(known))}")
        return cls(**d)
