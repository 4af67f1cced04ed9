"""``guidekit eval samples`` end to end on the tiny DPM and a tiny judge: its JSON figures are
the ones the Python API gives on the same samples, the same seed gives the same numbers, the
grid is written, judged accuracy appears with target classes, and mistakes are one line."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from guidekit_classifier.quality import (
    diversity,
    evaluate_samples,
    reference_images,
    sample_quality,
)
from guidekit_classifier.training import (
    JUDGE_KIND,
    load_classifier,
    predict,
)
from PIL import Image

from guidekit.ddpm import load_dpm
from guidekit.sampling import GuidanceRequest, sample
from guidekit.testing import assert_grid_layout, assert_one_line_error, run_cli

FIGURES = ("fd", "precision", "recall", "density", "coverage")


@pytest.fixture(scope="module")
def models(classifier_models) -> dict[str, Path]:
    return classifier_models


def base_args(models, out: Path, *extra: str) -> list[str]:
    return ["eval", "samples", "--checkpoint", str(models["ddpm"]), "--judge",
            str(models["judge"]), "--n", "12", "--steps", "2", "--k", "3", "--out-dir",
            str(out), "--device", "cpu", *extra]


def test_json_figures_match_the_python_api(models, capsys, tmp_path):
    code, out, err = run_cli(capsys, *base_args(models, tmp_path / "a"), "--seed", "3",
                             "--json")
    assert code == 0, err
    result = json.loads(out)
    assert all(math.isfinite(result[m]) for m in FIGURES)
    assert 0 <= result["precision"] <= 1 and 0 <= result["coverage"] <= 1
    assert (result["n"], result["n_real"], result["data"], result["k"]) == (12, 12, "digits", 3)
    assert result["feature_dim"] == 16 and "judged_accuracy" not in result
    assert "inception_fid" not in result
    grid = Path(result["grid"])
    assert grid == tmp_path / "a" / "samples.png" and Image.open(grid).size[0] > 12 * 16
    # by hand: the same samples, the same held-out subset, the same metrics
    dpm, judge = load_dpm(models["ddpm"]), load_classifier(models["judge"], JUDGE_KIND)
    x = sample(dpm, 12, steps=2, seed=3)
    want = sample_quality(judge, reference_images("digits", 12, seed=3), x, k=3)
    for m in FIGURES:
        assert result[m] == pytest.approx(want[m], rel=1e-9, abs=1e-12)


def test_same_seed_same_numbers_other_seed_others(models, capsys, tmp_path):
    runs = []
    for seed in ("0", "0", "1"):
        code, out, err = run_cli(capsys, *base_args(models, tmp_path), "--seed", seed, "--json")
        assert code == 0, err
        runs.append({m: json.loads(out)[m] for m in FIGURES})
    assert runs[0] == runs[1]
    assert runs[0]["fd"] != runs[2]["fd"]


def test_table_and_default_out_dir(models, capsys, tmp_path):
    # a copy of the DPM: the default grid goes into CHECKPOINT/eval_samples
    import shutil

    dpm = tmp_path / "ddpm"
    shutil.copytree(models["ddpm"], dpm)
    code, out, err = run_cli(capsys, "eval", "samples", "--checkpoint", str(dpm), "--judge",
                             str(models["judge"]), "--n", "8", "--steps", "1", "--k", "2")
    assert code == 0, err
    assert (dpm / "eval_samples" / "samples.png").is_file()
    for word in ("metric", "fd", "precision", "recall", "density", "coverage",
                 "not comparable to Inception FID", "8 samples vs 8 held-out"):
        assert word in out


def test_judged_accuracy_with_classifier_guidance(models, capsys, tmp_path):
    guide = ["--guidance", "classifier", "--scale", "2", "--classifier",
             str(models["classifier"])]
    code, out, err = run_cli(capsys, *base_args(models, tmp_path), "--n", "20",
                             "--class-per-row", *guide, "--json")
    assert code == 0, err
    result = json.loads(out)
    dpm, judge = load_dpm(models["ddpm"]), load_classifier(models["judge"], JUDGE_KIND)
    req = GuidanceRequest("classifier", 2.0, options={"classifier": str(models["classifier"])})
    x = sample(dpm, 20, steps=2, guidance=[req], class_per_row=True)
    target = torch.arange(10).repeat_interleave(2)
    want = float((predict(judge, x).argmax(-1) == target).double().mean())
    assert result["judged_accuracy"] == pytest.approx(want)
    assert result["diversity"] == pytest.approx(diversity(x, target))  # same-class L2
    assert result["guidance"] == [{"name": "classifier", "scale": 2.0, "schedule": "constant"}]
    # one labelled row per class, 2 a row (16 px digits at scale 4)
    assert_grid_layout(result["grid"], 10, 2, 16 * 4 + 1, row_labels=True)


def test_python_api_reports_settings_and_samples(models):
    dpm, judge = load_dpm(models["ddpm"]), load_classifier(models["judge"], JUDGE_KIND)
    res = evaluate_samples(dpm, judge, 10, k=2, steps=1, n_real=30, seed=2)
    assert res["samples"].shape == (10, 1, 16, 16) and res["n_real"] == 30
    assert res["accuracy_note"].startswith("no target classes")


def fake_inception(monkeypatch, tmp_path) -> Path:
    """A stand-in for torch-fidelity's Inception (see tests/test_quality.py) and its weights."""

    class FakeInception(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2048, bias=False)
            self.load_state_dict(torch.load(feature_extractor_weights_path, weights_only=True))

        def forward(self, x):
            return (self.proj(x.float().mean((2, 3)) / 255),)

    mod = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    mod.FeatureExtractorInceptionV3 = FakeInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", mod)
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"proj.weight": torch.randn(2048, 3)}, weights)
    return weights


