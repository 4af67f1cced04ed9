"""The sample-quality metrics against closed forms and constructed cases, the judge's features
against its own logits, the held-out reference sets, the optional real-FID path (its one-line
errors, and its wiring through a stand-in for torch-fidelity), and (slow) the P2 benchmark."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from guidekit_classifier import fid
from guidekit_classifier.quality import (
    density_coverage,
    frechet_distance,
    judge_features,
    precision_recall,
    reference_images,
    sample_quality,
)
from guidekit_classifier.training import (
    JUDGE_KIND,
    LoadedClassifier,
    load_classifier,
)
from PIL import Image
from scipy import linalg

from guidekit.errors import GuidekitError
from guidekit.lookup import load_dataset
from guidekit.unet import ClassifierConfig, EncoderUNet

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(model_channels=8, channel_mult=(1, 2), attention_resolutions=(), num_heads=1)


def gaussian(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, mean.shape[0], generator=g, dtype=torch.float64)
    return mean + z @ torch.linalg.cholesky(cov).T


def analytic_fd(mu1, s1, mu2, s2) -> float:
    """FD of two Gaussians through scipy's sqrtm: an independent route to the same formula."""
    mu1, s1, mu2, s2 = (np.asarray(v, dtype=np.float64) for v in (mu1, s1, mu2, s2))
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


# --------------------------------------------------------------------------- Fréchet distance


def test_fd_matches_the_closed_form_of_two_gaussians():
    # non-commuting covariances; the sampling error of FD at N = 20000 in 3-D is ~0.01 here
    mu1 = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    a = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=torch.float64)
    b = torch.tensor([[0.5, -0.1, 0.1], [-0.1, 2.0, 0.0], [0.1, 0.0, 1.5]], dtype=torch.float64)
    want = analytic_fd(mu1, a, mu2, b)
    assert want == pytest.approx(2.25 + 0.99, abs=0.5)  # the case is not degenerate
    got = frechet_distance(gaussian(20000, mu1, a, 0), gaussian(20000, mu2, b, 1))
    assert got == pytest.approx(want, abs=0.05)


def test_fd_of_commuting_covariances_is_the_sum_of_root_differences():
    # Σ1 = R diag(a) Rᵀ, Σ2 = R diag(b) Rᵀ: Tr(Σ1Σ2)^½ = Σ √(a_i b_i)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3),
                                       dtype=torch.float64))
    a = torch.tensor([4.0, 1.0, 0.25, 2.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    mu = torch.zeros(4, dtype=torch.float64)
    want = float(((a.sqrt() - b.sqrt()) ** 2).sum())  # 1 + 0 + 0.25 + 0.5 = 1.75
    got = frechet_distance(gaussian(20000, mu, q @ torch.diag(a) @ q.T, 5),
                           gaussian(20000, mu, q @ torch.diag(b) @ q.T, 6))
    assert want == pytest.approx(1.75)
    assert got == pytest.approx(want, abs=0.05)


def test_fd_is_exact_from_the_fitted_statistics():
    # a 2^3 factorial design: fitted mean μ exactly, fitted covariance exactly diagonal, s²·8/7
    signs = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)],
                         dtype=torch.float64)
    mu1, s1 = torch.tensor([0.0, 1.0, 2.0]).double(), torch.tensor([1.0, 2.0, 3.0]).double()
    mu2, s2 = torch.tensor([1.0, 1.0, 0.0]).double(), torch.tensor([2.0, 2.0, 0.5]).double()
    real, fake = mu1 + s1 * signs, mu2 + s2 * signs
    want = float(((mu1 - mu2) ** 2).sum() + (8 / 7) * ((s1 - s2) ** 2).sum())
    assert frechet_distance(real, fake) == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(5 + (8 / 7) * 7.25)


def test_fd_of_a_set_with_itself_is_zero_and_fd_is_symmetric():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=g, dtype=torch.float64)
    b = torch.randn(200, 8, generator=g, dtype=torch.float64) * 1.5 + 0.3
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0.5


def test_fd_is_stable_for_singular_covariances():
    # fewer samples than dimensions: Σ is singular; a shift leaves only ‖Δμ‖²
    g = torch.Generator().manual_seed(1)
    a = torch.randn(10, 64, generator=g, dtype=torch.float64)
    shift = torch.randn(64, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-8)
    assert frechet_distance(a.float(), (a + shift).float()) == pytest.approx(
        float(shift @ shift), rel=1e-5)


