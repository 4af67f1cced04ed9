"""mkdocs hooks: fill the reference pages from the code at build time.

A page asks for generated content with a marker line; the marker is replaced by the
Markdown that :mod:`_reference` generates, so prose stays in the page and the reference
cannot drift from the code. A public name without a docstring is a warning, which
``mkdocs build --strict`` turns into a failed build.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable
from typing import Any

from _reference import api, cli, hooks

log = logging.getLogger("mkdocs.hooks.guidekit")

API_PAGE = "python.md"
HOOKS_PAGE = "hooks.md"


def _relative(target: str, page: Any) -> str:
    """``target`` (a path under docs/) as a link from ``page``."""
    return posixpath.relpath(target, posixpath.dirname(page.file.src_uri) or ".")


def _api(page: Any) -> str:
    missing = api.undocumented()
    if missing:
        log.warning("public names without a docstring: %s", ", ".join(missing))
    return api.api_markdown(api.page_links(_relative(HOOKS_PAGE, page)))


def _hooks(page: Any) -> str:
    return hooks.builtin_hooks_markdown(list(api.public(api.CORE)),
                                        api_page=_relative(API_PAGE, page))


GENERATORS: dict[str, Callable[[Any], str]] = {
    "<!-- generated: api -->": _api,
    "<!-- generated: cli -->": lambda page: cli.builtin_cli_markdown(),
    "<!-- generated: hooks -->": _hooks,
}


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    for marker, generate in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate(page))
    return markdown