def test_fid_weights_add_inception_fid(models, capsys, tmp_path, monkeypatch):
    weights = fake_inception(monkeypatch, tmp_path)
    code, out, err = run_cli(capsys, *base_args(models, tmp_path), "--fid-weights",
                             str(weights), "--json")
    assert code == 0, err
    assert math.isfinite(json.loads(out)["inception_fid"])


def test_fid_without_the_library_is_one_line(models, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    code, _, err = run_cli(capsys, *base_args(models, tmp_path), "--fid-weights",
                           str(tmp_path / "w.pth"))
    assert_one_line_error(code, err, "pip install 'guidekit[fid]'", "torchvision")


def test_fid_without_the_weights_is_one_line(models, capsys, tmp_path, monkeypatch):
    fake_inception(monkeypatch, tmp_path)
    code, _, err = run_cli(capsys, *base_args(models, tmp_path), "--fid-weights",
                           str(tmp_path / "missing.pth"))
    assert_one_line_error(code, err, "weights-inception-2015-12-05-6726825d.pth",
                          "torch-fidelity/releases", "--fid-weights")


@pytest.mark.parametrize("extra, needles", [
    (("--n", "1"), ("--n must be an integer >= 2",)),
    (("--k", "12"), ("--k 12 must be below",)),
    (("--k", "0"), ("--k must be an integer >= 1",)),
    (("--n-real", "400"), ("297 held-out images, fewer than the 400",)),
    (("--data", "no-such-data"), ("unknown dataset 'no-such-data'",)),
    (("--data", "shapes"), ("'shapes' has 3x16x16 images but the DPM makes 1x16x16",)),
    (("--class", "3"), ("unconditional", "--guidance classifier")),
    (("--scale", "2"), ("need a --guidance NAME",)),
    (("--seed", "-1"), ("--seed must be an integer",)),
    (("--spacing", "leading", "--respacing", "ddim2"), ("--spacing", "not both")),
])
def test_bad_input_is_one_line(models, capsys, tmp_path, extra, needles):
    code, _, err = run_cli(capsys, *base_args(models, tmp_path), *extra)
    assert_one_line_error(code, err, *needles)


def test_bad_judges_are_one_line(models, tiny_judge_dir, capsys, tmp_path):
    args = base_args(models, tmp_path)
    i = args.index("--judge") + 1
    for judge, needles in (
        (tmp_path / "absent", ("absent",)),
        (models["ddpm"], ("ddpm", "judge")),  # a checkpoint of another kind
        (models["classifier"], ("classifier", "judge")),
        (tiny_judge_dir(8),
         ("takes 1x8x8 images but the DPM makes 1x16x16", "train a judge on the DPM's data")),
    ):
        args[i] = str(judge)
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, *needles)


def test_missing_checkpoint_is_one_line(models, capsys, tmp_path):
    args = base_args(models, tmp_path)
    args[args.index("--checkpoint") + 1] = str(tmp_path / "no-dpm")
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, "no-dpm")
