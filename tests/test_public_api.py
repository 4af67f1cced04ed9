"""The public Python API: what ``__all__`` promises imports, is documented and typed, stays
cheap to import, and covers every CLI command (a new command without a Python function
behind it fails here)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

import guidekit

PACKAGES = ("guidekit", "guidekit_classifier", "guidekit_pdae", "guidekit_p2", "guidekit_cfg")
BUILTIN_PLUGINS = ("p2", "classifier", "pdae", "cfg")

# Each command of `guidekit` (built-in plugins loaded) -> the public function doing its work.
COMMANDS: dict[str, str] = {
    "convert adm": "guidekit.convert.convert_adm",
    "convert pdae": "guidekit.convert.convert_pdae",
    "convert diffusers": "guidekit.convert_diffusers.convert_diffusers",
    "train ddpm": "guidekit.train_ddpm",
    "train classifier": "guidekit_classifier.train_classifier",
    "train judge": "guidekit_classifier.train_judge",
    "train pdae": "guidekit_pdae.train_pdae",
    "train pdae-latent": "guidekit_pdae.train_pdae_latent",
    "sample": "guidekit.sample",
    "plugins": "guidekit.get_registry",
    "quickstart": "guidekit.run_quickstart",
    "eval guidance": "guidekit_classifier.evaluate_guidance",
    "eval samples": "guidekit_classifier.evaluate_samples",
    "eval stages": "guidekit_classifier.evaluate_stages",
    "pdae encode": "guidekit_pdae.encode_images",
    "pdae reconstruct": "guidekit_pdae.reconstruct",
    "pdae interpolate": "guidekit_pdae.interpolate",
    "pdae manipulate": "guidekit_pdae.edit_held_out",
    "pdae gap": "guidekit_pdae.posterior_mean_gap",
    "pdae fewstep": "guidekit_pdae.fewstep_generation",
    "pdae onestep": "guidekit_pdae.one_step_x0",
    "pdae probe": "guidekit_pdae.linear_probe",
    "pdae sample": "guidekit_pdae.sample_pdae",
}


def exported() -> Iterator[tuple[str, str, Any]]:
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            yield package, name, getattr(module, name)


EXPORTED = [pytest.param(obj, id=f"{pkg}.{name}") for pkg, name, obj in exported()]


def real_docstring(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    # a dataclass without a docstring gets its signature as one: that documents nothing
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc.startswith(
            f"{obj.__name__}("):
        return ""
    return doc


def unannotated(fn: Any) -> list[str]:
    sig = inspect.signature(fn)
    missing = [p.name for p in sig.parameters.values()
               if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    if sig.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
        missing.append("return")
    return missing


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_sorted_unique_public_and_importable(package):
    module = importlib.import_module(package)
    names = module.__all__
    assert names, f"{package} exports nothing"
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    assert not [n for n in names if n.startswith("_")]
    assert names == sorted(names), "keep __all__ sorted"
    for name in names:
        assert getattr(module, name) is not None


def test_dir_lists_the_lazy_names():
    # only the core: pluggy reads every name dir() gives of a plugin module, which would
    # import a plugin's lazily loaded command modules at registration
    assert set(guidekit.__all__) <= set(dir(guidekit))


def test_lazy_exports_match_all():
    """``guidekit`` resolves its names on first use: the table and ``__all__`` agree."""
    assert set(guidekit._EXPORTS) == set(guidekit.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        guidekit.nope  # noqa: B018


@pytest.mark.parametrize("obj", EXPORTED)
def test_exported_names_are_documented(obj):
    assert real_docstring(obj).strip(), f"{obj!r} has no docstring"


@pytest.mark.parametrize("obj", EXPORTED)
def test_exported_callables_are_typed(obj):
    if inspect.isfunction(obj):
        assert not unannotated(obj), f"{obj.__qualname__}: unannotated {unannotated(obj)}"
    elif inspect.isclass(obj) and not issubclass(obj, BaseException) and not getattr(
            obj, "_is_protocol", False):
        # the constructor a user calls: a dataclass's fields or the class's own __init__
        init = obj.__init__
        if inspect.isfunction(init):
            assert not unannotated(init), f"{obj.__name__}.__init__: {unannotated(init)}"


@pytest.mark.parametrize("module", ["guidekit", "guidekit.pytest_plugin"])
def test_import_does_not_load_torch(module):
    """`import guidekit` and the pytest plugin (loaded by every pytest run where guidekit is
    installed) stay cheap: torch loads with the first name that needs it."""
    code = (f"import sys, {module}; assert 'torch' not in sys.modules, 'torch loaded'; "
            "import guidekit; guidekit.sample; assert 'torch' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[str]:
    """Every leaf command of a click tree, as its space-separated path."""
    children = getattr(command, "commands", None)
    if children is None:
        yield " ".join(path)
        return
    for name, sub in children.items():
        yield from walk(sub, (*path, name))


def test_every_cli_command_has_a_public_python_function(guidekit_plugins):
    from guidekit.cli import build_app

    guidekit_plugins(*BUILTIN_PLUGINS)
    commands = set(walk(typer.main.get_command(build_app())))
    missing = sorted(commands - set(COMMANDS))
    assert not missing, f"commands without a Python function in COMMANDS: {missing}"
    assert not sorted(set(COMMANDS) - commands), "COMMANDS lists commands that are gone"
    for command, target in COMMANDS.items():
        package, name = target.rsplit(".", 1)
        module = importlib.import_module(package)
        assert name in module.__all__, f"{command}: {target} is not in {package}.__all__"
        assert callable(getattr(module, name))


def test_the_python_api_samples_what_the_cli_samples(guidekit_dpm, guidekit_cli, tmp_path):
    """`guidekit sample` and `guidekit.sample` are one code path: same seed, same images."""
    import numpy as np
    from PIL import Image

    out = tmp_path / "cli.png"
    result = guidekit_cli("sample", "--checkpoint", guidekit_dpm, "--n", "4", "--steps", "3",
                          "--seed", "5", "--out", out, "--json")
    assert result.code == 0, result.err
    x = guidekit.sample(guidekit.load_dpm(guidekit_dpm), 4, steps=3, seed=5)
    api = guidekit.save_image_grid(x, tmp_path / "api.png", scale=4)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(api)))


# The modules a plugin may import from, beside the top-level package: each lists its public
# names in __all__, and docs/python.md documents the list.
PUBLIC_MODULES = (
    "guidekit.convert", "guidekit.convert_diffusers",
    "guidekit.checkpoint", "guidekit.cli.params", "guidekit.config", "guidekit.data",
    "guidekit.ddpm", "guidekit.distributed", "guidekit.engine", "guidekit.errors",
    "guidekit.guidance", "guidekit.hookspecs", "guidekit.lookup", "guidekit.ops",
    "guidekit.options", "guidekit.plots", "guidekit.sampling", "guidekit.schedule",
    "guidekit.specs", "guidekit.testing", "guidekit.trainer_options", "guidekit.training",
    "guidekit.unet", "guidekit.vlb",
)
ROOT = Path(__file__).resolve().parents[1]


def _code_of_docs() -> Iterator[tuple[str, str]]:
    """(where, python source) of every file and example that the public API must cover: the
    built-in plugins, the example plugin and scripts, the docs' code blocks, the hook
    docstrings' examples."""
    for base in (ROOT / "plugins", ROOT / "examples"):
        for path in sorted(base.rglob("*.py")):
            if "tests" not in path.parts:
                yield str(path.relative_to(ROOT)), path.read_text()
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            yield f"{page.relative_to(ROOT)} block {i}", block
    from guidekit import hookspecs

    for name in hookspecs.__all__:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        if "::" in doc:
            yield f"hookspecs.{name}", textwrap.dedent(doc.split("::", 1)[1])


