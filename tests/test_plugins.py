"""The plugin system: loading, the registry, duplicates, broken plugins, the environment
switches, and the rule that every hook is documented and tested."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guidekit import plugins
from guidekit.errors import PluginError
from guidekit.schedule import NoiseSchedule, ScheduleConfig

FIXTURES = Path(__file__).parent / "plugin_fixtures"
TESTS = Path(__file__).parent


def _use(monkeypatch, *modules: str) -> plugins.Registry:
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.setenv("GUIDEKIT_PLUGINS", ",".join(modules))
    plugins.reset()
    return plugins.get_registry()


def test_builtin_plugins_load_through_entry_points(fresh_plugins):
    fresh_plugins.delenv("GUIDEKIT_PLUGINS", raising=False)
    fresh_plugins.delenv("GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    reg = plugins.get_registry()
    assert reg.owners[("weighting", "p2")] == "p2"
    assert reg.owners[("weighting", "uniform")] == "guidekit"
    assert {"digits", "shapes"} <= set(reg.names("dataset"))
    assert "ddpm" in reg.names("trainer")
    assert "unet" in reg.names("model")
    assert "ddpm" in reg.names("quickstart step")


def test_disable_autoload_keeps_only_the_core(fresh_plugins):
    fresh_plugins.setenv("GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    fresh_plugins.delenv("GUIDEKIT_PLUGINS", raising=False)
    reg = plugins.get_registry()
    assert "p2" not in reg.names("weighting")
    assert "uniform" in reg.names("weighting")
    assert [p.name for p in reg.plugins] == ["guidekit"]


def test_guidekit_plugins_env_restricts_to_named(fresh_plugins):
    fresh_plugins.setenv("GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = _use(fresh_plugins, "p2")  # an entry-point name, loaded although autoload is off
    assert "p2" in reg.names("weighting")


def test_duplicate_name_names_both_plugins(fresh_plugins):
    reg = _use(fresh_plugins, "p2", "gk_dup_p2")
    (owner, msg), = reg.failures
    assert owner == "gk_dup_p2" and reg.owners[("weighting", "p2")] == "p2"
    assert "weighting 'p2'" in msg and "'p2'" in msg and "'gk_dup_p2'" in msg


def test_broken_import_is_reported_and_the_rest_loads(fresh_plugins):
    reg = _use(fresh_plugins, "gk_broken_import", "p2")
    assert [n for n, _ in reg.failures] == ["gk_broken_import"]
    assert "ModuleNotFoundError" in reg.failures[0][1]
    assert "p2" in reg.names("weighting")


def test_failing_hook_drops_the_whole_plugin(fresh_plugins):
    reg = _use(fresh_plugins, "gk_bad_hook")
    assert "half-registered" not in reg.names("guidance")
    assert reg.failures and reg.failures[0][0] == "gk_bad_hook"
    assert "weighting table unavailable" in reg.failures[0][1]
    assert "gk_bad_hook" not in [p.name for p in reg.plugins]


def test_unknown_name_lists_choices(fresh_plugins):
    reg = _use(fresh_plugins, "p2")
    with pytest.raises(PluginError, match="unknown weighting 'p3': choose one of p2, uniform"):
        reg.weighting("p3")


def test_guidekit_weightings_p2_matches_formula(fresh_plugins):
    reg = _use(fresh_plugins, "p2")
    sched = NoiseSchedule.from_config(ScheduleConfig())
    snr = sched.float64["snr"]
    for gamma, k in [(1.0, 1.0), (0.5, 1.0), (0.0, 1.0)]:
        w = reg.weighting("p2").weights(sched, p2_gamma=gamma, p2_k=k)
        torch.testing.assert_close(w, (1 / (k + snr) ** gamma).float())
    assert torch.equal(reg.weighting("uniform").weights(sched), torch.ones(1000))


def test_guidekit_guidances_third_party_guidance_is_used_by_the_sampler(
        fresh_plugins, guidekit_dpm):
    reg = _use(fresh_plugins, "gk_toward")
    assert reg.owners[("guidance", "toward")] == "gk_toward"
    import gk_toward

    from guidekit.cli.params import requests_from_cli
    from guidekit.ddpm import load_dpm
    from guidekit.sampling import sample

    dpm = load_dpm(guidekit_dpm)
    plain = sample(dpm, 4, steps=5, seed=1)
    req = requests_from_cli(["toward"], [3.0], [], ["--toward-value", "0.5"], options_of)
    assert req[0].options == {"toward_value": 0.5}
    gk_toward.CALLS.clear()
    guided = sample(dpm, 4, steps=5, seed=1, guidance=req)
    assert len(gk_toward.CALLS) == 5
    seen = torch.cat(gk_toward.CALLS).unique()
    assert set(seen.tolist()) <= set(dpm.schedule.respace("ddim5").timesteps.tolist())
    assert not torch.allclose(plain, guided)


def test_plugin_option_errors_are_one_line(fresh_plugins):
    _use(fresh_plugins, "gk_toward")
    from guidekit.cli.params import requests_from_cli
    from guidekit.errors import GuidekitError

    with pytest.raises(GuidekitError, match="--toward-value"):
        requests_from_cli(["toward"], [], [], ["--toward-value", "abc"], options_of)
    with pytest.raises(GuidekitError, match="No such option"):
        requests_from_cli(["toward"], [], [], ["--nope", "1"], options_of)


def options_of(name):
    from guidekit.lookup import guidance_spec

    return guidance_spec(name).options


def _cli(args, env_extra=None, cwd=None):
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "guidekit", *args], capture_output=True, text=True, env=env,
        cwd=cwd, timeout=120,
    )


def test_guidekit_commands_and_plugins_json_via_cli():
    env = {"PYTHONPATH": str(FIXTURES), "GUIDEKIT_PLUGINS": "p2,gk_toward,gk_broken_import"}
    res = _cli(["plugins", "--json"], env)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["gk_toward"]["version"] == "9.9"
    assert by_name["gk_toward"]["registers"] == {"guidance": ["toward"]}
    assert by_name["p2"]["registers"] == {"weighting": ["p2"]}
    assert data["failed"][0]["name"] == "gk_broken_import"
    # the broken plugin is one line on stderr, and the rest of the CLI works
    assert res.stderr.count("\n") == 1 and "gk_broken_import" in res.stderr
    hello = _cli(["hello-toward"], env)
    assert hello.returncode == 0 and "hello from toward" in hello.stdout


def test_broken_entry_point_plugin_does_not_take_the_cli_down(tmp_path):
    dist = tmp_path / "guidekit_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: guidekit-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[guidekit]\nbroken = guidekit_broken_mod\n")
    (tmp_path / "guidekit_broken_mod.py").write_text("raise ImportError('needs libfoo')\n")
    res = _cli(["plugins", "--json"], {"PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0
    assert "plugin 'broken' failed to load and was skipped: ImportError: needs libfoo" in (
        res.stderr
    )
    assert "p2" in {p["name"] for p in json.loads(res.stdout)["plugins"]}


def test_guidekit_models_rebuild_from_config(fresh_plugins):
    reg = _use(fresh_plugins, "p2")
    spec = reg.model("unet")
    model = spec.model_class(spec.config_class.from_dict({"image_size": 16}))
    assert model(torch.zeros(2, 1, 16, 16), torch.tensor([1, 2])).shape == (2, 1, 16, 16)


def test_guidekit_datasets_load_by_name(fresh_plugins):
    reg = _use(fresh_plugins, "p2")
    assert reg.dataset("digits").load("test", None, 0).images.shape[1:] == (1, 16, 16)
    from guidekit.lookup import load_dataset

    assert load_dataset("shapes", "test").images.shape[1:] == (3, 32, 32)


def test_guidekit_trainers_registered_as_train_subcommands():
    res = _cli(["train", "--help"])
    assert res.returncode == 0 and "ddpm" in res.stdout


def test_guidekit_quickstart_steps_run_in_order(fresh_plugins, tmp_path, monkeypatch):
    from guidekit.quickstart import run_quickstart
    from guidekit.specs import QuickstartStep, StepReport

    reg = _use(fresh_plugins, "p2")
    order = []

    def step(name):
        def run(ctx):
            order.append((name, sorted(ctx.results)))
            return StepReport(name, metrics={"x": 1.5})
        return run

    reg.specs["quickstart step"] = {
        "b": QuickstartStep("b", step("b"), order=20),
        "a": QuickstartStep("a", step("a"), order=10),
    }
    summary = run_quickstart(tmp_path, progress=False)
    assert order == [("a", []), ("b", ["a"])]
    html = Path(summary["report"]).read_text()
    assert "<h2>a" in html and "<h2>b" in html
    assert json.loads((tmp_path / "summary.json").read_text())["steps"]["b"]["metrics"] == {
        "x": 1.5
    }


def test_guidekit_commands_failure_costs_only_that_plugin():
    env = {"PYTHONPATH": str(FIXTURES), "GUIDEKIT_PLUGINS": "p2,gk_toward,gk_bad_commands"}
    res = _cli(["hello-toward"], env)
    assert res.returncode == 0 and "hello from toward" in res.stdout
    assert "plugin 'gk_bad_commands' could not add its commands: ImportError" in res.stderr


def test_diverged_guided_sampling_is_one_line_and_writes_nothing(
        fresh_plugins, guidekit_dpm, tmp_path, capsys):
    from guidekit.testing import assert_one_line_error, run_cli

    _use(fresh_plugins, "gk_toward")
    out = tmp_path / "g.png"
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm), "--steps", "3",
                           "--n", "2", "--sampler", "ddpm", "--guidance", "toward",
                           "--toward-value", "inf", "--out", str(out), "--json")
    assert_one_line_error(code, err, "2 of 2 samples diverged", "--scale")
    assert not out.exists()
