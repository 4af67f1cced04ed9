"""The plugin manager: loads the built-in core and every ``guidekit`` entry point, and collects
what they register into one :class:`Registry` with unique names.

Environment:
    GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD=1  load no entry points (the core still loads); 1, true,
                                        yes, on turn it on, 0, false, no, off or empty off.
    GUIDEKIT_PLUGINS=a,b                load only these: entry-point names or module paths
                                        (works with autoload off too, like pytest's -p).

A plugin that fails (its import raises or exits, a hook raises, returns something that is
not a list of its specs, implements a hook that does not exist, or registers a name another
plugin already has) is left out whole and reported in one line; everything else loads.
Whatever a plugin prints while loading goes to stderr, so ``--json`` output stays JSON.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import sys
from collections.abc import Iterable
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
KNOWN_HOOKS = tuple(n for n in dir(hookspecs) if n.startswith("guidekit_"))
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


TRUE = ("1", "true", "yes", "on")
FALSE = ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """A yes/no environment variable; any other spelling is a one-line error."""
    value = os.environ.get(name, "").strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise PluginError(f"{name}={os.environ[name]!r} is not a yes/no value: use 1, true, yes or "
                      "on to turn it on, 0, false, no, off or empty to turn it off")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__


def _unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Hook implementations of ``plugin`` that match no guidekit hook (a misspelt name)."""
    problems = []
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.spec is None:
            near = difflib.get_close_matches(caller.name, list(KNOWN_HOOKS), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            problems.append(f"'{caller.name}' is not a guidekit hook{hint}")
    return problems


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
    autoload = not env_flag("GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD")
    eps = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if wanted:
        names = wanted
    elif autoload:
        names = sorted(eps)
    else:
        names = []
    for name in names:
        try:
            with contextlib.redirect_stdout(sys.stderr):
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
        except (Exception, SystemExit) as exc:  # a broken plugin must not take the CLI down
            failures.append((name, _reason(exc)))
            continue
        problems = _unknown_hooks(pm, plugin)
        if problems:
            pm.unregister(plugin)
            failures.append((name, "; ".join(problems)))
            continue
        meta[name] = (str(version), str(module))
    return pm, meta, failures


def _specs(result: object, hook_name: str, spec_class: type) -> list:
    """A hook's return value as a list of ``spec_class``: None is nothing, a generator is
    drained, anything else that is not a list of those specs is an error."""
    if result is None:
        return []
    if isinstance(result, (str, bytes, dict)) or not isinstance(result, Iterable):
        raise TypeError(f"{hook_name} must return a list of {spec_class.__name__}, "
                        f"got {type(result).__name__}")
    specs = list(result)
    for spec in specs:
        if not isinstance(spec, spec_class):
            raise TypeError(f"{hook_name} returned {type(spec).__name__}, "
                            f"expected {spec_class.__name__}")
    return specs


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
                with contextlib.redirect_stdout(sys.stderr):
                    specs = _specs(impl.function(), hook_name, spec_class)
            except (Exception, SystemExit) as exc:
                broken.add(owner)
                reg.failures.append((owner, f"{hook_name} failed: {_reason(exc)}"))
                continue
            names = [spec.name for spec in specs]
            taken = [n for n in names if (kind, n) in reg.owners]
            twice = sorted({n for n in names if names.count(n) > 1})
            if taken or twice:
                broken.add(owner)
                reg.failures.append((owner, (
                    f"{kind} '{taken[0]}' is registered by both plugin "
                    f"'{reg.owners[(kind, taken[0])]}' and plugin '{owner}': uninstall one of "
                    "them, or choose plugins with GUIDEKIT_PLUGINS") if taken else (
                    f"{hook_name} returned {kind} '{twice[0]}' twice")))
                continue
            for spec in specs:
                key = (kind, spec.name)
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
