"""PDAE as an autoencoder (``guidekit pdae encode|reconstruct|interpolate|manipulate``) and
its metrics (SSIM, MSE, LPIPS), on a tiny DPM and a tiny PDAE trained in the test."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from guidekit_classifier.training import JUDGE_KIND, default_config, load_classifier, train_judge
from guidekit_pdae.autoencoding import (
    edit_held_out,
    fit_direction,
    interpolate,
    reconstruct,
    slerp,
)
from guidekit_pdae.guidance import load_latents
from guidekit_pdae.metrics import (
    ALEXNET_FILE,
    LINEAR_FILE,
    LPIPS_CHANNELS,
    gaussian_window,
    load_lpips,
    mse,
    ssim,
)
from guidekit_pdae.training import load_pdae, train_pdae
from PIL import Image

from guidekit.data import ImageData
from guidekit.errors import GuidekitError
from guidekit.lookup import load_dataset
from guidekit.testing import assert_grid_layout, assert_one_line_error, run_cli
from guidekit.training import TrainConfig

TINY = dict(model_channels=8, channel_mult=(1, 2), attention_resolutions=(), num_heads=1)
CELL = 16 * 4 + 1  # a 16 px image at grid scale 4, with its padding


@pytest.fixture(scope="module")
def tiny_pdae(guidekit_dpm, tmp_path_factory) -> Path:
    """A tiny PDAE on the tiny DPM; no EMA so its G_ψ has left zero after a few steps."""
    out = tmp_path_factory.mktemp("pdae_ae") / "pdae"
    cfg = TrainConfig(steps=4, batch_size=16, log_every=1, save_every=4, ema_decay=0.0)
    train_pdae(load_dataset("digits", "train"), out, pretrained=guidekit_dpm, latent_dim=8,
               encoder_channels=8, config=cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def loaded(tiny_pdae):
    return load_pdae(tiny_pdae)


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pdae_judge") / "judge"
    data = load_dataset("digits", "train")
    train_judge(data, out, model=default_config(data, **TINY),
                config=TrainConfig(steps=2, batch_size=16, log_every=1, save_every=2),
                progress=False)
    return out


def lpips_files(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """Randomly initialised weight files of the shapes torchvision and LPIPS v0.1 ship."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3),
              8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
    alex = {}
    for i, s in shapes.items():
        alex[f"features.{i}.weight"] = torch.randn(s, generator=gen) * 0.05
        alex[f"features.{i}.bias"] = torch.randn(s[0], generator=gen) * 0.01
    alex["classifier.1.weight"] = torch.zeros(4, 9216)  # present in the real file, unused
    lin = {f"lin{i}.model.1.weight": torch.rand((1, c, 1, 1), generator=gen)
           for i, c in enumerate(LPIPS_CHANNELS)}
    root.mkdir(parents=True, exist_ok=True)
    torch.save(alex, root / ALEXNET_FILE)
    torch.save(lin, root / LINEAR_FILE)
    return root / ALEXNET_FILE, root / LINEAR_FILE


# --------------------------------------------------------------------------- metrics


def test_ssim_of_identical_images_is_one():
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    s = ssim(x, x)
    assert s.shape == (3,)
    assert torch.allclose(s, torch.ones(3), atol=1e-6)


def test_ssim_of_constant_images_is_the_luminance_term():
    # constant images: σ = 0 everywhere, so SSIM = (2ab + C1) / (a² + b² + C1) exactly
    a, b = 0.2, 0.7
    x, y = torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)
    c1 = 0.01**2
    assert float(ssim(x, y)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-6)


def test_ssim_of_an_image_against_its_negative_follows_the_formula():
    # y = 1 − x has μ_y = 1 − μ_x, σ_y = σ_x, cov = −σ_x² per window; on a 11x11 image there
    # is one window, so the value is computable by hand from the weighted moments.
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 11, 11, generator=gen, dtype=torch.float64)
    w = gaussian_window().outer(gaussian_window())
    mu = float((w * x[0, 0]).sum())
    var = float((w * x[0, 0] ** 2).sum()) - mu**2
    c1, c2 = 0.01**2, 0.03**2
    expect = (2 * mu * (1 - mu) + c1) * (-2 * var + c2) / ((mu**2 + (1 - mu) ** 2 + c1)
                                                           * (2 * var + c2))
    assert float(ssim(x.float(), 1 - x.float())) == pytest.approx(expect, abs=1e-5)


