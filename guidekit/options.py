"""Options that plugins declare for their guidances, weightings and trainers.

An :class:`Option` is a typed declaration: guidekit turns it into a command-line flag
(``Option("latent_index", int)`` is ``--latent-index``) and fills its default for Python
callers, so a plugin writes each default once. Values are keyed by the option's own name.
Nothing here depends on a CLI library: the CLI modules build their parameters from these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from numbers import Integral
from pathlib import Path
from typing import Any

from guidekit.errors import GuidekitError

__all__ = [
    "MAX_SEED",
    "Option",
    "check_seed",
    "describe_options",
    "parse_option_args",
    "resolve_options",
]

TYPES: tuple[type, ...] = (str, int, float, bool, Path)
_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
_TYPE_NAMES = {str: "TEXT", int: "INTEGER", float: "FLOAT", bool: "", Path: "PATH"}
# Seeds are 0 <= seed < 2**63: torch overflows at 2**64 and reads -1 as 2**64 - 1, numpy
# refuses negatives; this range means the same seed to every RNG and fits a signed int64.
MAX_SEED = 2**63


def check_seed(seed: object, flag: str = "--seed") -> int:
    """``seed`` as an int when 0 <= seed < 2**63, else a one-line error naming ``flag``."""
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < MAX_SEED:
        raise GuidekitError(f"{flag} must be an integer from 0 to 2**63 - 1, got {seed!r}: "
                            "pick a smaller non-negative seed")
    return int(seed)


@dataclass(frozen=True)
class Option:
    """One option of a guidance, weighting or trainer.

    Args:
        name: the key of its value and, with ``_`` as ``-``, its flag (``p2_gamma`` is
            ``--p2-gamma``); lower case letters, digits and underscores.
        type: ``str``, ``int``, ``float``, ``bool`` (a ``--name/--no-name`` flag) or ``Path``.
        default: the value when the option is not given; ``None`` means "not given" (read
            it as absent), unless ``required``.
        help: one line for ``--help``.
        multiple: repeatable; the value is a tuple (default ``()``).
        choices: the allowed values of a ``str`` option.
        required: there is no default: the caller must give it.
    """

    name: str
    type: type = str
    default: Any = None
    help: str = ""
    multiple: bool = False
    choices: tuple[str, ...] = ()
    required: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise TypeError(f"option name {self.name!r} must be lower case letters, digits "
                            "and underscores, starting with a letter")
        if self.type not in TYPES:
            raise TypeError(f"option '{self.name}': type must be one of "
                            f"{', '.join(t.__name__ for t in TYPES)}, got {self.type!r}")
        if not isinstance(self.help, str):
            raise TypeError(f"option '{self.name}': help must be a string")
        if self.choices and (self.type is not str or not all(
                isinstance(c, str) for c in self.choices)):
            raise TypeError(f"option '{self.name}': choices are for str options, as strings")
        if self.type is bool and self.multiple:
            raise TypeError(f"option '{self.name}': a flag cannot be repeated")
        if self.type is bool and self.default is None:
            object.__setattr__(self, "default", False)
        if self.multiple and self.default is None:
            object.__setattr__(self, "default", ())
        if self.multiple:
            object.__setattr__(self, "default", tuple(self.default))
        if self.default is not None and not self.required:
            values = self.default if self.multiple else (self.default,)
            for v in values:
                _coerce(self, v, "default")

    @property
    def flag(self) -> str:
        """The command-line spelling, ``--name-with-dashes``."""
        return "--" + self.name.replace("_", "-")

    @property
    def is_flag(self) -> bool:
        return self.type is bool

    def with_default(self, default: Any) -> Option:
        """The same option with another default (a trainer's own step count, say)."""
        return replace(self, default=default)


def _coerce(opt: Option, value: Any, what: str = "value") -> Any:
    """One value converted to the option's type, or a one-line error."""
    t = opt.type
    ok: bool
    if t is bool:
        ok = isinstance(value, bool)
    elif t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif t is Path:
        ok = isinstance(value, (str, Path))
        value = Path(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise GuidekitError(f"{opt.flag} takes {t.__name__}, got {what} {value!r}")
    if t is float and math.isnan(value):  # never a setting; inf may be (no bound, no clip)
        raise GuidekitError(f"{opt.flag} is NaN: give a number")
    if opt.choices and value not in opt.choices:
        raise GuidekitError(f"{opt.flag} must be one of {', '.join(opt.choices)}, "
                            f"got {value!r}")
    return value


def resolve_options(
    options: Sequence[Option], given: Mapping[str, Any] | None, what: str
) -> dict[str, Any]:
    """Every option's value: the ones in ``given`` (checked and converted), the rest their
    defaults. ``what`` names the owner in errors, e.g. ``"guidance 'classifier'"``.

    An unknown key, a value of the wrong type, a choice not offered or a missing required
    option is a one-line :class:`~guidekit.errors.GuidekitError`.
    """
    given = dict(given or {})
    by_name = {o.name: o for o in options}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        known = ", ".join(sorted(by_name)) or "none"
        raise GuidekitError(f"{what} has no option {', '.join(map(repr, unknown))} "
                            f"(its options: {known})")
    values: dict[str, Any] = {}
    for opt in options:
        if opt.name not in given or (given[opt.name] is None and not opt.multiple):
            if opt.required:
                raise GuidekitError(f"{what} needs {opt.flag}")
            values[opt.name] = opt.default
            continue
        value = given[opt.name]
        if opt.multiple:
            items = value if isinstance(value, (list, tuple)) else (value,)
            values[opt.name] = tuple(_coerce(opt, v) for v in items)
        else:
            values[opt.name] = _coerce(opt, value)
    return values


def _parse_text(opt: Option, text: str) -> Any:
    try:
        if opt.type is int:
            return int(text)
        if opt.type is float:
            return float(text)
    except ValueError:
        raise GuidekitError(f"invalid value for {opt.flag}: '{text}' is not "
                            f"{'an integer' if opt.type is int else 'a number'}") from None
    return Path(text) if opt.type is Path else text


def parse_option_args(
    owners: Sequence[tuple[str, Sequence[Option]]], args: Sequence[str]
) -> list[dict[str, Any]]:
    """Parse command-line ``args`` (``--name VALUE``, ``--name=VALUE``, ``--flag``,
    ``--no-flag``) against the options of each owner; returns one dict of values per owner,
    holding only the options given (pass it through :func:`resolve_options` for the rest).

    ``owners`` is a list of (what, options), e.g. ``("guidance 'classifier'", spec.options)``;
    an option declared by two owners is shared by them.
    """
    flags: dict[str, Option] = {}
    for _, options in owners:
        for opt in options:
            flags.setdefault(opt.flag, opt)
            if opt.is_flag:
                flags.setdefault("--no-" + opt.flag[2:], opt)
    known = ", ".join(sorted(o.flag for o in set(flags.values()))) or "none"
    found: dict[str, Any] = {}
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        key, eq, inline = arg.partition("=")
        opt = flags.get(key)
        if not arg.startswith("--") or opt is None:
            what = "No such option" if arg.startswith("-") else "Unexpected argument"
            raise GuidekitError(f"{what}: {key} (plugin options here: {known})")
        if opt.is_flag:
            if eq:
                raise GuidekitError(f"{opt.flag} is a flag and takes no value")
            found[opt.name] = not key.startswith("--no-")
            continue
        if not eq:
            if not rest:
                raise GuidekitError(f"{opt.flag} needs a value")
            inline = rest.pop(0)
        value = _parse_text(opt, inline)
        if opt.multiple:
            found[opt.name] = (*found.get(opt.name, ()), value)
        else:
            found[opt.name] = value
    return [{o.name: found[o.name] for o in options if o.name in found}
            for _, options in owners]


def describe_options(options: Iterable[Option]) -> str:
    """``--name TYPE: help (default D)`` lines, for help texts."""
    lines = []
    for opt in options:
        flag = f"{opt.flag}/--no-{opt.flag[2:]}" if opt.is_flag else (
            f"{opt.flag} {_TYPE_NAMES[opt.type]}")
        extra = []
        if opt.choices:
            extra.append("one of " + ", ".join(opt.choices))
        if opt.required:
            extra.append("required")
        elif opt.default not in (None, (), "") and not opt.is_flag:
            extra.append(f"default {opt.default}")
        if opt.multiple:
            extra.append("repeatable")
        lines.append(f"{flag}: {opt.help.rstrip('.')}" + (f" ({'; '.join(extra)})"
                                                          if extra else ""))
    return "\n".join(lines)
