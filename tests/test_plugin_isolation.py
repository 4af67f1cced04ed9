"""One bad plugin cannot stop guidekit: each way a plugin can fail ends in one line naming it
and the fix, and every other command (``guidekit plugins`` above all) still works.

The plugins are the modules in ``plugin_fixtures/``, loaded as third-party plugins are; the
exit and output cases run ``python -m guidekit`` in a subprocess, since they are about what a
real process prints and returns.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guidekit import plugins
from guidekit.testing import assert_one_line_error, run_cli

FIXTURES = Path(__file__).parent / "plugin_fixtures"


def cli(*args: str, plugins_: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(FIXTURES), "GUIDEKIT_PLUGINS": plugins_, **env}
    return subprocess.run([sys.executable, "-m", "guidekit", *args], capture_output=True,
                          text=True, env=environ, timeout=120)


def use(monkeypatch: pytest.MonkeyPatch, *modules: str) -> plugins.Registry:
    monkeypatch.syspath_prepend(str(FIXTURES))
    monkeypatch.setenv("GUIDEKIT_PLUGINS", ",".join(modules))
    plugins.reset()
    return plugins.get_registry()


def failure(reg: plugins.Registry, name: str) -> str:
    reasons = [why for who, why in reg.failures if who == name]
    assert reasons, f"{name} is not reported: {reg.failures}"
    assert name not in [p.name for p in reg.plugins]
    return reasons[0]


# --------------------------------------------------------------------------- exits


@pytest.mark.parametrize("command", [["--help"], ["plugins"], ["train", "--help"]])
def test_sys_exit_at_import_is_reported_and_commands_run(command):
    res = cli(*command, plugins_="gk_exit_import,p2")
    assert res.returncode == 0, res.stderr
    assert ("plugin 'gk_exit_import' failed to load and was skipped: it called sys.exit(3)"
            in res.stderr)
    assert res.stdout.strip()


def test_sys_exit_in_a_hook_does_not_end_the_command():
    res = cli("plugins", "--json", plugins_="gk_exit_hook,p2")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert "guidekit_guidances failed: it called sys.exit(0)" in data["failed"][0]["error"]
    assert "p2" in {p["name"] for p in data["plugins"]}


# --------------------------------------------------------------------------- malformed specs


def test_malformed_specs_drop_the_plugin_naming_the_field(fresh_plugins):
    reg = use(fresh_plugins, "gk_bad_specs", "p2")
    why = failure(reg, "gk_bad_specs")
    assert "GuidanceSpec name must be a non-empty string" in why
    assert "p2" in reg.names("weighting")
    res = cli("sample", "--help", plugins_="gk_bad_specs")
    assert res.returncode == 0 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "gk_bad_specs" in res.stderr


def test_spec_fields_are_checked_when_built():
    from guidekit import Option, TrainerSpec, WeightingSpec

    with pytest.raises(TypeError, match="TrainerSpec 'broken-trainer': train must be callable"):
        TrainerSpec("broken-trainer", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="options must be a list of guidekit Option"):
        WeightingSpec("w", lambda s: s, options=["--w"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="option name 'Bad-Name'"):
        Option("Bad-Name")
    with pytest.raises(TypeError, match="guidekit adds --json itself"):
        TrainerSpec("t", lambda ctx: ctx, options=[Option("json", bool)])


# --------------------------------------------------------------------------- collisions


def test_duplicate_name_keeps_plugins_working_and_names_both():
    res = cli("plugins", "--json", plugins_="p2,gk_dup_p2")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    (failed,) = data["failed"]
    assert failed["name"] == "gk_dup_p2"
    assert "weighting 'p2' is registered by both plugin 'p2' and plugin 'gk_dup_p2'" in (
        failed["error"])
    assert "GUIDEKIT_PLUGINS" in failed["error"]
    human = cli("plugins", plugins_="p2,gk_dup_p2")
    assert human.returncode == 0 and "failed gk_dup_p2" in human.stdout


def test_a_plugin_cannot_replace_a_core_command(tmp_path):
    res = cli("sample", "--help", plugins_="gk_takes_sample")
    assert res.returncode == 0
    assert "Sample a grid from a trained DPM" in res.stdout and "hijacked" not in res.stdout
    assert ("plugin 'gk_takes_sample' could not add its commands: command 'sample' is already "
            "guidekit's" in res.stderr)


# --------------------------------------------------------------------------- hook shapes


def test_generator_hook_registers_what_it_yields(fresh_plugins):
    reg = use(fresh_plugins, "gk_generator")
    assert reg.owners[("guidance", "yielded")] == "gk_generator"


def test_misspelt_hook_is_reported_with_the_right_name(fresh_plugins):
    reg = use(fresh_plugins, "gk_misspelt")
    why = failure(reg, "gk_misspelt")
    assert "'guidekit_guidance' is not a guidekit hook (did you mean 'guidekit_guidances'?)" in (
        why)
    assert "never-seen" not in reg.names("guidance")


def test_plugin_output_does_not_reach_json_stdout():
    res = cli("plugins", "--json", plugins_="gk_prints,p2")
    assert res.returncode == 0, res.stderr
    json.loads(res.stdout)  # nothing but the JSON
    assert "hello from the import" in res.stderr and "hello from the hook" in res.stderr


# --------------------------------------------------------------------------- environment


@pytest.mark.parametrize("value", ["off", "0", "false", "No", ""])
def test_disable_autoload_falsy_spellings_keep_autoload_on(fresh_plugins, value):
    fresh_plugins.setenv("GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD", value)
    fresh_plugins.delenv("GUIDEKIT_PLUGINS", raising=False)
    assert "p2" in plugins.get_registry().names("weighting")


@pytest.mark.parametrize("value", ["on", "1", "TRUE", "yes"])
def test_disable_autoload_truthy_spellings_turn_it_off(fresh_plugins, value):
    fresh_plugins.setenv("GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD", value)
    fresh_plugins.delenv("GUIDEKIT_PLUGINS", raising=False)
    assert "p2" not in plugins.get_registry().names("weighting")


def test_disable_autoload_other_spellings_are_one_line(fresh_plugins, capsys):
    fresh_plugins.setenv("GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD", "maybe")
    code, _, err = run_cli(capsys, "plugins")
    assert_one_line_error(code, err, "GUIDEKIT_DISABLE_PLUGIN_AUTOLOAD='maybe'", "1, true")


# --------------------------------------------------------------------------- at run time


@pytest.mark.parametrize("name, needles", [
    ("none", ("guidance 'none' returned NoneType, not a tensor",)),
    ("numpy", ("guidance 'numpy' returned ndarray, not a tensor",)),
    ("double", ("guidance 'double' returned a torch.float64 tensor", "torch.float32")),
    ("inf", ("guidance 'inf' returned non-finite values", "--scale")),
    ("boom", ("guidance 'boom' (plugin 'gk_bad_guidances') failed: RuntimeError: lost its "
              "weights",)),
    ("not-callable", ("guidance 'not-callable': build returned int, not a callable",)),
])
def test_bad_guidance_output_is_one_line_naming_it(fresh_plugins, guidekit_dpm, tmp_path,
                                                   capsys, name, needles):
    use(fresh_plugins, "gk_bad_guidances")
    out = tmp_path / "g.png"
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm), "--steps", "2",
                           "--n", "2", "--guidance", name, "--out", str(out))
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


@pytest.mark.parametrize("data, needles", [
    ("raising", ("dataset 'raising' (plugin 'gk_bad_data') failed: OSError: the data disk",)),
    ("empty", ("dataset 'empty' has no images",)),
])
def test_bad_dataset_is_one_line(fresh_plugins, tmp_path, capsys, data, needles):
    use(fresh_plugins, "gk_bad_data")
    code, _, err = run_cli(capsys, "train", "ddpm", "--data", data, "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize("weighting, needles", [
    ("raising", ("weighting 'raising' (plugin 'gk_bad_data') failed: ZeroDivisionError",)),
    ("negative", ("weighting 'negative' returned negative or all-zero weights",)),
])
def test_bad_weighting_is_one_line_and_trains_nothing(fresh_plugins, tmp_path, capsys,
                                                      weighting, needles):
    use(fresh_plugins, "gk_bad_data")
    out = tmp_path / "x"
    code, _, err = run_cli(capsys, "train", "ddpm", "--weighting", weighting, "--steps", "1",
                           "--out", str(out))
    assert_one_line_error(code, err, *needles)
    assert not (out / "config.json").exists()


def test_an_os_error_about_a_named_file_is_the_users_not_the_plugins():
    from guidekit.lookup import plugin_call

    def reads(path):
        raise FileNotFoundError(2, "No such file or directory", path)

    with pytest.raises(FileNotFoundError) as exc:  # main() prints it as one line
        plugin_call("guidance", "classifier", reads, "/no/such/classifier")
    assert exc.value.filename == "/no/such/classifier"
