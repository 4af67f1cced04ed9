"""The fixtures guidekit ships to plugin authors (guidekit/pytest_plugin.py), used here the
way a plugin's own tests use them: no conftest, just the fixture names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guidekit import plugins
from guidekit.ddpm import load_dpm

FIXTURES = Path(__file__).parent / "plugin_fixtures"


def test_guidekit_dpm_is_a_real_tiny_checkpoint(guidekit_dpm):
    dpm = load_dpm(guidekit_dpm)
    assert dpm.image_shape == (1, 16, 16)
    assert dpm.schedule.num_steps == 100
    x = dpm.sampler(steps="ddim4").ddim(shape=(2, *dpm.image_shape))
    assert x.shape == (2, 1, 16, 16) and bool(x.isfinite().all())


def test_guidekit_plugins_loads_exactly_the_named_plugins(guidekit_plugins):
    only_p2 = guidekit_plugins("guidekit_p2")
    assert "p2" in only_p2.names("weighting")
    assert "classifier" not in only_p2.names("guidance")
    assert plugins.get_registry() is only_p2  # what the CLI and samplers now see
    everything = guidekit_plugins()
    assert {"classifier", "pdae"} <= set(everything.names("guidance"))


def test_guidekit_plugins_takes_a_module_path_and_fails_loudly(guidekit_plugins, monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    reg = guidekit_plugins("gk_toward")  # not installed: imported by module path
    assert reg.owners[("guidance", "toward")] == "gk_toward"
    with pytest.raises(AssertionError, match="gk_broken_import"):
        guidekit_plugins("gk_broken_import")


def test_guidekit_cli_runs_in_process(guidekit_cli, guidekit_dpm, tmp_path):
    listed = guidekit_cli("plugins", "--json")
    assert listed.code == 0, listed.err
    assert "guidekit" in {p["name"] for p in json.loads(listed.out)["plugins"]}
    bad = guidekit_cli("sample", "--checkpoint", guidekit_dpm, "--guidance", "nope",
                       "--out", tmp_path / "g.png")
    assert bad.code == 2 and "unknown guidance 'nope'" in bad.err
