"""``guidekit --help`` and ``guidekit plugins`` start without importing torch: plugins register
names, help and options up front, and what needs torch as :class:`~guidekit.specs.Lazy`
references (or in command modules) loaded on first use. The startup check runs in a fresh
interpreter, since the other tests import torch into this one; the rest checks that what is
written out for a fast start agrees with the modules it stands for, and that a lazy part that
fails to load is one line, not a traceback."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from typing import Any

import pytest

from guidekit import hookimpl
from guidekit.errors import PluginError
from guidekit.options import Option
from guidekit.specs import GuidanceSpec, Lazy, ModelSpec, TrainerSpec
from guidekit.testing import assert_one_line_error

# guidekit's own plugins, and the example third-party plugin where it is installed
PLUGINS = ("p2", "classifier", "pdae", "cfg") + (
    ("inpaint",) if importlib.util.find_spec("guidekit_inpaint") else ())
HEAVY = ("torch", "numpy", "PIL", "sklearn", "matplotlib", "einops", "safetensors")

STARTUP = textwrap.dedent("""
    import contextlib, io, json, sys

    from guidekit.cli import main

    result = {}
    for args in (["--help"], ["plugins"], ["plugins", "--json"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(args)
            except SystemExit as exc:
                assert not exc.code, (args, exc.code)
        result[" ".join(args)] = out.getvalue()
    result["imported"] = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def startup() -> dict[str, Any]:
    """What a fresh ``guidekit --help``, ``plugins`` and ``plugins --json`` printed, and which
    of the heavy packages they imported."""
    env = {**os.environ, "GUIDEKIT_PLUGINS": ",".join(PLUGINS), "COLUMNS": "200"}
    env.pop("GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD", None)
    done = subprocess.run([sys.executable, "-c", STARTUP, *HEAVY], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not done.stderr.strip(), done.stderr  # no plugin failed to load
    return json.loads(done.stdout)


def test_help_and_plugins_do_not_import_torch(startup):
    assert startup["imported"] == [], f"imported at start: {startup['imported']}"


def test_help_lists_every_command_without_torch(startup):
    listed = startup["--help"]
    commands = ["train", "sample", "plugins", "quickstart", "convert", "eval", "pdae"]
    if "inpaint" in PLUGINS:
        commands.append("inpaint")
    first_words = {line.strip(" │").split(" ")[0] for line in listed.splitlines()}
    assert set(commands) <= first_words, set(commands) - first_words
    assert "Sample a grid from a trained DPM" in listed
    assert "PDAE experiments on a trained PDAE checkpoint." in listed


def test_plugins_lists_every_registered_name_without_torch(startup):
    data = json.loads(startup["plugins --json"])
    assert data["failed"] == []
    registers = {p["name"]: p["registers"] for p in data["plugins"]}
    assert registers["guidekit"] == {
        "weighting": ["uniform"], "trainer": ["ddpm"], "model": ["unet"],
        "dataset": ["digits", "shapes"], "quickstart step": ["ddpm"]}
    assert registers["classifier"] == {
        "guidance": ["classifier"], "trainer": ["classifier", "judge"],
        "model": ["encoder_unet"], "quickstart step": ["classifier", "guidance"]}
    assert registers["pdae"] == {
        "guidance": ["pdae"], "weighting": ["pdae"], "trainer": ["pdae", "pdae-latent"],
        "model": ["latent_mlp"], "quickstart step": ["pdae", "pdae-autoencoding", "pdae-sample"]}
    assert registers["p2"] == {"weighting": ["p2"]}
    assert registers["cfg"] == {"guidance": ["cfg"]}
    if "inpaint" in PLUGINS:
        assert registers["inpaint"] == {"guidance": ["inpaint"]}
    for name in registers:
        assert name in startup["plugins"]  # the table a person reads lists the same plugins


# --------------------------------------------------------------------------- what stands in


def test_every_lazy_field_of_the_registered_specs_loads(guidekit_plugins):
    reg = guidekit_plugins(*PLUGINS)
    loaded = []
    for kind, specs in reg.specs.items():
        for spec in specs.values():
            for f in dataclasses.fields(spec):
                if isinstance(spec.__dict__[f.name], Lazy):
                    getattr(spec, f.name)  # imported and checked, or a PluginError
                    assert not isinstance(spec.__dict__[f.name], Lazy)
                    loaded.append((kind, spec.name, f.name))
    assert ("trainer", "ddpm", "options") in loaded and ("model", "unet", "model_class") in loaded


def test_names_written_out_for_the_start_match_their_modules():
    import guidekit_classifier
    import guidekit_classifier.training as clf
    import guidekit_pdae
    import guidekit_pdae.latent as latent
    import guidekit_pdae.quickstart as pdae_quickstart
    import guidekit_pdae.training as pdae_training

    assert (guidekit_classifier.KIND, guidekit_classifier.JUDGE_KIND,
            guidekit_classifier.MODEL_NAME) == (clf.KIND, clf.JUDGE_KIND, clf.MODEL_NAME)
    assert (guidekit_pdae.KIND, guidekit_pdae.LATENT_KIND) == (pdae_training.KIND, latent.KIND)
    (model,) = guidekit_pdae.guidekit_models()
    assert model == latent.latent_model_spec()
    steps = [(s.name, s.order, s.help, s.run) for s in guidekit_pdae.guidekit_quickstart_steps()]
    assert steps == [(s.name, s.order, s.help, s.run) for s in pdae_quickstart.quickstart_steps()]


@pytest.mark.skipif("inpaint" not in PLUGINS, reason="the example plugin is not installed")
def test_the_example_plugin_names_match_its_modules(guidekit_plugins):
    import guidekit_inpaint
    import typer
    from guidekit_inpaint import cli, guidance

    assert guidekit_inpaint.NAME == guidance.NAME
    guidekit_plugins("inpaint")
    from guidekit.cli import build_app

    group = typer.main.get_command(build_app()).commands["inpaint"]
    assert group.help == cli.inpaint_app.info.help  # the help --help shows before it loads
    assert list(group.commands) == ["prepare", "evaluate"]


def test_shared_train_options_default_to_train_config():
    from guidekit.trainer_options import train_options
    from guidekit.training import TrainConfig

    defaults = dataclasses.asdict(TrainConfig())
    shared = {o.name: o.default for o in train_options() if o.name in defaults}
    assert shared == {name: defaults[name] for name in shared}
    assert len(shared) >= 10


# --------------------------------------------------------------------------- failures


def make_plugin(monkeypatch: pytest.MonkeyPatch, name: str,
                **hooks: Callable[..., Any]) -> str:
    """A plugin module named ``name`` with these hook implementations, importable by name."""
    module = types.ModuleType(name)
    module.__version__ = "1.0"  # type: ignore[attr-defined]
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    monkeypatch.setitem(sys.modules, name, module)
    return name


def count_trainer(ctx: Any) -> dict[str, int]:
    """Count nothing."""
    return {"n": ctx.options["n"]}


def test_a_trainer_whose_lazy_options_fail_is_one_line(monkeypatch, guidekit_plugins,
                                                      guidekit_cli):
    name = make_plugin(monkeypatch, "gk_startup_lazy", guidekit_trainers=lambda: [
        TrainerSpec("broken", Lazy("gk_startup_nowhere:train"), help="Never loads.",
                    options=Lazy("gk_startup_nowhere:OPTIONS")),
        TrainerSpec("fine", count_trainer, help="Loads.", options=[Option("n", int, 1)])])
    guidekit_plugins(name)
    listing = guidekit_cli("train", "--help")  # the broken trainer is listed, not fatal
    assert listing.code == 0 and "Never loads." in listing.out and "fine" in listing.out
    for args in (["train", "broken"], ["train", "broken", "--help"]):
        result = guidekit_cli(*args)
        assert_one_line_error(result.code, result.err, "TrainerSpec 'broken'",
                              "gk_startup_nowhere:OPTIONS", "ModuleNotFoundError")
    assert guidekit_cli("train", "fine", "--n", "3", "--json").out.strip() == '{"n": 3}'


def test_a_guidance_whose_lazy_options_fail_leaves_sample_help_working(
        monkeypatch, guidekit_plugins, guidekit_cli):
    name = make_plugin(monkeypatch, "gk_startup_guidance", guidekit_guidances=lambda: [
        GuidanceSpec("broken", print, options=Lazy("gk_startup_nowhere:OPTIONS"))])
    guidekit_plugins(name)
    shown = guidekit_cli("sample", "--help")
    assert shown.code == 0 and "guidance broken: GuidanceSpec 'broken'" in shown.out


def test_lazy_fields_are_checked_when_they_load():
    with pytest.raises(TypeError, match="module:attribute"):
        Lazy("guidekit.options")
    spec = TrainerSpec("t", print, options=Lazy("guidekit.options:MAX_SEED"))
    with pytest.raises(PluginError, match="TrainerSpec 't': options must be a list of guidekit "
                       r"Option declarations \(loaded from guidekit.options:MAX_SEED\)"):
        spec.options  # noqa: B018
    model = ModelSpec("m", Lazy("guidekit.options:Option"), Lazy("guidekit.unet:UNet"))
    with pytest.raises(PluginError, match="config_class needs a from_dict classmethod"):
        model.config_class  # noqa: B018
    assert model.model_class.__name__ == "UNet"


def test_a_lazy_command_group_that_fails_to_load_is_one_line(monkeypatch, guidekit_plugins,
                                                             guidekit_cli):
    def add_commands(cli: Any) -> None:
        from guidekit.cli.params import lazy_group

        cli.add_typer(lazy_group("gk_startup_nowhere:app", help="Never loads."), name="gone")

    guidekit_plugins(make_plugin(monkeypatch, "gk_startup_group",
                                 guidekit_commands=add_commands))
    shown = guidekit_cli("--help")
    assert shown.code == 0 and "Never loads." in shown.out
    result = guidekit_cli("gone", "anything")
    assert_one_line_error(result.code, result.err, "the 'gone' commands",
                          "gk_startup_nowhere:app", "ModuleNotFoundError")