@pytest.mark.parametrize("real, fake, needle", [
    (torch.zeros(1, 3), torch.zeros(5, 3), "at least 2 real samples"),
    (torch.zeros(5, 3), torch.zeros(1, 3), "at least 2 fake samples"),
    (torch.zeros(5, 3), torch.zeros(5, 4), "3 dimensions but fake ones 4"),
    (torch.zeros(5), torch.zeros(5, 3), "must be (N, D)"),
    (torch.full((5, 3), math.nan), torch.zeros(5, 3), "NaN"),
])
def test_fd_bad_input_is_one_line(real, fake, needle):
    with pytest.raises(GuidekitError, match=None) as info:
        frechet_distance(real, fake)
    assert needle in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- k-NN metrics


def clusters(centres: torch.Tensor, per: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (centres[:, None] + torch.randn(len(centres), per, centres.shape[1], generator=g,
                                           dtype=torch.float64)).reshape(-1, centres.shape[1])


CORNERS = torch.tensor([[0.0, 0], [50, 0], [0, 50], [50, 50]], dtype=torch.float64)


def test_identical_sets_are_perfect():
    x = clusters(CORNERS, 100, 0)
    assert precision_recall(x, x, k=5) == {"precision": 1.0, "recall": 1.0}
    dc = density_coverage(x, x, k=5)
    assert dc["coverage"] == 1.0
    # closed balls: each point lies in its own ball and its k neighbours' balls -> (k + 1) / k
    assert dc["density"] == pytest.approx(6 / 5)


def test_disjoint_far_apart_sets_score_zero():
    real, fake = clusters(CORNERS[:2], 100, 0), clusters(CORNERS[2:], 100, 1)
    assert precision_recall(real, fake, k=3) == {"precision": 0.0, "recall": 0.0}
    assert density_coverage(real, fake, k=3) == {"density": 0.0, "coverage": 0.0}


def test_half_the_modes_halves_recall_and_coverage_not_precision_or_density():
    real = clusters(CORNERS, 500, 0)
    fake = clusters(CORNERS[:2], 500, 1)  # the same distribution on 2 of the 4 modes
    pr, dc = precision_recall(real, fake, k=5), density_coverage(real, fake, k=5)
    assert pr["precision"] > 0.98
    assert pr["recall"] == pytest.approx(0.5, abs=0.03)
    assert dc["coverage"] == pytest.approx(0.5, abs=0.03)
    assert dc["density"] == pytest.approx(1.0, abs=0.1)  # fakes sit where reals are
    # all four modes from fresh samples: everything near 1
    full = clusters(CORNERS, 500, 2)
    assert min(precision_recall(real, full, k=5).values()) > 0.97
    assert density_coverage(real, full, k=5)["coverage"] > 0.95


def test_spread_out_fakes_lose_precision_keep_recall():
    real = clusters(CORNERS, 300, 0)
    g = torch.Generator().manual_seed(4)
    blurry = CORNERS.repeat_interleave(300, 0) + 6 * torch.randn(1200, 2, generator=g,
                                                                 dtype=torch.float64)
    pr = precision_recall(real, blurry, k=5)
    assert pr["precision"] < 0.3 and pr["recall"] > 0.95


def test_chunked_distances_match_one_block(monkeypatch):
    import guidekit_classifier.quality as q

    real, fake = clusters(CORNERS, 60, 0), clusters(CORNERS, 50, 1)
    whole = {**precision_recall(real, fake, 4), **density_coverage(real, fake, 4)}
    monkeypatch.setattr(q, "_CHUNK", 7)
    assert {**precision_recall(real, fake, 4), **density_coverage(real, fake, 4)} == whole


@pytest.mark.parametrize("k, needle", [(0, "k must be an integer >= 1"),
                                       (5, "k = 5 needs more than k fake samples"),
                                       (True, "k must be an integer")])
def test_k_errors_are_one_line(k, needle):
    real, fake = torch.randn(20, 2), torch.randn(5, 2)
    with pytest.raises(GuidekitError) as info:
        precision_recall(real, fake, k)
    assert needle in str(info.value)
    # density/coverage need only the real k-NN radii
    if k == 5:
        assert set(density_coverage(real, fake, k)) == {"density", "coverage"}


# --------------------------------------------------------------------------- judge features


@pytest.fixture(scope="module")
def tiny_judge(tiny_judge_dir) -> LoadedClassifier:
    return load_classifier(tiny_judge_dir(), JUDGE_KIND)


def test_judge_features_are_the_input_of_the_last_linear(tiny_judge):
    x = load_dataset("digits", "test").images[:37]
    feats = judge_features(tiny_judge, x, batch_size=10)
    assert feats.shape == (37, 16) and feats.dtype == torch.float64  # 8 channels x mult 2
    lin = tiny_judge.model.head[-1]
    logits = tiny_judge(x, torch.zeros(37, dtype=torch.long))
    torch.testing.assert_close(F.linear(feats.float(), lin.weight, lin.bias), logits,
                               rtol=1e-5, atol=1e-5)
    # batching changes only float32 round-off (another BLAS blocking); repetition nothing
    torch.testing.assert_close(judge_features(tiny_judge, x, batch_size=256), feats,
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(judge_features(tiny_judge, x, batch_size=10), feats)


@pytest.mark.parametrize("pool", ["attention", "spatial", "spatial_v2"])
def test_judge_features_of_the_other_pools(pool):
    torch.manual_seed(0)
    cfg = ClassifierConfig(image_size=16, in_channels=1, num_classes=10, pool=pool, **TINY)
    model = EncoderUNet(cfg).eval()
    judge = LoadedClassifier(model, {}, 10, (1, 16, 16), None)
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    feats = judge_features(judge, x).float()
    logits = model(x, torch.zeros(6, dtype=torch.long))
    if pool == "attention":  # the pooled token through c_proj
        proj = model.head[-1].c_proj
        assert feats.shape == (6, proj.in_channels)
        again = F.conv1d(feats[:, :, None], proj.weight, proj.bias)[:, :, 0]
    else:  # the MLP's hidden layer
        assert feats.shape == (6, 2048)
        again = F.linear(feats, model.head[-1].weight, model.head[-1].bias)
    torch.testing.assert_close(again, logits, rtol=1e-4, atol=1e-5)


def test_judge_features_reject_other_shapes(tiny_judge):
    with pytest.raises(GuidekitError, match="takes images of shape N x 1x16x16"):
        judge_features(tiny_judge, torch.zeros(2, 3, 16, 16))


def test_sample_quality_keys_and_a_perfect_match(tiny_judge):
    x = reference_images("digits", 40, seed=0)
    same = sample_quality(tiny_judge, x, x, k=3)
    assert set(same) == {"fd", "precision", "recall", "density", "coverage"}
    assert same["fd"] == pytest.approx(0.0, abs=1e-9)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    noise = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    worse = sample_quality(tiny_judge, x, noise, k=3)
    assert all(math.isfinite(v) for v in worse.values()) and worse["fd"] > 0


def test_reference_images_are_a_seeded_subset_of_the_test_split():
    test = load_dataset("digits", "test").images
    a, b = reference_images("digits", 50, seed=0), reference_images("digits", 50, seed=0)
    assert a.shape == (50, 1, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, reference_images("digits", 50, seed=1))
    rows = {tuple(r.flatten().tolist()) for r in test}
    assert all(tuple(r.flatten().tolist()) in rows for r in a)
    assert torch.equal(reference_images("digits", len(test)), test)  # all, in order
    assert reference_images("digits", 5, image_size=8).shape == (5, 1, 8, 8)
    with pytest.raises(GuidekitError, match="297 held-out images, fewer than the 298"):
        reference_images("digits", 298)
    with pytest.raises(GuidekitError, match="unknown dataset"):
        reference_images("no-such-data", 5)


# --------------------------------------------------------------------------- real FID


def test_fid_without_torch_fidelity_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails
    with pytest.raises(GuidekitError) as info:
        fid.load_inception(tmp_path / fid.INCEPTION_WEIGHTS_FILE)
    msg = str(info.value)
    assert "\n" not in msg and "pip install 'guidekit[fid]'" in msg and "torchvision" in msg
    assert torch.__version__ in msg


def fake_fidelity(monkeypatch) -> type:
    """A stand-in torch_fidelity with the real class's constructor and call conventions:
    uint8 (N, 3, H, W) in, a tuple of (N, 2048) float features out."""

    class FakeInception(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            assert features_list == ["2048"]
            state = torch.load(feature_extractor_weights_path, weights_only=True)
            self.proj = torch.nn.Linear(3, 2048, bias=False)
            self.load_state_dict(state)

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            return (self.proj(x.float().mean((2, 3)) / 255),)

    mod = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    mod.FeatureExtractorInceptionV3 = FakeInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", mod)
    return FakeInception


def test_fid_weights_missing_or_wrong_are_one_line(monkeypatch, tmp_path):
    fake_fidelity(monkeypatch)
    for weights in (None, tmp_path / "absent.pth"):
        with pytest.raises(GuidekitError) as info:
            fid.load_inception(weights)
        msg = str(info.value)
        assert fid.INCEPTION_WEIGHTS_FILE in msg and fid.INCEPTION_WEIGHTS_URL in msg
        assert "--fid-weights" in msg and "\n" not in msg
    wrong = tmp_path / "wrong.pth"
    torch.save({"other": torch.zeros(2)}, wrong)
    with pytest.raises(GuidekitError, match="does not fit the FID Inception"):
        fid.load_inception(wrong)
    hostile = tmp_path / "hostile.pth"
    torch.save({"w": types.SimpleNamespace(a=1)}, hostile)  # not tensors: refused unread
    with pytest.raises(GuidekitError, match="not a PyTorch weights file"):
        fid.load_inception(hostile)


def test_inception_fid_through_the_extractor(monkeypatch, tmp_path):
    fake_fidelity(monkeypatch)
    weights = tmp_path / fid.INCEPTION_WEIGHTS_FILE
    torch.manual_seed(0)
    torch.save({"proj.weight": torch.randn(2048, 3)}, weights)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1
    assert fid.inception_fid(real, real, weights) == pytest.approx(0.0, abs=1e-6)
    model = fid.load_inception(weights)
    feats = fid.inception_features(model, real, batch_size=7)
    assert feats.shape == (20, 2048) and feats.dtype == torch.float64
    # [-1, 1] -> 0..255, grey repeated on 3 channels
    ends = fid._to_uint8_rgb(torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3))
    assert ends.shape == (1, 3, 1, 3) and ends[0, :, 0].tolist() == [[0, 128, 255]] * 3
    brighter = (real + 0.5).clamp(-1, 1)
    assert fid.inception_fid(real, brighter, model) > 1.0


# --------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_p2_benchmark_smoke(tiny_judge, tmp_path):
    """The benchmark end to end at a tiny budget: its JSON shape and finite figures."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "p2_vs_uniform.py"), "--steps", "2",
         "--n", "8", "--sample-steps", "2", "--seeds", "0,1", "--k", "2", "--gamma", "0.5",
         "--judge", str(tiny_judge.path), "--out", str(tmp_path / "runs"), "--json"],
        capture_output=True, text=True, timeout=1200, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    metrics = ("fd", "precision", "recall", "density", "coverage")
    assert [(r["weighting"], r["seed"]) for r in result["runs"]] == [
        ("uniform", 0), ("p2", 0), ("uniform", 1), ("p2", 1)]
    for r in result["runs"]:
        assert all(math.isfinite(r[m]) for m in metrics)
    by = {(r["weighting"], r["seed"]): r for r in result["runs"]}
    for m in metrics:
        diffs = result["paired"][m]["diffs"]
        assert diffs == pytest.approx([by["p2", s][m] - by["uniform", s][m] for s in (0, 1)])
        for w in ("uniform", "p2"):
            stats = result["per_weighting"][w][m]
            assert stats["mean"] == pytest.approx((by[w, 0][m] + by[w, 1][m]) / 2)
            assert math.isfinite(stats["std"])
    assert result["config"]["gamma"] == 0.5 and result["config"]["n_real"] == 8
    assert result["plot"] == str(tmp_path / "runs" / "p2_vs_uniform.png")
    with Image.open(result["plot"]) as im:
        assert im.format == "PNG"
    p2 = json.loads((tmp_path / "runs" / "p2_g0.5_seed0" / "config.json").read_text())
    assert p2["weighting"] == {"name": "p2", "options": {"p2_gamma": 0.5, "p2_k": 1.0}}