def test_ssim_is_symmetric_and_falls_with_noise():
    gen = torch.Generator().manual_seed(2)
    x = load_dataset("digits", "test").images[:8].add(1).div(2)
    noise = torch.randn(x.shape, generator=gen)
    y = (x + 0.1 * noise).clamp(0, 1)
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-6)
    values = [float(ssim(x, (x + s * noise).clamp(0, 1)).mean()) for s in (0.0, 0.05, 0.2, 0.5)]
    assert values[0] == pytest.approx(1.0, abs=1e-6)
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), values


def test_gaussian_window_is_normalised_and_centred():
    g = gaussian_window()
    assert g.shape == (11,) and float(g.sum()) == pytest.approx(1.0)
    assert int(g.argmax()) == 5 and torch.allclose(g, g.flip(0))


def test_mse_matches_a_hand_computation():
    a, b = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    b[0] = 0.5
    b[1, 0, 0, 0] = 1.0
    assert torch.allclose(mse(a, b), torch.tensor([0.25, 1 / 16]))


def test_lpips_is_zero_on_identical_images_and_positive_otherwise(tmp_path):
    lp = load_lpips(*lpips_files(tmp_path))
    x = load_dataset("digits", "test").images[:4].add(1).div(2)  # grayscale 16 px
    y = x.flip(-1)
    same, diff = lp(x, x), lp(x, y)
    assert same.shape == diff.shape == (4,)
    assert torch.allclose(same, torch.zeros(4))
    assert bool((diff > 0).all())
    assert torch.allclose(diff, lp(y, x), rtol=1e-5)  # symmetric
    rgb = torch.rand(2, 3, 70, 70)  # already 64 px or more: no upsampling needed
    assert bool((lp(rgb, rgb.flip(-2)) > 0).all())


def test_lpips_files_missing_or_wrong_are_errors(tmp_path):
    alex, lin = lpips_files(tmp_path / "ok")
    with pytest.raises(GuidekitError, match=f"{ALEXNET_FILE}.*download.pytorch.org"):
        load_lpips(tmp_path / "nope.pth", lin)
    with pytest.raises(GuidekitError, match=f"{LINEAR_FILE}.*PerceptualSimilarity"):
        load_lpips(alex, None)
    with pytest.raises(GuidekitError, match="features.0.weight"):
        load_lpips(lin, lin)  # the heads file where the AlexNet one belongs


# --------------------------------------------------------------------------- encode


