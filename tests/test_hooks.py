"""Each hook, exercised end to end through a small plugin written in the test: loaded by the
plugin manager like any third-party package, used through the CLI or the Python API."""

from __future__ import annotations

import json
import shutil
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import typer

import guidekit
from guidekit import hookimpl
from guidekit.testing import assert_one_line_error
from guidekit.trainer_options import WEIGHTING
from guidekit.unet import UNet, UNetConfig

TINY_UNET = ["--model-channels", "8", "--channel-mult", "1,2", "--attention", "",
             "--timesteps", "50", "--samples", "0"]
ONE_STEP = ["--steps", "1", "--batch-size", "8", "--log-every", "1", "--save-every", "1",
            "--json"]


def make_plugin(monkeypatch: pytest.MonkeyPatch, name: str,
                **hooks: Callable[..., Any]) -> str:
    """A plugin module named ``name`` with these hook implementations, importable by name."""
    module = types.ModuleType(name)
    module.__version__ = "1.0"
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    monkeypatch.setitem(sys.modules, name, module)
    return name


def train(cli: Callable[..., Any], out: Path, *args: str) -> dict[str, Any]:
    result = cli("train", "ddpm", "--out", out, *TINY_UNET, *ONE_STEP, *args)
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_guidekit_weightings_plugin_weighting_scales_the_training_loss(
        monkeypatch, guidekit_plugins, guidekit_cli, tmp_path):
    def constant(schedule, constant_value: float) -> torch.Tensor:
        return torch.full((schedule.num_steps,), constant_value)

    spec_option = guidekit.Option("constant_value", float, 1.0)
    name = make_plugin(monkeypatch, "gk_test_weighting", guidekit_weightings=lambda: [
        guidekit.WeightingSpec("constant", constant, options=[spec_option])])
    guidekit_plugins(name)

    plain = train(guidekit_cli, tmp_path / "uniform")
    tripled = train(guidekit_cli, tmp_path / "constant", "--weighting", "constant",
                    "--constant-value", "3")
    # same seed, same batch, same noise: λ_t = 3 triples the first step's loss exactly
    assert tripled["final_loss"] == pytest.approx(3 * plain["final_loss"], rel=1e-5)
    config = json.loads((tmp_path / "constant" / "config.json").read_text())
    assert config["weighting"] == {"name": "constant", "options": {"constant_value": 3.0}}

    bad = guidekit_cli("train", "ddpm", "--out", tmp_path / "bad", "--weighting", "constant",
                       "--constant-value", "three")
    assert_one_line_error(bad.code, bad.err, "--constant-value")


class CountingUNet(UNet):
    """The core UNet, counting the forward passes the engine makes."""

    calls = 0

    def down(self, x, t):
        CountingUNet.calls += 1
        return super().down(x, t)