def _guidekit_imports(source: str) -> Iterator[tuple[str, str]]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module.split(".")[0] == "guidekit"):
            for alias in node.names:
                yield node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "guidekit" and alias.name != "guidekit":
                    yield alias.name, ""


def test_public_modules_declare_their_names():
    for module in PUBLIC_MODULES:
        mod = importlib.import_module(module)
        assert isinstance(getattr(mod, "__all__", None), list), f"{module} has no __all__"
        missing = [n for n in mod.__all__ if not hasattr(mod, n)]
        assert not missing, f"{module}.__all__ names what it lacks: {missing}"


def test_the_docs_and_plugins_use_only_the_public_api():
    """Every guidekit name the docs, the hook examples, the example plugin and the built-in
    plugins import is public: in guidekit.__all__ or in a public module's __all__."""
    found = set()
    for where, source in _code_of_docs():
        for module, name in _guidekit_imports(source):
            found.add(module)
            if module == "guidekit":
                ok = name in guidekit.__all__ or f"guidekit.{name}" in PUBLIC_MODULES
            else:
                ok = module in PUBLIC_MODULES and (
                    not name or name in importlib.import_module(module).__all__)
            assert ok, f"{where} imports {name or module} from {module}, which is not public"
    assert "guidekit" in found and "guidekit.cli.params" in found  # the scan sees imports


def test_public_modules_are_documented():
    page = (ROOT / "docs" / "python.md").read_text()
    missing = [m for m in PUBLIC_MODULES if f"`{m}`" not in page]
    assert not missing, f"docs/python.md does not list the public modules {missing}"
