"""``guidekit eval stages`` (stochastic reconstruction from each SNR) and ``eval guidance
--stages`` (classifier guidance in one SNR band) on the tiny DPM, classifier and judge: the
figures are the ones a hand computation gives, the bands split the sampler's steps, the
grids carry their labels, and mistakes are one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from guidekit_classifier.evaluate import evaluate_guidance, guided_samples
from guidekit_classifier.quality import diversity, frechet_distance, judge_features
from guidekit_classifier.stages import (
    STAGE_BANDS,
    evaluate_guidance_stages,
    evaluate_stages,
    reconstruct_from,
    stage_timestep,
)
from guidekit_classifier.training import JUDGE_KIND, KIND, load_classifier, predict

from guidekit.ddpm import load_dpm, train_ddpm
from guidekit.guidance import timestep_weight
from guidekit.lookup import load_dataset
from guidekit.schedule import ScheduleConfig
from guidekit.testing import (
    assert_grid_layout,
    assert_one_line_error,
    run_cli,
    tiny_unet_config,
)
from guidekit.training import TrainConfig

CELL = 16 * 4 + 1  # a 16 px digit at grid scale 4, with its padding


@pytest.fixture(scope="module")
def loaded(classifier_models):
    m = classifier_models
    return (load_dpm(m["ddpm"]), load_classifier(m["classifier"], KIND),
            load_classifier(m["judge"], JUDGE_KIND))


@pytest.fixture(scope="module")
def test_digits():
    data = load_dataset("digits", "test")
    return data.images[:6], data.labels[:6]


def test_stage_timestep_is_the_nearest_snr_in_log(loaded):
    dpm = loaded[0]
    snr = dpm.schedule.float64["snr"]
    for target in (500.0, 1.0, 0.1, 0.01, 1e-4, 1e6, 1e-9):
        t = stage_timestep(dpm, target)
        dist = (snr.log() - math.log(target)).abs()
        assert dist[t] == dist.min()
    assert stage_timestep(dpm, 1e6) == 0 and stage_timestep(dpm, 1e-9) == len(snr) - 1
    assert snr[stage_timestep(dpm, 1.0)] == pytest.approx(1.0, rel=0.2)


def test_reconstruction_keeps_more_of_x0_from_a_higher_snr(loaded, test_digits):
    dpm, x0 = loaded[0], test_digits[0]
    near = reconstruct_from(dpm, x0, stage_timestep(dpm, 100.0), 3, seed=1)
    far = reconstruct_from(dpm, x0, dpm.schedule.num_steps - 1, 3, seed=1)
    assert near.shape == far.shape == (3, 6, 1, 16, 16)
    assert near.abs().max() <= 1 and far.abs().max() <= 1
    err = [float((x - x0).pow(2).mean()) for x in (near, far)]
    assert err[0] < 0.1 * err[1], err  # at SNR 100 x_t is x_0 within 0.1 of its range
    # the draws differ from one another, and one seed gives the same draws again
    assert not torch.equal(near[0], near[1])
    assert torch.equal(near, reconstruct_from(dpm, x0, stage_timestep(dpm, 100.0), 3, seed=1))


def test_stage_figures_match_a_hand_computation(loaded, test_digits):
    dpm, _, judge = loaded
    x0, labels = test_digits
    res = evaluate_stages(dpm, judge, x0, labels, snrs=(0.01, 10.0), repeats=3, steps=5,
                          seed=2)
    assert [lv["snr_asked"] for lv in res["levels"]] == [10.0, 0.01]  # highest SNR first
    for lv, x in zip(res["levels"], res["images"], strict=True):
        want = reconstruct_from(dpm, x0, lv["t"], 3, steps=5, seed=2)
        assert torch.equal(x, want)
        judged = predict(judge, x.flatten(0, 1), 0).argmax(-1)
        assert lv["label_agreement"] == pytest.approx(
            float((judged == labels.repeat(3)).double().mean()))
        rmse = [float(((x[r, i] - x0[i]) / 2).double().pow(2).mean().sqrt())
                for r in range(3) for i in range(6)]
        assert lv["rmse"] == pytest.approx(sum(rmse) / len(rmse), rel=1e-9)
        pairs = [float(((x[a, i] - x[b, i]) / 2).double().pow(2).mean().sqrt())
                 for a, b in ((0, 1), (0, 2), (1, 2)) for i in range(6)]
        assert lv["spread"] == pytest.approx(sum(pairs) / len(pairs), rel=1e-9)
        assert lv["snr"] == pytest.approx(float(dpm.schedule.float64["snr"][lv["t"]]))
    acc = float((predict(judge, x0, 0).argmax(-1) == labels).double().mean())
    assert res["judge_accuracy_x0"] == pytest.approx(acc)
    # from SNR 0.01 more is re-made than from SNR 10
    hi, lo = res["levels"]
    assert hi["rmse"] < lo["rmse"] and hi["spread"] < lo["spread"]


def test_stages_cli_writes_labelled_grid_plot_and_json(classifier_models, tmp_path, capsys):
    m = classifier_models
    code, out, err = run_cli(
        capsys, "eval", "stages", "--checkpoint", str(m["ddpm"]), "--judge", str(m["judge"]),
        "--snrs", "1,0.01,10", "--n", "5", "--repeats", "2", "--steps", "3",
        "--grid-images", "3", "--out-dir", str(tmp_path), "--device", "cpu", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [lv["snr_asked"] for lv in res["levels"]] == [10.0, 1.0, 0.01]
    assert (res["n"], res["repeats"], res["steps"]) == (5, 2, 3)
    assert all(0 <= lv["label_agreement"] <= 1 and lv["rmse"] > 0 for lv in res["levels"])
    # x_0 and one row per SNR, 3 images x 2 draws, every row and column labelled
    assert_grid_layout(res["grid"], 4, 6, CELL, row_labels=True, col_labels=True)
    assert Path(res["plot"]).stat().st_size > 0
    code, out, err = run_cli(
        capsys, "eval", "stages", "--checkpoint", str(m["ddpm"]), "--judge", str(m["judge"]),
        "--snrs", "0.5", "--n", "2", "--repeats", "2", "--steps", "2", "--out-dir",
        str(tmp_path / "t"), "--device", "cpu")
    assert code == 0, err
    assert "agreement" in out and "content" in out  # SNR 0.5 lies in the content stage


@pytest.mark.parametrize(("args", "needle"), [
    (["--snrs", "1,-2"], "SNR must be a finite number > 0"),
    (["--snrs", "1,x"], "--snrs must be comma-separated"),
    (["--snrs", "1,1"], "repeats a value"),
    (["--snrs", "1000,5000"], "same timestep"),
    (["--repeats", "1"], "--repeats must be an integer >= 2"),
    (["--n", "0"], "--n must be >= 1"),
    (["--n", "100000"], "lower --n"),
    (["--data", "nowhere/at/all"], "nowhere"),
])
def test_stages_cli_errors_are_one_line(classifier_models, tmp_path, capsys, args, needle):
    m = classifier_models
    base = ["eval", "stages", "--checkpoint", str(m["ddpm"]), "--judge", str(m["judge"]),
            "--n", "2", "--repeats", "2", "--steps", "2", "--out-dir", str(tmp_path),
            "--device", "cpu"]
    code, _, err = run_cli(capsys, *base, *args)
    assert_one_line_error(code, err, needle)


def test_stages_refuse_a_class_conditional_dpm(classifier_models, tmp_path, capsys):
    data = load_dataset("digits", "train")
    unet = tiny_unet_config(data)
    unet = type(unet)(**{**unet.to_dict(), "num_classes": 10})
    train_ddpm(data, tmp_path / "cond", unet=unet, schedule=ScheduleConfig(num_timesteps=100),
               config=TrainConfig(steps=1, batch_size=4, save_every=1), samples=0,
               progress=False)
    code, _, err = run_cli(capsys, "eval", "stages", "--checkpoint", str(tmp_path / "cond"),
                           "--judge", str(classifier_models["judge"]), "--n", "2", "--device",
                           "cpu", "--out-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "class-conditional")


# --------------------------------------------------------------------------- guidance by band


def test_bands_split_the_sampler_steps_and_match_plain_sweeps(loaded):
    dpm, clf, judge = loaded
    real = load_dataset("digits", "test").images[:30]
    res = evaluate_guidance_stages(dpm, clf, judge, 4.0, real, steps=10, per_class=2, seed=3,
                                   k=3)
    rows = {r["band"]: r for r in res["bands"]}
    assert list(rows) == [b for b, _ in STAGE_BANDS]
    assert rows["off"]["steps_on"] == 0 and rows["all"]["steps_on"] == 10
    parts = [rows[b]["steps_on"] for b in ("SNR < 0.01", "0.01 <= SNR < 1", "SNR >= 1")]
    assert sum(parts) == 10 and all(p > 0 for p in parts), parts
    # off and all are the plain sweep's scale 0 and scale 4, from the same x_T
    plain = evaluate_guidance(dpm, clf, judge, [0.0, 4.0], steps=10, per_class=2, seed=3)
    samples = dict(zip(rows, res["samples"], strict=True))
    assert torch.equal(samples["off"], plain["samples"][0])
    assert torch.equal(samples["all"], plain["samples"][1])
    for name in ("off", "all"):
        ref = plain["scales"][0 if name == "off" else 1]
        for m in ("accuracy", "confidence", "diversity"):
            assert rows[name][m] == pytest.approx(ref[m])
    # a band's samples are those of guided_samples with that band's weight
    classes = res["classes"]
    weight = timestep_weight(dpm.schedule, "snr:0.01:1")
    x = guided_samples(dpm, clf, classes, 4.0, steps=10, seed=3, weight=weight)
    assert torch.equal(samples["0.01 <= SNR < 1"], x)
    fd = frechet_distance(judge_features(judge, real), judge_features(judge, x))
    assert rows["0.01 <= SNR < 1"]["fd"] == pytest.approx(fd)
    assert rows["0.01 <= SNR < 1"]["diversity"] == pytest.approx(diversity(x, classes))
    # guidance in one band changes the samples
    assert not torch.equal(samples["SNR >= 1"], samples["off"])


def test_guidance_stages_cli(classifier_models, tmp_path, capsys):
    m = classifier_models
    code, out, err = run_cli(
        capsys, "eval", "guidance", "--checkpoint", str(m["ddpm"]), "--classifier",
        str(m["classifier"]), "--judge", str(m["judge"]), "--stages", "--scales", "2",
        "--steps", "6", "--per-class", "2", "--out-dir", str(tmp_path), "--device", "cpu",
        "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [b["band"] for b in res["bands"]] == [b for b, _ in STAGE_BANDS]
    assert res["scale"] == 2.0 and res["n_real"] == len(load_dataset("digits", "test").images)
    for b in res["bands"]:
        assert all(math.isfinite(b[k]) for k in ("accuracy", "confidence", "diversity", "fd"))
    assert_grid_layout(res["grid"], len(STAGE_BANDS), 10, CELL, row_labels=True,
                       col_labels=True)
    assert Path(res["plot"]).stat().st_size > 0


@pytest.mark.parametrize(("args", "needle"), [
    (["--stages", "--scales", "1,2"], "--stages takes one guidance scale"),
    (["--stages", "--scales", "2", "--guidance-schedule", "snr:1:"], "leave out"),
    (["--scales", "2", "--data", "digits"], "--data is for --stages"),
])
def test_guidance_stages_errors(classifier_models, tmp_path, capsys, args, needle):
    m = classifier_models
    code, _, err = run_cli(
        capsys, "eval", "guidance", "--checkpoint", str(m["ddpm"]), "--classifier",
        str(m["classifier"]), "--judge", str(m["judge"]), "--steps", "2", "--per-class", "2",
        "--out-dir", str(tmp_path), "--device", "cpu", *args)
    assert_one_line_error(code, err, needle)
