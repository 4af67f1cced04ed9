"""Plugin-declared CLI options: parse the extra arguments of a command against the options
that the chosen guidances or weighting declare (``spec.options``, a list of click.Option)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from guidekit.errors import GuidekitError


def parse_plugin_options(
    owners: Sequence[tuple[str, Sequence[click.Option]]], args: Sequence[str]
) -> list[dict[str, Any]]:
    """Parse ``args`` against every owner's options; returns one dict of values per owner.

    ``owners`` is a list of (what, options), e.g. ("guidance 'classifier'", spec.options).
    Unknown options and bad values raise a one-line :class:`GuidekitError`.
    """
    params: list[click.Parameter] = []
    seen: dict[str, str] = {}
    for what, options in owners:
        for opt in options:
            if opt.name in seen:
                if seen[opt.name] != what:
                    raise GuidekitError(
                        f"option --{opt.name} is declared by both {seen[opt.name]} and {what}"
                    )
                continue
            seen[opt.name] = what
            params.append(opt)
    command = click.Command("guidekit", params=params, add_help_option=False)
    try:
        ctx = command.make_context("guidekit", list(args), resilient_parsing=False)
    except click.UsageError as exc:
        known = ", ".join(f"--{n.replace('_', '-')}" for n in seen) or "none"
        raise GuidekitError(f"{exc.format_message()} (plugin options here: {known})") from None
    if ctx.args:
        raise GuidekitError(f"unexpected argument(s): {' '.join(ctx.args)}")
    return [
        {opt.name: ctx.params[opt.name] for opt in options if opt.name in ctx.params}
        for _, options in owners
    ]


def describe_options(options: Sequence[click.Option]) -> str:
    """``--name TYPE: help (default D)`` lines for a help epilog."""
    lines = []
    for opt in options:
        flag = "/".join(opt.opts) + ("" if opt.is_flag else f" {opt.type.name.upper()}")
        default = opt.default
        shown = default is not None and not opt.is_flag and default not in ((), [], "")
        shown = shown and "UNSET" not in str(default)  # click's sentinel for "no default"
        lines.append(f"{flag}: {(opt.help or '').rstrip('.')}"
                     + (f" (default {default})" if shown else ""))
    return "\n".join(lines)