def test_encode_writes_tagged_latents(capsys, tiny_pdae, loaded, tmp_path):
    out = tmp_path / "z.safetensors"
    code, stdout, err = run_cli(capsys, "pdae", "encode", "--pdae", str(tiny_pdae),
                                "--out", str(out), "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    test = load_dataset("digits", "test")
    assert summary["n"] == len(test) and summary["latent_dim"] == 8
    z = load_latents(out, loaded)
    assert z.shape == (len(test), 8)
    assert torch.allclose(z, loaded.encode(test.images), atol=1e-6)


def test_encode_mistakes_are_one_line(capsys, tiny_pdae, guidekit_dpm, tmp_path):
    code, _, err = run_cli(capsys, "pdae", "encode", "--pdae", str(tiny_pdae),
                           "--image-size", "32", "--out", str(tmp_path / "z.safetensors"))
    assert_one_line_error(code, err, "1x16x16", "1x32x32")
    code, _, err = run_cli(capsys, "pdae", "encode", "--pdae", str(guidekit_dpm),
                           "--out", str(tmp_path / "z.safetensors"))
    assert_one_line_error(code, err, "pdae")


# --------------------------------------------------------------------------- reconstruct


def test_reconstruct_reports_every_method(loaded):
    x0 = load_dataset("digits", "test").images[:4]
    res = reconstruct(loaded, x0, steps=4, xT="both", seed=3)
    names = [r["method"] for r in res["methods"]]
    assert names == ["DDIM (inferred x_T)", "PDAE (inferred x_T)", "PDAE (random x_T)",
                     "DDIM (random x_T)"]
    dims = {r["method"]: r["latent_dim"] for r in res["methods"]}
    assert dims == {"DDIM (inferred x_T)": 256, "PDAE (inferred x_T)": 8 + 256,
                    "PDAE (random x_T)": 8, "DDIM (random x_T)": 0}
    for r in res["methods"]:
        x = res["images"][r["method"]]
        assert x.shape == x0.shape and float(x.abs().max()) <= 1
        assert r["mse"] == pytest.approx(float(mse((x0 + 1) / 2, (x + 1) / 2).mean()), rel=1e-5)
        assert -1 <= r["ssim"] <= 1 and r["lpips"] is None
    # the shift is on: a trained G_ψ changes the decode
    assert not torch.equal(res["images"]["PDAE (random x_T)"], res["images"]["DDIM (random x_T)"])


def test_reconstruct_without_shift_is_plain_ddim(loaded):
    # G_ψ = 0 (its output layer zeroed): PDAE's rows must be the bare DPM's, bit for bit
    flat = copy.deepcopy(loaded)
    torch.nn.init.zeros_(flat.model.estimator.out[-1].weight)
    torch.nn.init.zeros_(flat.model.estimator.out[-1].bias)
    x0 = load_dataset("digits", "test").images[:3]
    imgs = reconstruct(flat, x0, steps=3, xT="both")["images"]
    assert torch.equal(imgs["PDAE (inferred x_T)"], imgs["DDIM (inferred x_T)"])
    assert torch.equal(imgs["PDAE (random x_T)"], imgs["DDIM (random x_T)"])


def test_reconstruct_cli_grid_table_and_lpips(capsys, tiny_pdae, tmp_path):
    alex, lin = lpips_files(tmp_path / "w")
    code, stdout, err = run_cli(
        capsys, "pdae", "reconstruct", "--pdae", str(tiny_pdae), "--n", "3", "--steps", "2",
        "--xT", "inferred", "--out-dir", str(tmp_path / "rec"), "--lpips-alexnet", str(alex),
        "--lpips-linear", str(lin), "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert [r["method"] for r in res["methods"]] == ["DDIM (inferred x_T)",
                                                     "PDAE (inferred x_T)"]
    assert all(r["lpips"] is not None and r["lpips"] >= 0 for r in res["methods"])
    # originals + two methods, three images each, rows labelled, a title above
    assert_grid_layout(Path(res["grid"]), 3, 3, CELL, row_labels=True, col_labels=False)
    code, stdout, err = run_cli(capsys, "pdae", "reconstruct", "--pdae", str(tiny_pdae),
                                "--n", "2", "--steps", "2", "--xT", "random",
                                "--out-dir", str(tmp_path / "rec2"))
    assert code == 0, err
    assert "PDAE (random x_T)" in stdout and "latent dim" in stdout


@pytest.mark.parametrize("args, needles", [
    (["--xT", "sideways"], ["sideways", "inferred, random or both"]),
    (["--lpips-linear", "alex.pth"], [ALEXNET_FILE, "--lpips-alexnet"]),
    (["--steps", "0"], ["--steps"]),
])
def test_reconstruct_mistakes_are_one_line(capsys, tiny_pdae, tmp_path, args, needles):
    code, _, err = run_cli(capsys, "pdae", "reconstruct", "--pdae", str(tiny_pdae), "--n", "2",
                           "--out-dir", str(tmp_path), *args)
    assert_one_line_error(code, err, *needles)


# --------------------------------------------------------------------------- interpolate


def test_slerp_ends_and_norm():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(out[0], a) and torch.allclose(out[-1], b)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-6)  # on the circle
    assert torch.allclose(out[2], torch.tensor([0.5**0.5, 0.5**0.5]), atol=1e-6)
    assert torch.allclose(slerp(a, a, torch.tensor([0.3]))[0], a)  # parallel: no NaN


def test_interpolation_modes_agree_at_the_ends(loaded):
    x = load_dataset("digits", "test").images
    out = interpolate(loaded, x[0], x[1], modes=("z", "shift"), frames=4, steps=3)
    assert set(out) == {"z", "shift"} and out["z"].shape == (4, 1, 16, 16)
    # λ = 0 and 1: both modes are the shift of one image's own z from its own x_T
    for i in (0, -1):
        assert torch.allclose(out["z"][i], out["shift"][i], atol=1e-5)
    assert not torch.allclose(out["z"][0], out["z"][-1])


