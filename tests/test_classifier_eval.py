"""``guidekit eval guidance`` and its Python API on tiny models: the numbers it reports are the
ones a hand computation on its samples gives, its files are written, its mistakes are one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from guidekit_classifier.evaluate import (
    diversity,
    evaluate_guidance,
    plot_sweep,
    quickstart_guidance,
)
from guidekit_classifier.training import (
    JUDGE_KIND,
    KIND,
    load_classifier,
    predict,
)
from PIL import Image

from guidekit.cli.params import parse_scales
from guidekit.ddpm import load_dpm
from guidekit.errors import GuidekitError
from guidekit.sampling import GuidanceRequest, sample
from guidekit.specs import QuickstartContext
from guidekit.testing import assert_grid_layout, assert_one_line_error, run_cli

PER_CLASS = 2


@pytest.fixture(scope="module")
def models(classifier_models) -> dict[str, Path]:
    """The tiny DPM (T = 100) with a tiny classifier on its schedule and a tiny judge."""
    return classifier_models


@pytest.fixture(scope="module")
def loaded(models):
    return (load_dpm(models["ddpm"]), load_classifier(models["classifier"], KIND),
            load_classifier(models["judge"], JUDGE_KIND))


def test_rows_match_a_hand_computation(models, loaded):
    dpm, clf, judge = loaded
    res = evaluate_guidance(dpm, clf, judge, [0, 3.0], steps=3, per_class=PER_CLASS, seed=1)
    rows = res["scales"]
    assert [r["scale"] for r in rows] == [0.0, 3.0]
    assert res["best_scale"] in (0.0, 3.0)
    classes = torch.arange(10).repeat_interleave(PER_CLASS)
    assert torch.equal(res["classes"], classes)
    for r, x in zip(rows, res["samples"], strict=True):
        assert x.shape == (10 * PER_CLASS, 1, 16, 16)
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["confidence"] <= 1 and r["diversity"] >= 0
        # accuracy and confidence from the judge's probabilities, by hand
        p = predict(judge, x, 0)
        hits = [int(p[i].argmax()) == int(classes[i]) for i in range(len(x))]
        assert r["accuracy"] == pytest.approx(sum(hits) / len(x))
        conf = [float(p[i, classes[i]]) for i in range(len(x))]
        assert r["confidence"] == pytest.approx(sum(conf) / len(x), abs=1e-6)
    # diversity by explicit loops: mean over classes of the mean distance over pairs i < j
    x = res["samples"][1]
    per_class = []
    for c in range(10):
        idx = [i for i in range(len(x)) if int(classes[i]) == c]
        d = [float((x[i].double() - x[j].double()).pow(2).sum().sqrt())
             for a, i in enumerate(idx) for j in idx[a + 1:]]
        per_class.append(sum(d) / len(d))
    assert rows[1]["diversity"] == pytest.approx(sum(per_class) / 10, rel=1e-9)
    assert diversity(x, classes) == rows[1]["diversity"]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samples_are_those_of_guidekit_sample(models, loaded, sampler):
    """Scale 0 is unguided sampling; scale s is `guidekit sample --guidance classifier
    --class-per-row --scale s` with the same seed and steps."""
    dpm, clf, judge = loaded
    res = evaluate_guidance(dpm, clf, judge, [0, 2.0], sampler=sampler, steps=3,
                            per_class=PER_CLASS, seed=2)
    n = 10 * PER_CLASS
    unguided = sample(dpm, n, sampler=sampler, steps=3, seed=2)
    request = GuidanceRequest("classifier", 2.0, "constant",
                              {"classifier": str(models["classifier"])})
    guided = sample(dpm, n, sampler=sampler, steps=3, seed=2, guidance=[request],
                    class_per_row=True)
    torch.testing.assert_close(res["samples"][0], unguided)
    torch.testing.assert_close(res["samples"][1], guided)
    assert not torch.equal(res["samples"][0], res["samples"][1])


def test_cli_writes_plot_and_grid(models, tmp_path, capsys):
    out = tmp_path / "ev"
    code, stdout, _ = run_cli(
        capsys, "eval", "guidance", "--checkpoint", str(models["ddpm"]), "--classifier",
        str(models["classifier"]), "--judge", str(models["judge"]), "--scales", "0,1",
        "--sampler", "ddpm", "--steps", "2", "--per-class", str(PER_CLASS),
        "--guidance-schedule", "t:0:50", "--out-dir", str(out), "--json",
    )
    assert code == 0
    res = json.loads(stdout)
    assert res["sampler"] == "ddpm" and res["steps"] == 2
    assert [r["scale"] for r in res["scales"]] == [0.0, 1.0]
    assert set(res["scales"][0]) >= {"scale", "accuracy", "confidence", "diversity"}
    assert Path(res["plot"]) == out / "sweep.png" and Path(res["grid"]).parent == out
    with Image.open(res["plot"]) as im:
        assert im.format == "PNG"
    # one labelled row per class, per_class images per row, a title above
    assert_grid_layout(res["grid"], 10, PER_CLASS, 16 * 4 + 1, row_labels=True)


def test_cli_table_and_default_out_dir(models, tmp_path, capsys):
    clf = tmp_path / "clf"
    shutil.copytree(models["classifier"], clf)  # the default out dir goes beside the classifier
    code, stdout, _ = run_cli(
        capsys, "eval", "guidance", "--checkpoint", str(models["ddpm"]), "--classifier",
        str(clf), "--judge", str(models["judge"]), "--scales", "0", "--steps", "2",
        "--per-class", "2",
    )
    assert code == 0
    assert "accuracy" in stdout and "diversity" in stdout
    assert (clf / "eval_ddim" / "sweep.png").is_file()
    assert (clf / "eval_ddim" / "best_grid.png").is_file()


def test_judge_must_not_be_the_guide(models, capsys):
    code, _, err = run_cli(
        capsys, "eval", "guidance", "--checkpoint", str(models["ddpm"]), "--classifier",
        str(models["classifier"]), "--judge", str(models["classifier"]) + "/",
    )
    assert_one_line_error(code, err, "the judge must not be the guiding classifier")


@pytest.mark.parametrize("text", ["", "0,x", "1,,nan", "inf"])
def test_bad_scales(models, capsys, text):
    code, _, err = run_cli(
        capsys, "eval", "guidance", "--checkpoint", str(models["ddpm"]), "--classifier",
        str(models["classifier"]), "--judge", str(models["judge"]), "--scales", text,
    )
    assert_one_line_error(code, err, "--scales")


def test_parse_scales():
    assert parse_scales(" 0, 1.5,8 ") == [0.0, 1.5, 8.0]


def test_judge_of_another_image_size(models, tiny_judge_dir, capsys):
    judge8 = tiny_judge_dir(8)
    code, _, err = run_cli(
        capsys, "eval", "guidance", "--checkpoint", str(models["ddpm"]), "--classifier",
        str(models["classifier"]), "--judge", str(judge8), "--steps", "1",
    )
    assert_one_line_error(code, err, "judge", "1x8x8", "1x16x16")


def test_api_errors(loaded):
    dpm, clf, judge = loaded
    with pytest.raises(GuidekitError, match="per-class"):
        evaluate_guidance(dpm, clf, judge, [1.0], per_class=1)
    with pytest.raises(GuidekitError, match="sampler"):
        evaluate_guidance(dpm, clf, judge, [1.0], sampler="euler")
    with pytest.raises(GuidekitError, match="judge must not"):
        evaluate_guidance(dpm, clf, clf, [1.0])


def test_plot_sweep_takes_one_or_several_sweeps(tmp_path):
    rows = [{"scale": s, "accuracy": a, "confidence": a / 2, "diversity": 5 - s}
            for s, a in [(0, 0.1), (2, 0.6), (4, 0.9)]]
    for path, arg in [(tmp_path / "one.png", rows),
                      (tmp_path / "two.png", {"DDIM-50": rows, "DDPM-100": rows[::-1]})]:
        assert plot_sweep(arg, path) == path
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_quickstart_step_fast(models, tmp_path):
    """The quickstart step on the checkpoints earlier steps leave (tiny ones here)."""
    for name in ("ddpm", "judge", "classifier"):
        shutil.copytree(models[name], tmp_path / name)
    report = quickstart_guidance(QuickstartContext(out=tmp_path, seed=0, fast=True,
                                                   progress=False))
    sweeps, (title, unguided) = list(report.tables.values())[:2], list(report.tables.items())[2]
    for rows in sweeps:
        assert [r["scale"] for r in rows] == [0.0, 8.0]
        assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert title.startswith("unguided samples against held-out digits")
    assert [r["images"] for r in unguided] == ["DDIM-4", "DDPM-4", "training digits",
                                               "shuffled digits"]
    assert [p.name for p in report.images] == ["guidance_sweep.png", "guided_ddim.png",
                                               "guided_ddpm.png"]
    assert all(p.is_file() and p.parent == tmp_path / "classifier" for p in report.images)
    assert {"ddim_best_accuracy", "ddpm_best_accuracy", "seconds"} <= set(report.metrics)
    digits, guided = report.claims
    assert "look like digits" in digits.claim and "DDIM-4" in digits.evidence
    best = [max(r["accuracy"] for r in rows) for rows in sweeps]
    assert guided.holds == all(a >= 0.9 for a in best)


@pytest.mark.slow
def test_quickstart_fast_end_to_end(tmp_path):
    """`guidekit quickstart --fast` runs every step, this one included, into the report."""
    from guidekit.quickstart import run_quickstart

    summary = run_quickstart(tmp_path, fast=True, progress=False)
    step = summary["steps"]["guidance"]
    assert len(step["tables"]) == 3 and len(step["images"]) == 3
    # every step with figures to check reports its claims; --fast is not expected to pass them
    assert {c["step"] for c in summary["claims"]} == {"guidance", "pdae", "pdae-autoencoding"}
    assert summary["claims_hold"] == all(c["holds"] for c in summary["claims"])
    assert "Guidance scale sweep" in (tmp_path / "report.html").read_text()
