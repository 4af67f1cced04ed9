"""The plugin manager: loads the built-in core and every ``guidekit`` entry point, and collects
what they register into one :class:`Registry` with unique names.

Environment:
    GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD=1  load no entry points (the core still loads).
    GUIDEKIT_PLUGINS=a,b                load only these: entry-point names or module paths
                                        (works with autoload off too, like pytest's -p).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from guidekit import hookspecs
from guidekit.errors import PluginError
from guidekit.specs import (
    DatasetSpec,
    GuidanceSpec,
    ModelSpec,
    QuickstartStep,
    TrainerSpec,
    WeightingSpec,
)

ENTRY_POINT_GROUP = "guidekit"
CORE_NAME = "guidekit"
# hook name -> (kind as users call it, spec class)
KINDS: dict[str, tuple[str, type]] = {
    "guidekit_guidances": ("guidance", GuidanceSpec),
    "guidekit_weightings": ("weighting", WeightingSpec),
    "guidekit_trainers": ("trainer", TrainerSpec),
    "guidekit_models": ("model", ModelSpec),
    "guidekit_datasets": ("dataset", DatasetSpec),
    "guidekit_quickstart_steps": ("quickstart step", QuickstartStep),
}


@dataclass
class PluginInfo:
    name: str
    version: str
    module: str
    registers: dict[str, list[str]] = field(default_factory=dict)  # kind -> names


@dataclass
class Registry:
    """Everything registered, by kind then name, with the plugin that registered it."""

    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (plugin, one-line reason)

    def get(self, kind: str, name: str) -> Any:
        table = self.specs.get(kind, {})
        if name not in table:
            choices = ", ".join(sorted(table)) or "none"
            raise PluginError(
                f"unknown {kind} '{name}': choose one of {choices} "
                "(`guidekit plugins` lists what is installed)"
            )
        return table[name]

    def names(self, kind: str) -> list[str]:
        return sorted(self.specs.get(kind, {}))

    def guidance(self, name: str) -> GuidanceSpec:
        return self.get("guidance", name)

    def weighting(self, name: str) -> WeightingSpec:
        return self.get("weighting", name)

    def model(self, name: str) -> ModelSpec:
        return self.get("model", name)

    def dataset(self, name: str) -> DatasetSpec:
        return self.get("dataset", name)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def make_manager() -> tuple[pluggy.PluginManager, dict[str, tuple[str, str]], list]:
    """A fresh manager with the core and the allowed entry points registered.

    Returns (manager, {plugin name: (version, module)}, [(plugin, failure reason)]).
    """
    from guidekit import __version__, builtin

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name=CORE_NAME)
    meta = {CORE_NAME: (__version__, builtin.__name__)}
    failures: list[tuple[str, str]] = []

    wanted = [p.strip() for p in os.environ.get("GUIDEKIT_PLUGINS", "").split(",") if p.strip()]
    autoload = not _env_flag("GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD")
    eps = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if wanted:
        names = wanted
    elif autoload:
        names = sorted(eps)
    else:
        names = []
    for name in names:
        try:
            if name in eps:
                ep = eps[name]
                plugin = ep.load()
                version = ep.dist.version if ep.dist else "?"
                module = ep.value
            else:
                plugin = importlib.import_module(name)
                version = getattr(plugin, "__version__", "?")
                module = name
            if pm.is_registered(plugin):
                continue
            pm.register(plugin, name=name)
            meta[name] = (version, module)
        except Exception as exc:  # a broken third-party plugin must not take the CLI down
            failures.append((name, f"{type(exc).__name__}: {exc}".splitlines()[0]))
    return pm, meta, failures


def collect(pm: pluggy.PluginManager, meta: dict, failures: list) -> Registry:
    """Call every registering hook plugin by plugin, so each name knows its owner."""
    reg = Registry(specs={kind: {} for kind, _ in KINDS.values()}, failures=list(failures))
    infos = {name: PluginInfo(name, *meta.get(name, ("?", "?"))) for name in meta}
    broken: set[str] = set()
    for hook_name, (kind, spec_class) in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            owner = impl.plugin_name
            if owner in broken:
                continue
            try:
                specs = impl.function() or []
                for spec in specs:
                    if not isinstance(spec, spec_class):
                        raise TypeError(f"{hook_name} returned {type(spec).__name__}, "
                                        f"expected {spec_class.__name__}")
            except Exception as exc:
                broken.add(owner)
                reg.failures.append((owner, f"{hook_name} failed: {type(exc).__name__}: {exc}"))
                continue
            for spec in specs:
                key = (kind, spec.name)
                if key in reg.owners:
                    raise PluginError(
                        f"{kind} '{spec.name}' is registered by both plugin "
                        f"'{reg.owners[key]}' and plugin '{owner}': uninstall one of them, or "
                        "choose plugins with GUIDEKIT_PLUGINS"
                    )
                reg.specs[kind][spec.name] = spec
                reg.owners[key] = owner
                infos.setdefault(owner, PluginInfo(owner, "?", "?"))
                infos[owner].registers.setdefault(kind, []).append(spec.name)
    # Drop whatever a plugin registered before one of its hooks failed: all or nothing.
    for key, owner in list(reg.owners.items()):
        if owner in broken:
            del reg.specs[key[0]][key[1]]
            del reg.owners[key]
    reg.plugins = [info for name, info in infos.items() if name not in broken]
    return reg


_cache: tuple[pluggy.PluginManager, Registry] | None = None


def get_manager() -> pluggy.PluginManager:
    return _load()[0]


def get_registry() -> Registry:
    """The process-wide registry (built on first use)."""
    return _load()[1]


def _load() -> tuple[pluggy.PluginManager, Registry]:
    global _cache
    if _cache is None:
        pm, meta, failures = make_manager()
        _cache = (pm, collect(pm, meta, failures))
    return _cache


def reset() -> None:
    """Forget the loaded plugins (tests use this after changing the environment)."""
    global _cache
    _cache = None
