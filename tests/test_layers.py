"""The layers, kept by a scan of every import (as test_docs scans the docs):

- engine modules (schedule, ops, guidance, engine, networks, data, checkpoint, training and
  the small modules under them) import neither the plugin registry nor a CLI library;
- name lookup goes through one registry-facing module, ``guidekit.lookup``: nothing else
  outside the plugin manager, the CLI and the pytest plugin imports ``guidekit.plugins``;
- typer and click are imported by CLI modules only: a module named ``cli`` or inside a
  ``cli`` package, in guidekit, its built-in plugins and the example plugin.

Imports under ``if TYPE_CHECKING:`` are annotations, not edges, and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (folder scanned, the folder its modules import from)
SOURCES = [(ROOT / "guidekit", ROOT), (ROOT / "plugins", ROOT / "plugins"),
           (ROOT / "examples" / "guidekit-inpaint" / "src",) * 2]

ENGINE = {f"guidekit.{m}" for m in (
    "schedule", "ops", "guidance", "engine", "unet", "data", "checkpoint", "training",
    "config", "errors", "distributed", "options", "specs")}
REGISTRY = ("guidekit.plugins", "guidekit.lookup", "guidekit.builtin", "guidekit.hookspecs")
CLI_LIBRARIES = ("typer", "click")
# the modules that may reach the registry itself: the manager, its one lookup module, the
# CLI, the pytest plugin (its fixture rebuilds the registry) and the package's lazy facade
REGISTRY_USERS = {"guidekit.plugins", "guidekit.lookup", "guidekit.pytest_plugin", "guidekit"}


def module_name(path: Path) -> str:
    for folder, base in SOURCES:
        if path.is_relative_to(folder):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            return ".".join(parts)
    raise ValueError(path)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(source: str, module: str) -> set[str]:
    """Every module ``source`` imports at run time (function-level imports included)."""
    found: set[str] = set()
    package = module if module.count(".") == 0 else module.rsplit(".", 1)[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: max(len(package.split(".")) - node.level + 1, 0)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def is_cli(module: str) -> bool:
    return "cli" in module.split(".")


def violations(sources: dict[str, str]) -> list[str]:
    """Each back-edge in ``{module name: source}``, as a line."""
    found = []
    for module, source in sorted(sources.items()):
        for target in sorted(imports(source, module)):
            top = target.split(".")[0]
            if top in CLI_LIBRARIES and not is_cli(module):
                found.append(f"{module} imports {top}: only CLI modules may")
            if module in ENGINE and target.startswith(REGISTRY):
                found.append(f"engine module {module} imports {target}")
            if (target == "guidekit.plugins" or target.startswith("guidekit.plugins.")) and (
                    module not in REGISTRY_USERS and not is_cli(module)):
                found.append(f"{module} imports {target}: look names up via guidekit.lookup")
    return found


def tree() -> dict[str, str]:
    return {module_name(p): p.read_text() for folder, _ in SOURCES for p in folder.rglob("*.py")}


def test_the_tree_has_no_back_edges():
    sources = tree()
    assert set(sources) >= ENGINE, sorted(ENGINE - set(sources))
    assert not violations(sources), "\n".join(violations(sources))


@pytest.mark.parametrize("module, line, expected", [
    ("guidekit.engine", "from guidekit.plugins import get_registry",
     "engine module guidekit.engine imports guidekit.plugins"),
    ("guidekit.data", "def f():\n    from guidekit.lookup import load_dataset",
     "engine module guidekit.data imports guidekit.lookup"),
    ("guidekit.ddpm", "import typer", "guidekit.ddpm imports typer: only CLI modules may"),
    ("guidekit_pdae.analysis", "import click", "imports click: only CLI modules may"),
    ("guidekit_pdae.training", "from guidekit.plugins import get_registry",
     "guidekit_pdae.training imports guidekit.plugins: look names up via guidekit.lookup"),
    ("guidekit.training", "from .plugins import get_registry",
     "engine module guidekit.training imports guidekit.plugins"),
])
def test_a_deliberate_back_edge_is_caught(module, line, expected):
    sources = tree()
    sources[module] = sources.get(module, "") + "\n" + line + "\n"
    assert any(expected in v for v in violations(sources)), violations(sources)


def test_annotations_and_cli_modules_are_not_back_edges():
    ok = {
        "guidekit.hookspecs": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    import typer\n",
        "guidekit_pdae.cli": "import typer\nfrom guidekit.lookup import load_dataset\n",
        "guidekit.cli.app": "import typer\nfrom guidekit.plugins import get_registry\n",
    }
    assert violations(ok) == []
