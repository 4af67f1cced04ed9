"""The command line: results, and one clear line for each user mistake."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from guidekit.testing import assert_one_line_error, run_cli


def test_sample_writes_grid_and_files(guidekit_dpm, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm), "--steps", "4",
                       "--n", "6", "--out", str(tmp_path / "g.png"), "--out-dir",
                       str(tmp_path / "each"), "--json")
    assert code == 0
    res = json.loads(out)
    assert len(res["files"]) == 6
    with Image.open(res["grid"]) as im:
        assert im.size[0] > 16 * 3
    assert len(list((tmp_path / "each").glob("*.png"))) == 6


def test_sample_ddpm_and_respacing(guidekit_dpm, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm), "--sampler", "ddpm",
                       "--respacing", "3,2", "--n", "2", "--out", str(tmp_path / "g.png"),
                       "--json")
    assert code == 0 and json.loads(out)["n"] == 2


def test_unknown_guidance(guidekit_dpm, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm),
                       "--guidance", "nope", "--out", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, "unknown guidance 'nope'", "guidekit plugins")


def test_unknown_weighting(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "ddpm", "--weighting", "p3", "--out",
                       str(tmp_path / "x"))
    assert_one_line_error(code, err, "unknown weighting 'p3'", "p2", "uniform")


def test_weighting_option_without_that_weighting(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "ddpm", "--p2-gamma", "1", "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "--p2-gamma")


def test_click_usage_errors_are_not_tracebacks(capsys):
    # Parsing errors come from click itself; main() must show them as usage, not crash.
    code, _, err = run_cli(capsys, "train", "ddpm", "--no-such-flag")
    assert code == 2 and "No such option" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "train", "ddpm", "--steps", "abc")
    # click says "'abc' is not a valid integer"; typer >= 0.26 says "Input should be a valid
    # integer": either way a usage error naming the option, not a traceback
    assert code == 2 and "--steps" in err and "valid integer" in err and "Traceback" not in err


def test_unknown_dataset(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "ddpm", "--data", "mnist-nope", "--out",
                       str(tmp_path / "x"))
    assert_one_line_error(code, err, "unknown dataset 'mnist-nope'", "digits")


def test_empty_image_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "train", "ddpm", "--data", str(tmp_path / "empty"), "--out",
                       str(tmp_path / "x"))
    assert_one_line_error(code, err, "no images found")


def test_unreadable_image_folder(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
    code, _, err = run_cli(capsys, "train", "ddpm", "--data", str(tmp_path / "bad"), "--out",
                       str(tmp_path / "x"))
    assert_one_line_error(code, err, "cannot read image", "a.png")


def test_missing_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(tmp_path / "none"))
    assert_one_line_error(code, err, "no checkpoint at")


def test_wrong_kind_checkpoint(guidekit_dpm, tmp_path, capsys):
    out = tmp_path / "judge"
    shutil.copytree(guidekit_dpm, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["kind"] = "judge"
    (out / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(out))
    assert_one_line_error(code, err, "is a 'judge' checkpoint")


def test_wrong_shape_checkpoint(guidekit_dpm, tmp_path, capsys):
    out = tmp_path / "wide"
    shutil.copytree(guidekit_dpm, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"]["config"]["channel_mult"] = [1, 1]
    (out / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(out))
    assert_one_line_error(code, err, "do not match")


def test_bad_sampler_and_scale_mismatch(guidekit_dpm, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm), "--sampler",
                           "euler")
    assert_one_line_error(code, err, "unknown sampler 'euler'")
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm), "--scale", "2")
    assert_one_line_error(code, err, "--guidance")


def test_train_ddpm_cli_json(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "train", "ddpm", "--out", str(tmp_path / "d"), "--steps", "2",
                       "--batch-size", "8", "--model-channels", "8", "--channel-mult", "1,2",
                       "--attention", "", "--timesteps", "50", "--samples", "4",
                       "--weighting", "p2", "--p2-gamma", "0.5", "--json")
    assert code == 0, out
    res = json.loads(out)
    assert res["steps"] == 2
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["weighting"] == {"name": "p2", "options": {"p2_gamma": 0.5, "p2_k": 1.0}}
    assert (tmp_path / "d" / "samples.png").exists()


@pytest.mark.slow
def test_quickstart_fast(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "quickstart", "--out", str(tmp_path / "q"), "--fast", "--json")
    assert code == 0
    summary = json.loads(out)
    assert (tmp_path / "q" / "ddpm" / "config.json").exists()
    assert (tmp_path / "q" / "ddpm" / "samples_ddpm.png").exists()
    assert (tmp_path / "q" / "ddpm" / "samples_ddim.png").exists()
    assert "data:image/png;base64" in (tmp_path / "q" / "report.html").read_text()
    assert summary["steps"]["ddpm"]["metrics"]["steps"] == 30


@pytest.mark.slow
def test_quickstart_fast_fp32_prints_its_claims(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "quickstart", "--out", str(tmp_path / "q"), "--fast",
                           "--fp32")
    assert code == 0
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["bf16"] is False
    for step in ("ddpm", "pdae", "pdae_latent"):
        cfg = json.loads((tmp_path / "q" / step / "config.json").read_text())
        assert cfg["train"]["bf16"] is False
    lines = out.splitlines()[-(2 + len(summary["claims"])):]  # after the progress bars
    held = sum(c["holds"] for c in summary["claims"])
    claims = next(i for i, line in enumerate(lines) if line.startswith("claims: "))
    assert lines[claims].startswith(f"claims: {held} of {len(summary['claims'])} hold")
    assert sum(line.startswith("  did not hold: ") for line in lines) == (
        len(summary["claims"]) - held)
    assert lines[-1] == f"report: {tmp_path / 'q' / 'report.html'}"
