"""Classifier guidance with a *trained* noisy classifier against closed-form truth.

On the 2-D Gaussian mixture of ``test_engine_analytic`` the exact ε* gives the unconditional
DPM and ∇ log p(y | x_t) is exact. A small MLP p_φ(y | x_t, t) is trained here (a second or
two) on fresh mixture samples, x_t from the T = 1000 linear schedule with uniform t, and
``ClassifierGuidance`` of it guides the exact ε* sampler at scale 1. The samples must be
component y, as they are with the exact gradient.

Tolerances (n = 4096 samples; MC = 4 standard errors, as in ``test_engine_analytic``).
The trained classifier's own error is an allowance on top, sized from 8 classifiers trained
with different seeds (this file's set-up, seeds changed; the fixed seed here is one of them):

- Fraction in the target component ≥ 0.975 (exact gradient: ≥ 0.995). A learned classifier is
  only trained where data lie: in the empty space *between* components at small t its
  log-probabilities flatten once it is confident (cross-entropy stops pushing), while the exact
  log p(y | x_t) keeps falling quadratically. The mixture score pulls those few trajectories
  to the nearest component and the learned gradient does not pull back as hard. Measured
  0.986–0.993 over the 8 classifiers, both samplers. That the shortfall lives at small t is
  checked directly: with the exact gradient below t = 300 and the learned one above, the
  fraction is the exact one's.
- Moments of the samples in the target component: mean within MC + 1e-3 + 0.1·s, std within
  MC + DISC (the sampler's own bias for ε*, from the engine test) + A relative, where A = 0.03
  for DDPM and 0.10 for DDIM. Measured over the 8 classifiers: mean bias ≤ 0.085·s; std
  within 1% of the exact-guided run for DDPM but up to −10% for DDIM. DDIM is deterministic,
  so an error in g moves each endpoint and the errors add up along the path; DDPM's fresh
  noise at every step lets the chain forget earlier errors. The same tolerances hold against
  the exact-gradient run from the same x_T and noise.
- The gradient itself at t = 300–600 (where guidance decides the class): norm-weighted cosine
  similarity to the exact gradient ≥ 0.98 (measured ≥ 0.995), relative RMS error ≤ 0.35
  (measured 0.06–0.25).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from guidekit_classifier.guidance import ClassifierGuidance
from test_engine_analytic import (
    ABAR,
    MIX,
    SCHEDULE,
    T,
    check_moments,
    class_guidance,
    classify,
    exact_class_grad,
    gen,
    model_for,
)
from torch import Tensor, nn

from guidekit.engine import Sampler
from guidekit.guidance import GuidanceTerm, StepInput

TARGET = 2  # the rarest component (π = 0.2)
N = 4096
SQRT_AB = ABAR.sqrt().float()
SQRT_1MAB = (1 - ABAR).sqrt().float()
LOG_SNR = (ABAR.log() - (1 - ABAR).log()).float()


class NoisyMLP(nn.Module):
    """logits(x_t, t) from x_t and a scalar embedding of t: √ᾱ_t, √(1−ᾱ_t), log SNR / 10."""

    def __init__(self, hidden: int = 128, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = torch.stack([SQRT_AB[t], SQRT_1MAB[t], LOG_SNR[t] / 10], dim=1)
        return self.net(torch.cat([x, emb], dim=1))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """2-D batches are far too small to gain from threads; one thread also keeps the run
    from thrashing when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def classifier(one_thread) -> NoisyMLP:
    """Cross-entropy on x_t = √ᾱ x_0 + √(1−ᾱ) ε, x_0 ~ mixture, t ~ U{0..T−1}: 1000 Adam
    steps of 1024 fresh samples (about a second on two cores)."""
    torch.manual_seed(0)
    model = NoisyMLP()
    steps = 1000
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = gen(0)
    for i in range(steps):
        x0, y = MIX.sample(1024, seed=10_000 + i)
        t = torch.randint(0, T, (1024,), generator=g)
        x_t = SQRT_AB[t, None] * x0 + SQRT_1MAB[t, None] * torch.randn(x0.shape, generator=g)
        loss = F.cross_entropy(model(x_t, t), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr.step()
    return model.eval().requires_grad_(False)


def sampler_for(method: str) -> tuple[Sampler, float, float]:
    """The sampler, its own std bias for the exact ε* (see test_engine_analytic) and the std
    allowance for the trained classifier (see the module note)."""
    if method == "ddpm":
        return Sampler(model_for(MIX), SCHEDULE, steps=500, variance="small"), 0.025, 0.03
    return Sampler(model_for(MIX), SCHEDULE, steps=250), 0.03, 0.10


def run(method: str, g) -> Tensor:
    sampler, _, _ = sampler_for(method)
    terms = [GuidanceTerm(g, scale=1.0)]
    if method == "ddpm":
        return sampler.ddpm(shape=(N, 2), guidance=terms, generator=gen(31))
    return sampler.ddim(shape=(N, 2), guidance=terms, generator=gen(31))


def fraction(x: Tensor) -> float:
    return float((classify(x, MIX) == TARGET).double().mean())


def check_close(x: Tensor, mean: Tensor, std: Tensor, std_allow: float, label: str) -> None:
    """Mean within 4·s/√n + 1e-3 + 0.1·s, std within 4/√(2n) + std_allow relative."""
    n, s = len(x), MIX.stds[TARGET].float()
    mean_err = (x.mean(0) - mean.float()).abs()
    mean_tol = 4 * s / math.sqrt(n) + 1e-3 + 0.1 * s
    std_err = (x.std(0) / std.float() - 1).abs()
    std_tol = 4 / math.sqrt(2 * n) + std_allow
    print(f"[{label}] n={n} mean err {mean_err.tolist()} tol {mean_tol.tolist()} | "
          f"std rel err {std_err.tolist()} tol {std_tol:.4f}")
    assert bool((mean_err <= mean_tol).all()), f"{label}: mean {x.mean(0)} vs {mean}"
    assert bool((std_err <= std_tol).all()), f"{label}: std {x.std(0)} vs {std}"


@pytest.mark.parametrize("t", [300, 400, 500, 600])
def test_trained_classifier_gradient_matches_exact(classifier, t):
    """At moderate noise, where guidance decides the class, the trained classifier's
    ∇ log p(y | x_t) points the exact way: norm-weighted cosine ≥ 0.98 (measured ≥ 0.996)
    and relative RMS error ≤ 0.35 (measured 0.06–0.25)."""
    x0, _ = MIX.sample(N, seed=32)
    ts = torch.full((N,), t)
    x_t = SQRT_AB[t] * x0 + SQRT_1MAB[t] * torch.randn(x0.shape, generator=gen(33))
    inp = StepInput(x_t=x_t, t=ts, k=ts, eps=x_t, x0=x_t, schedule=SCHEDULE, model=None)
    learned = ClassifierGuidance(classifier, torch.full((N,), TARGET))(inp)
    exact = exact_class_grad(x_t, ts, MIX, TARGET)
    w = exact.norm(dim=1)
    cos = (F.cosine_similarity(learned, exact, dim=1) * w).sum() / w.sum()
    rel = (learned - exact).pow(2).sum(1).mean().sqrt() / w.pow(2).mean().sqrt()
    print(f"[t={t}] weighted cosine {float(cos):.4f}, relative RMS error {float(rel):.3f}")
    assert cos >= 0.98
    assert rel <= 0.35


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_trained_classifier_guidance_samples_the_class(classifier, method):
    """Scale 1 with the trained classifier ≈ scale 1 with the exact gradient ≈ component y."""
    _, disc, allow = sampler_for(method)
    classes = torch.full((N,), TARGET)
    learned = run(method, ClassifierGuidance(classifier, classes))
    exact = run(method, class_guidance(MIX, TARGET))
    f_learned, f_exact = fraction(learned), fraction(exact)
    print(f"[{method}] fraction in class {TARGET}: trained {f_learned:.4f}, exact {f_exact:.4f}")
    assert f_exact >= 0.995
    assert f_learned >= 0.975
    x = learned[classify(learned, MIX) == TARGET]
    xe = exact[classify(exact, MIX) == TARGET]
    check_moments(xe, MIX.means[TARGET], MIX.stds[TARGET], disc, f"exact {method}")
    check_close(x, MIX.means[TARGET], MIX.stds[TARGET], disc + allow, f"trained {method}")
    check_close(x, xe.mean(0), xe.std(0), allow, f"trained vs exact-guided {method}")


def test_the_shortfall_is_at_small_t(classifier):
    """Exact gradient for t < 300, trained above: the fraction is the exact one's, so what the
    trained classifier misses (see the module note) is the steep small-t region."""
    learned = ClassifierGuidance(classifier, torch.full((N,), TARGET))
    exact = class_guidance(MIX, TARGET)

    def hybrid(inp: StepInput) -> Tensor:
        small = (inp.t < 300).to(inp.x_t.dtype)[:, None]
        return small * exact(inp) + (1 - small) * learned(inp)

    f = fraction(run("ddim", hybrid))
    print(f"[hybrid] fraction {f:.4f}")
    assert f >= 0.995
