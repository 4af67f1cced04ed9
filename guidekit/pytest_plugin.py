"""pytest fixtures for plugin authors, loaded automatically once guidekit is installed (the
``pytest11`` entry point; ``-p no:guidekit`` turns them off).

A plugin's test gets a tiny trained DPM and the plugins loaded, each in one line::

    def test_my_guidance(guidekit_dpm, guidekit_plugins):
        registry = guidekit_plugins("guidekit_myguidance")  # the core + this plugin only
        assert "myguidance" in registry.names("guidance")

    def test_my_cli(guidekit_dpm, guidekit_cli):
        result = guidekit_cli("sample", "--checkpoint", str(guidekit_dpm), "--guidance", ...)
        assert result.code == 0, result.err

Heavy imports (torch) happen inside the fixtures, so merely having guidekit installed costs
other projects' test runs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from guidekit.plugins import Registry


@dataclass
class CliResult:
    """What ``guidekit ARGS`` did in-process: exit status and captured output."""

    code: int
    out: str
    err: str


@pytest.fixture(scope="session")
def guidekit_dpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DDPM checkpoint on ``digits`` (16×16 grayscale, T = 100), trained once per test
    session in a few seconds: a real checkpoint directory that ``load_dpm`` and every
    ``--checkpoint`` option accept. Its samples are noise; use it for shapes, wiring and
    errors, not quality."""
    from guidekit.testing import make_tiny_dpm

    return make_tiny_dpm(tmp_path_factory.mktemp("guidekit") / "ddpm")


@pytest.fixture
def guidekit_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Registry]]:
    """``load(*plugins)`` → a freshly built :class:`~guidekit.plugins.Registry` holding the
    core and exactly ``plugins`` (entry-point names or importable module paths, so a plugin
    need not be installed yet); ``load()`` with no names loads every installed entry point.
    The process-wide registry is rebuilt before and after, so tests do not leak plugins."""
    from guidekit import plugins

    def load(*names: str) -> Registry:
        if names:
            monkeypatch.setenv("GUIDEKIT_PLUGINS", ",".join(names))
        else:
            monkeypatch.delenv("GUIDEKIT_PLUGINS", raising=False)
        monkeypatch.delenv("GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
        plugins.reset()
        registry = plugins.get_registry()
        if registry.failures:
            plugin, why = registry.failures[0]
            raise AssertionError(f"plugin '{plugin}' failed to load: {why}")
        return registry

    plugins.reset()
    yield load
    monkeypatch.undo()
    plugins.reset()


@pytest.fixture
def guidekit_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``run(*args)`` runs ``guidekit ARGS`` in this process (plugins as currently loaded)
    and returns a :class:`CliResult`; a user mistake shows as ``code == 2`` with one
    ``error: …`` line in ``err``."""
    from guidekit.testing import run_cli

    def run(*args: str) -> CliResult:
        return CliResult(*run_cli(capsys, *map(str, args)))

    return run