def test_guidekit_models_plugin_architecture_rebuilds_a_checkpoint(
        monkeypatch, guidekit_plugins, guidekit_cli, guidekit_dpm, tmp_path):
    ckpt = tmp_path / "ddpm"
    shutil.copytree(guidekit_dpm, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["name"] = "counting-unet"
    (ckpt / "config.json").write_text(json.dumps(config))

    name = make_plugin(monkeypatch, "gk_test_model", guidekit_models=lambda: [
        guidekit.ModelSpec("counting-unet", UNetConfig, CountingUNet)])
    guidekit_plugins(name)
    dpm = guidekit.load_dpm(ckpt)
    assert type(dpm.model) is CountingUNet
    CountingUNet.calls = 0
    x = guidekit.sample(dpm, 2, steps=3)
    assert CountingUNet.calls == 3 and x.shape == (2, *dpm.image_shape)

    guidekit_plugins("guidekit_p2")  # without the plugin, the checkpoint names nothing known
    with pytest.raises(guidekit.PluginError, match="unknown model 'counting-unet'"):
        guidekit.load_dpm(ckpt)
    result = guidekit_cli("sample", "--checkpoint", ckpt, "--out", tmp_path / "x.png")
    assert_one_line_error(result.code, result.err, "counting-unet")


def test_guidekit_datasets_plugin_dataset_is_usable_as_data(
        monkeypatch, guidekit_plugins, guidekit_cli, tmp_path):
    calls = []

    def load_stripes(split: str, image_size: int | None = None, seed: int = 0):
        calls.append((split, image_size, seed))
        size = image_size or 8
        rows = (torch.arange(size) % 2 * 2.0 - 1)[:, None].expand(size, size)
        images = torch.stack([rows, rows.T])[:, None].repeat(16, 1, 1, 1)
        return guidekit.ImageData("stripes", images, torch.arange(32) % 2, num_classes=2)

    name = make_plugin(monkeypatch, "gk_test_dataset", guidekit_datasets=lambda: [
        guidekit.DatasetSpec("stripes", load_stripes),
        guidekit.DatasetSpec("broken", lambda split, image_size, seed: torch.zeros(3))])
    guidekit_plugins(name)

    train(guidekit_cli, tmp_path / "ddpm", "--data", "stripes", "--image-size", "8",
          "--seed", "4")
    assert calls == [("train", 8, 4)]
    data = json.loads((tmp_path / "ddpm" / "config.json").read_text())["data"]
    assert data == {"name": "stripes", "image_size": 8, "channels": 1, "num_classes": 2}
    assert guidekit.load_dataset("stripes", "test").images.shape == (32, 1, 8, 8)

    with pytest.raises(guidekit.GuidekitError, match="'broken' did not return an ImageData"):
        guidekit.load_dataset("broken")


def count_trainer(ctx: guidekit.TrainerContext) -> guidekit.StepReport:
    """Count to N (a trainer that trains nothing)."""
    numbers = list(range(1, ctx.options["n"] + 1))
    return guidekit.StepReport(" ".join(map(str, numbers)), metrics={"counted": numbers})


def weighted_trainer(ctx: guidekit.TrainerContext) -> guidekit.StepReport:
    """A trainer taking a weighting, so the help lists the weighting plugins' options."""
    return guidekit.StepReport("weighted", metrics={"weighting": ctx.weighting_options})


def test_guidekit_trainers_plugin_trainer_is_a_train_subcommand(
        monkeypatch, guidekit_plugins, guidekit_cli):
    name = make_plugin(monkeypatch, "gk_test_trainer", guidekit_trainers=lambda: [
        guidekit.TrainerSpec("count", count_trainer, help="Count to N.",
                             options=[guidekit.Option("n", int, 2, "How far to count.")]),
        guidekit.TrainerSpec("weighted", weighted_trainer, options=[WEIGHTING])])
    guidekit_plugins(name, "p2")

    result = guidekit_cli("train", "count", "--n", "3", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out) == {"counted": [1, 2, 3]}
    listing = guidekit_cli("train", "--help")
    assert listing.code == 0 and "count" in listing.out and "Count to N." in listing.out
    assert "--p2-gamma" in guidekit_cli("train", "weighted", "--help").out
    assert "--p2-gamma" not in guidekit_cli("train", "count", "--help").out
    bad = guidekit_cli("train", "count", "--p2-gamma", "1")
    assert_one_line_error(bad.code, bad.err, "unexpected argument")
    # the weighting's options arrive resolved: given ones parsed, the rest their defaults
    weighted = guidekit_cli("train", "weighted", "--weighting", "p2", "--p2-gamma", "0.5",
                            "--json")
    assert json.loads(weighted.out) == {"weighting": {"p2_gamma": 0.5, "p2_k": 1.0}}
    assert guidekit_cli("train", "count").out.strip() == "1 2"


def test_guidekit_commands_plugin_commands_run_and_reach_the_cli_reference(
        monkeypatch, guidekit_plugins, guidekit_cli):
    mine = typer.Typer(help="My method's tools.", no_args_is_help=True)

    @mine.command("hello")
    def hello(name: str = typer.Option("world", help="Whom to greet.")) -> None:
        """Say hello."""
        typer.echo(f"hello {name}")

    def add_commands(cli: typer.Typer) -> None:
        cli.add_typer(mine, name="mine")

        @cli.command("ping")
        def ping(json_out: bool = typer.Option(False, "--json", help="As JSON.")) -> None:
            """Answer pong."""
            typer.echo(json.dumps({"ping": "pong"}) if json_out else "pong")

    guidekit_plugins(make_plugin(monkeypatch, "gk_test_commands",
                                 guidekit_commands=add_commands))
    result = guidekit_cli("mine", "hello", "--name", "you")
    assert result.code == 0 and result.out.strip() == "hello you"
    assert json.loads(guidekit_cli("ping", "--json").out) == {"ping": "pong"}

    # the CLI reference of the docs is generated from the same command tree
    docs = str(Path(__file__).resolve().parents[1] / "docs")
    sys.path.insert(0, docs)
    try:
        from _reference.cli import cli_markdown, current_command
    finally:
        sys.path.remove(docs)
    page = cli_markdown(current_command())
    assert "## `guidekit mine hello` { #guidekit-mine-hello }" in page
    assert "`--name TEXT` | Whom to greet." in page
    assert "## `guidekit ping`" in page


def test_guidekit_quickstart_steps_plugin_step_reaches_the_report(
        monkeypatch, guidekit_plugins, guidekit_cli, guidekit_dpm, tmp_path):
    from guidekit import builtin

    def ddpm_step(ctx):  # the core's step, standing in: the tiny DPM instead of training one
        shutil.copytree(guidekit_dpm, ctx.out / "ddpm")
        return guidekit.StepReport("DDPM (test stand-in)")

    seen = []

    def more_samples(ctx):
        seen.append(sorted(ctx.results))
        x = guidekit.sample(guidekit.load_dpm(ctx.out / "ddpm"), 4, steps=2, seed=ctx.seed)
        grid = guidekit.save_image_grid(x, ctx.out / "mine" / "samples.png", scale=2)
        return guidekit.StepReport("More samples", images=[grid], text="from the plugin",
                                   metrics={"std": float(x.std())},
                                   tables={"per image": [{"i": i} for i in range(4)]})

    monkeypatch.setattr(builtin, "quickstart_ddpm", ddpm_step)
    guidekit_plugins(make_plugin(monkeypatch, "gk_test_quickstart",
                                 guidekit_quickstart_steps=lambda: [
        guidekit.QuickstartStep("mine", more_samples, order=15)]))
    out = tmp_path / "qs"
    result = guidekit_cli("quickstart", "--out", out, "--fast", "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert list(summary["steps"]) == ["ddpm", "mine"] and seen == [["ddpm"]]
    assert summary["steps"]["mine"]["images"] == [str(out / "mine" / "samples.png")]
    html = (out / "report.html").read_text()
    assert "<h2>More samples" in html and "from the plugin" in html
    assert html.count("data:image/png;base64,") == 1
    assert json.loads((out / "summary.json").read_text())["steps"]["mine"]["metrics"]["std"] > 0


def test_guidekit_guidances_two_plugins_compose_by_summing(
        monkeypatch, guidekit_plugins, guidekit_dpm):
    contexts = []

    def build(sign: float):
        def make(ctx):
            contexts.append(ctx)
            return lambda inp: sign * ctx.options["push"] * torch.ones_like(inp.x_t)
        return make

    push = guidekit.Option("push", float, 1.0)
    guidekit_plugins(make_plugin(monkeypatch, "gk_test_guidances", guidekit_guidances=lambda: [
        guidekit.GuidanceSpec("up", build(1.0), options=[push]),
        guidekit.GuidanceSpec("down", build(-1.0), options=[push])]))
    dpm = guidekit.load_dpm(guidekit_dpm)
    plain = guidekit.sample(dpm, 3, steps=4, seed=2, clip_x0=False)
    up = guidekit.GuidanceRequest("up", 2.0, options={"push": 0.5})
    down = guidekit.GuidanceRequest("down", 1.0)
    cancelled = guidekit.sample(dpm, 3, steps=4, seed=2, clip_x0=False, guidance=[up, down])
    pushed = guidekit.sample(dpm, 3, steps=4, seed=2, clip_x0=False, guidance=[up])
    # 2·0.5·(+1) + 1·(−1) = 0: the shifts cancel; one alone raises every pixel
    torch.testing.assert_close(cancelled, plain)
    assert bool((pushed >= plain).all()) and float(pushed.mean()) > float(plain.mean())
    assert [c.num_samples for c in contexts] == [3, 3, 3]
    assert contexts[0].options == {"push": 0.5} and contexts[0].checkpoint_dir == guidekit_dpm