def test_interpolate_cli(capsys, tiny_pdae, tmp_path):
    png = tmp_path / "interp.png"
    code, stdout, err = run_cli(capsys, "pdae", "interpolate", "--pdae", str(tiny_pdae),
                                "--a", "0", "--b", "5", "--frames", "3", "--steps", "2",
                                "--out", str(png), "--json")
    assert code == 0, err
    assert json.loads(stdout)["modes"] == ["z", "shift"]
    # two rows (lerp z, lerp G_ψ): image a, 3 frames (λ = 0, 0.5, 1), image b
    assert_grid_layout(png, 2, 5, CELL, row_labels=True, col_labels=True)
    code, _, err = run_cli(capsys, "pdae", "interpolate", "--pdae", str(tiny_pdae),
                           "--b", "5000", "--out", str(png))
    assert_one_line_error(code, err, "--b 5000", "297")
    code, _, err = run_cli(capsys, "pdae", "interpolate", "--pdae", str(tiny_pdae),
                           "--mode", "lerp", "--out", str(png))
    assert_one_line_error(code, err, "lerp", "z, shift or both")


# --------------------------------------------------------------------------- manipulate


def test_fit_direction_finds_the_informative_coordinate():
    gen = np.random.default_rng(0)
    labels = torch.from_numpy(gen.integers(0, 3, size=600))
    z = torch.from_numpy(gen.normal(size=(600, 5))).float() * torch.tensor([1, 5, 1, 1, 1.0])
    z[:, 2] += 3.0 * (labels == 1).float()  # only coordinate 2 carries the label
    d = fit_direction(z, labels, 1)
    assert float(d.w.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(d.w[2]) > 0.9 and d.train_accuracy > 0.9
    assert d.accuracy(z, labels) == pytest.approx(d.train_accuracy, abs=1e-6)
    # z' = z + s·w in normalised space: the normalised projection moves by exactly s
    proj = ((d.edit(z, 2.5) - d.mean) / d.std) @ d.w - ((z - d.mean) / d.std) @ d.w
    assert torch.allclose(proj, torch.full((600,), 2.5), atol=1e-4)
    with pytest.raises(GuidekitError, match="no images of label 7"):
        fit_direction(z, labels, 7)


def test_manipulate_cli(capsys, tiny_pdae, judge, tmp_path):
    code, stdout, err = run_cli(
        capsys, "pdae", "manipulate", "--pdae", str(tiny_pdae), "--label", "0",
        "--scales", "-1,0,2", "--judge", str(judge), "--n", "3", "--steps", "2",
        "--out-dir", str(tmp_path), "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert [r["scale"] for r in res["scales"]] == [-1.0, 0.0, 2.0] and res["n"] == 3
    zero = res["scales"][1]
    assert zero["rose"] == 0.0  # no edit cannot rise above itself
    assert all(0 <= r["p_label"] <= 1 and 0 <= r["rose"] <= 1 for r in res["scales"])
    # three images; original + three scales, the columns labelled
    assert_grid_layout(Path(res["grid"]), 3, 4, CELL, row_labels=False, col_labels=True)


def test_manipulate_mistakes_are_one_line(capsys, tiny_pdae, guidekit_dpm, judge, loaded,
                                          tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(folder / f"{i}.png")
    base = ["pdae", "manipulate", "--pdae", str(tiny_pdae), "--judge", str(judge),
            "--out-dir", str(tmp_path / "m")]
    code, _, err = run_cli(capsys, *base, "--label", "0", "--data", str(folder))
    assert_one_line_error(code, err, "no labels")
    code, _, err = run_cli(capsys, *base, "--label", "12")
    assert_one_line_error(code, err, "--label 12")
    code, _, err = run_cli(capsys, *base, "--label", "0", "--scales", "a,b")
    assert_one_line_error(code, err, "--scales")
    code, _, err = run_cli(capsys, "pdae", "manipulate", "--pdae", str(tiny_pdae),
                           "--judge", str(guidekit_dpm), "--label", "0")
    assert_one_line_error(code, err, "judge")
    # the API says the same for an unlabelled ImageData
    unlabelled = ImageData("u", torch.zeros(2, 1, 16, 16), None, 0)
    with pytest.raises(GuidekitError, match="no labels"):
        edit_held_out(loaded, load_classifier(judge, JUDGE_KIND), unlabelled, unlabelled, 0,
                      [1.0])
