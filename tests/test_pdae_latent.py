"""The latent DPM over PDAE's z (``guidekit train pdae-latent``, ``guidekit pdae sample``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from guidekit_pdae.guidance import load_latents
from guidekit_pdae.latent import (
    KIND,
    LatentMLP,
    LatentMLPConfig,
    load_latent_dpm,
    sample_latents,
    sample_pdae,
    train_latent_dpm,
    train_pdae_latent,
)
from guidekit_pdae.training import load_pdae, train_pdae
from torch import Tensor

from guidekit.checkpoint import read_checkpoint
from guidekit.errors import GuidekitError
from guidekit.lookup import load_dataset
from guidekit.schedule import ScheduleConfig
from guidekit.testing import assert_one_line_error, run_cli
from guidekit.training import TrainConfig

LATENT_DIM = 8
TINY_MLP = dict(hidden=32, depth=2)
TINY_SCHEDULE = ScheduleConfig(num_timesteps=100)


def _cfg(steps: int, **kw) -> TrainConfig:
    return TrainConfig(**{"steps": steps, "batch_size": 16, "log_every": 1,
                          "save_every": steps, **kw})


def _tiny_pdae(dpm, out, seed: int = 0):
    train_pdae(load_dataset("digits", "train"), out, pretrained=dpm, latent_dim=LATENT_DIM,
               encoder_channels=8, config=_cfg(2, seed=seed), progress=False)
    return out


@pytest.fixture(scope="module")
def pdae_dir(guidekit_dpm, tmp_path_factory):
    return _tiny_pdae(guidekit_dpm, tmp_path_factory.mktemp("pdae") / "pdae")


@pytest.fixture(scope="module")
def latent_dir(pdae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latent") / "latent"
    train_pdae_latent(pdae_dir, load_dataset("digits", "train"), out, **TINY_MLP,
                      schedule=TINY_SCHEDULE, config=_cfg(3), progress=False)
    return out


def test_mlp_shapes_and_zero_init():
    net = LatentMLP(LatentMLPConfig(latent_dim=5, hidden=16, depth=2))
    t = torch.tensor([0, 50, 99])
    for x in (torch.randn(3, 5), torch.randn(3, 5, 1, 1)):
        eps = net(x, t)
        assert eps.shape == x.shape
        assert torch.count_nonzero(eps) == 0  # zero-initialised head: starts at ε = 0
    with pytest.raises(GuidekitError, match="expects"):
        net(torch.randn(3, 5, 2, 2), t)


def test_config_records_pdae_and_normalisation(pdae_dir, latent_dir):
    pdae = load_pdae(pdae_dir)
    cfg = read_checkpoint(latent_dir, KIND).config
    assert cfg["pdae"] == {"path": str(pdae_dir.resolve()), "fingerprint": pdae.fingerprint}
    assert cfg["schedule"]["num_timesteps"] == 100
    assert cfg["model"] == {"name": "latent_mlp", "config": {"latent_dim": LATENT_DIM,
                                                             "hidden": 32, "depth": 2}}
    z = pdae.encode(load_dataset("digits", "train").images)
    mean, std = (torch.tensor(cfg["normalisation"][k]) for k in ("mean", "std"))
    torch.testing.assert_close(mean, z.mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(std, z.std(0, correction=0), atol=1e-5, rtol=1e-4)


def test_checkpoint_round_trip(pdae_dir, latent_dir):
    latent = load_latent_dpm(latent_dir, load_pdae(pdae_dir))
    ema = read_checkpoint(latent_dir, KIND).module_tensors("ema", "model")
    state = latent.dpm.model.state_dict()
    assert set(state) == set(ema)
    assert all(torch.equal(state[k], ema[k]) for k in ema)
    assert latent.dpm.image_shape == (LATENT_DIM, 1, 1)
    assert not any(p.requires_grad for p in latent.dpm.model.parameters())
    # 3 steps moved the zero-initialised head: the loaded net is the trained one
    assert torch.count_nonzero(latent.dpm.model(torch.randn(2, LATENT_DIM), torch.tensor([5, 9])))


def test_resume_matches_uninterrupted(tmp_path):
    z = torch.randn(40, 3) * 2 + 1
    kw = dict(**TINY_MLP, schedule=TINY_SCHEDULE, progress=False)
    train_latent_dpm(z, tmp_path / "full", config=_cfg(4), **kw)
    train_latent_dpm(z, tmp_path / "half", config=_cfg(2), **kw)
    train_latent_dpm(z, tmp_path / "half", config=_cfg(4), resume=True, **kw)
    a = read_checkpoint(tmp_path / "full", KIND).tensors("ema")
    b = read_checkpoint(tmp_path / "half", KIND).tensors("ema")
    assert read_checkpoint(tmp_path / "half", KIND).step == 4
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample_shapes(pdae_dir, latent_dir):
    pdae = load_pdae(pdae_dir)
    res = sample_pdae(pdae, load_latent_dpm(latent_dir, pdae), 3, steps=3, latent_steps=4)
    assert res["z"].shape == (3, LATENT_DIM) and bool(torch.isfinite(res["z"]).all())
    assert res["images"].shape == (3, 1, 16, 16)
    assert res["images"].abs().max() <= 1


def test_sample_cli_json(pdae_dir, latent_dir, tmp_path, capsys):
    grid = tmp_path / "g.png"
    code, out, err = run_cli(capsys, "pdae", "sample", "--pdae", str(pdae_dir), "--latent-dpm",
                             str(latent_dir), "--n", "4", "--steps", "2", "--latent-steps", "2",
                             "--out", str(grid), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["grid"] == str(grid) and grid.stat().st_size > 0
    assert summary["latent_seconds"] >= 0 and summary["decode_seconds"] >= 0
    z = load_latents(summary["latents"], load_pdae(pdae_dir))  # tagged with this PDAE
    assert z.shape == (4, LATENT_DIM)


def test_wrong_pdae_is_one_line_error(guidekit_dpm, latent_dir, tmp_path, capsys):
    other = _tiny_pdae(guidekit_dpm, tmp_path / "other", seed=1)
    code, _, err = run_cli(capsys, "pdae", "sample", "--pdae", str(other), "--latent-dpm",
                           str(latent_dir), "--n", "2", "--steps", "2", "--latent-steps", "2",
                           "--out", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, "another PDAE", "guidekit train pdae-latent")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("swap,needle", [
    (True, "'pdae' checkpoint, but a 'pdae-latent'"),  # the PDAE given as the latent DPM
    (False, "--latent-steps must be in 1..100"),
])
def test_sample_mistakes(pdae_dir, latent_dir, tmp_path, capsys, swap, needle):
    lat = pdae_dir if swap else latent_dir
    code, _, err = run_cli(capsys, "pdae", "sample", "--pdae", str(pdae_dir), "--latent-dpm",
                           str(lat), "--n", "2", "--steps", "2", "--latent-steps", "101",
                           "--out", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, needle)


def test_given_latents_cannot_pair_with_a_pdae(pdae_dir, tmp_path):
    train_latent_dpm(torch.randn(20, LATENT_DIM), tmp_path / "l", **TINY_MLP,
                     schedule=TINY_SCHEDULE, config=_cfg(1), progress=False)
    with pytest.raises(GuidekitError, match="given latents"):
        load_latent_dpm(tmp_path / "l", load_pdae(pdae_dir))


def test_train_cli(pdae_dir, tmp_path, capsys):
    out = tmp_path / "lat"
    args = ["train", "pdae-latent", "--pdae", str(pdae_dir), "--out", str(out), "--steps", "2",
            "--hidden", "16", "--depth", "1", "--timesteps", "50", "--batch-size", "8",
            "--device", "cpu", "--json"]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0, err
    assert json.loads(stdout)["latent_dim"] == LATENT_DIM
    assert read_checkpoint(out, KIND).config["schedule"]["num_timesteps"] == 50
    code, _, err = run_cli(capsys, *args, "--bogus", "1")
    assert_one_line_error(code, err, "unexpected argument")
    code, _, err = run_cli(capsys, *[a if a != str(pdae_dir) else str(tmp_path / "none")
                                     for a in args])
    assert_one_line_error(code, err, "no checkpoint at")


def test_latent_dpm_learns_a_correlated_gaussian(tmp_path):
    """Trained on 2-D Gaussian latents (mean (3, −2), std (0.5, 2), correlation 0.8), DDIM
    samples match mean (within 0.1 σ), std (within 8%) and correlation (within 0.05); the
    untrained net (ε = 0) is far off. Per-dimension normalisation cannot produce the
    correlation: the MLP must learn it."""
    gen = torch.Generator().manual_seed(0)
    mean, std, rho = torch.tensor([3.0, -2.0]), torch.tensor([0.5, 2.0]), 0.8
    chol = torch.tensor([[1.0, 0.0], [rho, math.sqrt(1 - rho**2)]])
    z = torch.randn(4000, 2, generator=gen) @ chol.T * std + mean
    kw = dict(hidden=64, depth=2, schedule=TINY_SCHEDULE, progress=False)
    cfg = TrainConfig(steps=800, batch_size=256, lr=3e-3, ema_decay=0.99, log_every=100,
                      save_every=800)
    train_latent_dpm(z, tmp_path / "lat", config=cfg, **kw)
    train_latent_dpm(z, tmp_path / "untrained", config=_cfg(1, lr=0.0), **kw)

    def error(path) -> tuple[Tensor, Tensor, float]:
        s = sample_latents(load_latent_dpm(path), 2000, steps=50, seed=1)
        corr = float(torch.corrcoef(s.T)[0, 1])
        return ((s.mean(0) - mean) / std).abs(), (s.std(0) / std - 1).abs(), abs(corr - rho)

    mean_err, std_err, corr_err = error(tmp_path / "lat")
    assert mean_err.max() < 0.1 and std_err.max() < 0.08 and corr_err < 0.05, (
        mean_err, std_err, corr_err)
    _, untrained_std_err, _ = error(tmp_path / "untrained")
    assert untrained_std_err.min() > 1.0
