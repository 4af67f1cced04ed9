"""Reference pages generated from the code at docs build time: the CLI from the command tree
typer builds, the hooks from :mod:`guidekit.hookspecs`, the Python API from ``guidekit.__all__``.

The docs describe guidekit with its own plugins, whatever else is installed: generation
loads the core plus the entry points that the ``guidekit`` distribution itself declares.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from guidekit.plugins import Registry

_ENV = ("GUIDEKIT_PLUGINS", "GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD")


def own_plugins() -> list[str]:
    """The entry-point names that the guidekit distribution declares (its built-in plugins)."""
    from guidekit.plugins import ENTRY_POINT_GROUP

    return sorted(
        ep.name
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
        if ep.dist is not None and ep.dist.metadata["Name"] == "guidekit"
    )


@contextmanager
def builtin_plugins() -> Iterator[Registry]:
    """The registry of the core and guidekit's own plugins, restored to the process's own
    afterwards. A plugin that fails to load is an error: the docs would silently lack it."""
    from guidekit import plugins

    saved = {k: os.environ.get(k) for k in _ENV}
    os.environ["GUIDEKIT_PLUGINS"] = ",".join(own_plugins())
    os.environ.pop("GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD", None)
    plugins.reset()
    try:
        registry = plugins.get_registry()
        if registry.failures:
            name, why = registry.failures[0]
            raise RuntimeError(f"plugin '{name}' failed to load, so the docs would lack it: {why}")
        yield registry
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        plugins.reset()
