"""The public Python API: what ``__all__`` promises imports, is documented and typed, stays
cheap to import, and covers every CLI command (a new command without a Python function
behind it fails here)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import typer

import guidekit

PACKAGES = ("guidekit", "guidekit_classifier", "guidekit_pdae", "guidekit_p2")
BUILTIN_PLUGINS = ("p2", "classifier", "pdae")

# Each command of `guidekit` (built-in plugins loaded) -> the public function doing its work.
COMMANDS: dict[str, str] = {
    "train ddpm": "guidekit.train_ddpm",
    "train classifier": "guidekit_classifier.train_classifier",
    "train judge": "guidekit_classifier.train_judge",
    "train pdae": "guidekit_pdae.train_pdae",
    "train pdae-latent": "guidekit_pdae.train_pdae_latent",
    "sample": "guidekit.sample",
    "plugins": "guidekit.get_registry",
    "quickstart": "guidekit.run_quickstart",
    "eval guidance": "guidekit_classifier.evaluate_guidance",
    "pdae encode": "guidekit_pdae.encode_images",
    "pdae reconstruct": "guidekit_pdae.reconstruct",
    "pdae interpolate": "guidekit_pdae.interpolate",
    "pdae manipulate": "guidekit_pdae.edit_held_out",
    "pdae gap": "guidekit_pdae.posterior_mean_gap",
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
