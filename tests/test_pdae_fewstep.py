"""``guidekit pdae fewstep``: plain DDIM vs PDAE at each step count, from the same x_T, scored
in a judge's features; on tiny models (seconds), with the one-line mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from guidekit_classifier.quality import sample_quality
from guidekit_classifier.training import JUDGE_KIND, load_classifier
from guidekit_pdae.autoencoding import ddim_sampler, decode
from guidekit_pdae.fewstep import fewstep_generation, parse_steps
from guidekit_pdae.latent import decode_latents, load_latent_dpm, sample_latents
from guidekit_pdae.latent import train_pdae_latent as train_latent
from guidekit_pdae.training import load_pdae, train_pdae
from PIL import Image

from guidekit.errors import GuidekitError
from guidekit.lookup import load_dataset
from guidekit.schedule import ScheduleConfig
from guidekit.testing import assert_grid_layout, assert_one_line_error, run_cli
from guidekit.training import TrainConfig

CELL = 16 * 4 + 1  # a 16 px digit at grid scale 4, with its padding


def _cfg(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{"steps": steps, "batch_size": 16, "log_every": steps,
                          "save_every": steps, **kw})


@pytest.fixture(scope="module")
def models(guidekit_dpm, tiny_judge_dir, tmp_path_factory) -> dict[str, Path]:
    """A tiny PDAE (no EMA, so G_ψ is not 0), its latent DPM and a judge, a few steps each."""
    root = tmp_path_factory.mktemp("fewstep")
    train = load_dataset("digits", "train")
    train_pdae(train, root / "pdae", pretrained=guidekit_dpm, latent_dim=8, encoder_channels=8,
               config=_cfg(4, ema_decay=0.0), progress=False)
    train_latent(root / "pdae", train, root / "latent", hidden=32, depth=2,
                 schedule=ScheduleConfig(num_timesteps=100), config=_cfg(3), progress=False)
    return {"pdae": root / "pdae", "latent": root / "latent", "judge": tiny_judge_dir()}


@pytest.fixture(scope="module")
def loaded(models):
    pdae = load_pdae(models["pdae"])
    return pdae, load_latent_dpm(models["latent"], pdae), load_classifier(models["judge"],
                                                                          JUDGE_KIND)


def test_parse_steps():
    assert parse_steps(None, 1000) == [10, 20, 50, 100]
    assert parse_steps(None, 30) == [10, 20]
    assert parse_steps("50, 10,10", 100) == [10, 50]
    with pytest.raises(GuidekitError, match=r"--steps \[0, 101\] out of range.*T = 100"):
        parse_steps("0,5,101", 100)
    with pytest.raises(GuidekitError, match="at least one"):
        parse_steps(",", 100)


def test_both_methods_decode_the_same_x_T_and_scores_are_the_metric(loaded):
    """Each row's figures are sample_quality of exactly the two decodes: DDIM-K of the bare
    DPM and PDAE's DDIM-K toward the latents z, from one x_T (seed + 1)."""
    pdae, latent, judge = loaded
    real = load_dataset("digits", "test").images[:16]
    n, seed = 12, 3
    res = fewstep_generation(pdae, latent, judge, real, steps=[4, 2], n=n, latent_steps=5,
                             seed=seed, k=3)
    assert [r["steps"] for r in res["rows"]] == [2, 4]
    assert (res["n"], res["n_real"], res["k"], res["latent_steps"]) == (n, 16, 3, 5)
    z = sample_latents(latent, n, steps=5, seed=seed)
    x_T = torch.randn((n, 1, 16, 16), generator=torch.Generator().manual_seed(seed + 1))
    for row in res["rows"]:
        s = row["steps"]
        plain = decode(ddim_sampler(pdae, s, clip=True), x_T, [])
        shifted = decode_latents(pdae, z, steps=s, seed=seed + 1)  # x_T drawn from seed + 1
        for key, x in (("ddim", plain), ("pdae", shifted)):
            want = sample_quality(judge, real, x, k=3)
            for name, value in row[key].items():
                assert value == pytest.approx(want[name], rel=1e-6, abs=1e-9), (s, key, name)
        assert row["fd_ratio"] == pytest.approx(row["pdae"]["fd"] / row["ddim"]["fd"])
        ddim8, pdae8 = res["images"][s]
        assert torch.allclose(ddim8, plain[:8], atol=1e-6)
        assert torch.allclose(pdae8, shifted[:8], atol=1e-6)
        assert not torch.allclose(ddim8, pdae8)  # the shift is on: G_ψ ≠ 0 after training


def test_fewstep_cli_table_plot_grid_and_json(capsys, models, tmp_path):
    args = ["pdae", "fewstep", "--pdae", str(models["pdae"]), "--latent-dpm",
            str(models["latent"]), "--judge", str(models["judge"]), "--steps", "2,3",
            "--n", "10", "--latent-steps", "4", "--k", "3", "--out-dir", str(tmp_path)]
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [r["steps"] for r in res["rows"]] == [2, 3] and res["n_real"] == 10
    row = res["rows"][0]
    assert set(row["ddim"]) == set(row["pdae"]) == {"fd", "precision", "recall", "density",
                                                     "coverage"}
    assert row["ddim"]["fd"] >= 0 and 0 <= row["pdae"]["precision"] <= 1
    with Image.open(res["plot"]) as im:
        assert im.format == "PNG" and im.size == (600, 400)
    # rows DDIM-2 / PDAE-2 / DDIM-3 / PDAE-3, 8 samples each, labelled in a left margin
    assert_grid_layout(res["grid"], 4, 8, CELL, row_labels=True)
    with Image.open(res["grid"]) as im:  # labels over 20 px wide, and a title above
        assert im.size[0] > 8 * CELL + 1 + 20 and im.size[1] > 4 * CELL + 1
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "DDIM FD" in out and "PDAE FD" in out and "fewstep.png" in out


@pytest.mark.parametrize("extra, needles", [
    (["--steps", "0,5"], ("--steps [0] out of range",)),
    (["--n", "3"], ("--n must be an integer above --k (5)",)),
    (["--data", "shapes"], ("1x16x16", "3x32x32")),
])
def test_fewstep_mistakes_are_one_line(capsys, models, tmp_path, extra, needles):
    code, _, err = run_cli(capsys, "pdae", "fewstep", "--pdae", str(models["pdae"]),
                           "--latent-dpm", str(models["latent"]), "--judge",
                           str(models["judge"]), "--steps", "2", "--n", "8",
                           "--out-dir", str(tmp_path), *extra)
    assert_one_line_error(code, err, *needles)


def test_fewstep_needs_a_judge_and_a_paired_latent_dpm(capsys, models, guidekit_dpm,
                                                       tmp_path):
    base = ["pdae", "fewstep", "--pdae", str(models["pdae"]), "--steps", "2", "--n", "8",
            "--out-dir", str(tmp_path)]
    code, _, err = run_cli(capsys, *base, "--latent-dpm", str(models["latent"]),
                           "--judge", str(guidekit_dpm))
    assert_one_line_error(code, err, "judge")
    code, _, err = run_cli(capsys, *base, "--latent-dpm", str(models["pdae"]),
                           "--judge", str(models["judge"]))
    assert_one_line_error(code, err, "pdae-latent")
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(capsys, "pdae", "fewstep", "--pdae", str(models["pdae"]),
                           "--latent-dpm", str(models["latent"]), "--judge",
                           str(models["judge"]), "--out-dir", str(tmp_path / "file"))
    assert_one_line_error(code, err, "is a file, not a folder")
