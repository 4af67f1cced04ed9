"""The inpaint guidance: its gradient against closed forms and finite differences, and its
effect inside guidekit's samplers (an analytic model, then the tiny DPM)."""

from __future__ import annotations

import pytest
import torch
from guidekit import ops
from guidekit.engine import Sampler
from guidekit.errors import GuidekitError
from guidekit.guidance import GuidanceTerm, StepInput
from guidekit.schedule import NoiseSchedule, ScheduleConfig
from torch import Tensor, nn

from guidekit_inpaint import InpaintGuidance, named_mask
from guidekit_inpaint.evaluate import evaluate_inpainting, jsonable, region_mse

T = 100


def full_schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config(ScheduleConfig(num_timesteps=T))


def step_input(model: nn.Module, x: Tensor, steps: str | None, k_index: int) -> StepInput:
    """What the engine hands a guidance at step ``k_index`` of a (respaced) schedule."""
    sched = full_schedule() if steps is None else full_schedule().respace(steps)
    k = torch.full((x.shape[0],), k_index)
    t = sched.timesteps[k]
    eps = model(x, t)
    return StepInput(x_t=x, t=t, k=k, eps=eps, x0=ops.predict_x0(sched.tables, x, k, eps),
                     schedule=sched, model=model)


class LinearEps(nn.Module):
    """ε = a(t)·x with a(t) = t/T, so x̂_0 = c(t)·x in closed form and the guidance is
    g = −c·m⊙(c·x − y)/σ². Depending on t catches a model fed the step index instead."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return (t.to(x.dtype) / T).reshape(-1, 1, 1, 1) * x


class TinyNet(nn.Module):
    """A small nonlinear, t-dependent ε for finite differences (float64)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(1, 4, 3, padding=1).double()
        self.b = nn.Conv2d(4, 1, 3, padding=1).double()
        self.requires_grad_(False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x))) * (1 + t.to(x.dtype) / T).reshape(-1, 1, 1, 1)


def x0_at(model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    """x̂_0 from the *unrespaced* ᾱ at the original t, independent of the plugin's code."""
    ab = full_schedule().float64["alphas_cumprod"][t].reshape(-1, 1, 1, 1)
    return (x - (1 - ab).sqrt() * model(x, t)) / ab.sqrt()


@pytest.mark.parametrize("steps,k_index", [(None, 60), ("ddim10", 7), ("10", 3)])
def test_gradient_matches_the_closed_form(steps: str | None, k_index: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.rand(2, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    m, sigma = named_mask("left", 8).double(), 0.3
    inp = step_input(LinearEps(), x, steps, k_index)
    ab = full_schedule().float64["alphas_cumprod"][inp.t].reshape(-1, 1, 1, 1)
    c = 1 / ab.sqrt() - (1 / ab - 1).sqrt() * (inp.t.double() / T).reshape(-1, 1, 1, 1)
    r = m * (c * x - y)
    expected = -c * r / sigma**2
    got = InpaintGuidance(y, m, sigma, norm="sigma")(inp)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-8)
    # DPS's form: the residual's norm (per sample) replaces σ once
    norm = r.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    got = InpaintGuidance(y, m, sigma, norm="residual")(inp)
    assert torch.allclose(got, -c * r / (sigma * norm), rtol=1e-5, atol=1e-8)
    assert float(expected[..., 4:].abs().max()) == 0  # nothing pulls the unknown half


@pytest.mark.parametrize("norm", ["sigma", "residual"])
def test_gradient_matches_finite_differences(norm: str) -> None:
    model = TinyNet()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.rand(1, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    m, sigma = named_mask("border", 8).double(), 0.2
    inp = step_input(model, x, "ddim20", 12)
    g = InpaintGuidance(y, m, sigma, norm)(inp)

    def log_likelihood(z: Tensor) -> Tensor:
        r = (m * (x0_at(model, z, inp.t) - y)).flatten()
        # the residual form is the gradient of ‖r‖/σ (DPS's ∇‖r‖² / (2‖r‖))
        return -(r @ r) / (2 * sigma**2) if norm == "sigma" else -r.norm() / sigma

    for seed in range(3):
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
        h = 1e-5
        fd = (log_likelihood(x + h * v) - log_likelihood(x - h * v)) / (2 * h)
        assert float((g * v).sum()) == pytest.approx(float(fd), rel=1e-6)


def test_a_learned_variance_half_is_ignored() -> None:
    model = TinyNet()

    class WithVariance(nn.Module):
        def forward(self, x: Tensor, t: Tensor) -> Tensor:
            return torch.cat([model(x, t), torch.full_like(x, 7.0)], dim=1)

    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    y, m = torch.zeros_like(x), named_mask("top", 8).double()
    plain = InpaintGuidance(y, m, 0.1, "sigma")(step_input(model, x, None, 40))
    inp = step_input(model, x, None, 40)
    inp.model = WithVariance()
    assert torch.allclose(InpaintGuidance(y, m, 0.1, "sigma")(inp), plain)


def test_bad_settings_are_one_line_errors() -> None:
    y, m = torch.zeros(1, 1, 8, 8), named_mask("left", 8)
    with pytest.raises(GuidekitError, match="--inpaint-sigma must be > 0"):
        InpaintGuidance(y, m, sigma=0)
    with pytest.raises(GuidekitError, match="unknown --inpaint-norm 'l1'"):
        InpaintGuidance(y, m, norm="l1")
    with pytest.raises(GuidekitError, match="one size"):
        InpaintGuidance(y, named_mask("left", 16))
    guide = InpaintGuidance(torch.zeros(3, 1, 8, 8), m)
    with pytest.raises(GuidekitError, match="3 reference images for a batch of 2"):
        guide(step_input(LinearEps(), torch.zeros(2, 1, 8, 8), None, 5))


class GaussianEps(nn.Module):
    """The exact ε-predictor of data x_0 ~ N(mean, std²) per pixel: pixels are independent,
    so guidance on the known pixels must leave every unknown pixel exactly as unguided."""

    def __init__(self, mean: Tensor, std: float) -> None:
        super().__init__()
        self.abar = full_schedule().tables["alphas_cumprod"]
        self.mean, self.var = mean, std**2

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        ab = self.abar[t].reshape(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mean) / (ab * self.var + 1 - ab)


@pytest.mark.parametrize("sampler,steps,norm,sigma", [
    ("ddim", None, "sigma", 0.1), ("ddim", "ddim10", "sigma", 0.2),
    ("ddpm", None, "sigma", 0.1), ("ddpm", "10", "sigma", 0.2),
    ("ddim", None, "residual", 0.01), ("ddim", "ddim10", "residual", 0.03),
    ("ddpm", None, "residual", 0.01), ("ddpm", "25", "residual", 0.01),
])
def test_guidance_keeps_the_known_pixels_of_an_analytic_model(
    sampler: str, steps: str | None, norm: str, sigma: float
) -> None:
    torch.manual_seed(0)
    mean = torch.rand(1, 1, 8, 8) - 0.5
    y = (mean + 0.5 * torch.randn(1, 1, 8, 8)).clamp(-1, 1)
    m = named_mask("left", 8)
    engine = Sampler(GaussianEps(mean, 0.5), full_schedule(), steps=steps, clip_x0=True,
                     clip_order="guide-then-clip")
    run = engine.ddim if sampler == "ddim" else engine.ddpm

    def draw(terms: list[GuidanceTerm]) -> Tensor:
        return run(shape=(64, 1, 8, 8), guidance=terms, generator=torch.Generator().manual_seed(0))

    plain = draw([])
    guided = draw([GuidanceTerm(InpaintGuidance(y, m, sigma, norm), 1.0)])
    before, after = region_mse(plain, y, m), region_mse(guided, y, m)
    assert after < 0.2 * before, (before, after)
    assert torch.allclose(guided * (1 - m), plain * (1 - m), atol=1e-6)


def test_guidance_keeps_the_known_region_on_the_tiny_dpm(guidekit_dpm, guidekit_plugins) -> None:
    from guidekit.ddpm import load_dpm

    guidekit_plugins("inpaint")
    # DDIM clips the shifted x̂_0, which keeps even this barely trained DPM's guided steps
    # bounded
    result = evaluate_inpainting(load_dpm(guidekit_dpm), None, n=8, steps=10, norm="sigma",
                                 sigmas=(0.1,))
    unguided, guided = result["rows"]
    assert guided["known_mse"] < 0.5 * unguided["known_mse"], result["rows"]


def test_ddpm_needs_the_residual_norm(guidekit_dpm, guidekit_plugins) -> None:
    """Why residual is the default: under DDPM's mean shift μ + Σ_t·g the likelihood form
    overflows (x̂_0 is steep in x_t at high noise), while DPS's normalisation keeps the step
    bounded. A diverged setting is reported as such, with no figures, and JSON stays valid."""
    import json

    from guidekit.ddpm import load_dpm

    guidekit_plugins("inpaint")
    dpm = load_dpm(guidekit_dpm)
    kw = dict(n=8, steps=10, sampler="ddpm")
    unguided, residual = evaluate_inpainting(dpm, None, **kw)["rows"]
    assert not residual["diverged"], residual
    assert residual["known_mse"] < 0.6 * unguided["known_mse"], (unguided, residual)
    result = evaluate_inpainting(dpm, None, norm="sigma", sigmas=(0.1,), **kw)
    likelihood = result["rows"][1]
    assert likelihood["diverged"] and likelihood["known_mse"] is None
    json.dumps(jsonable(result), allow_nan=False)
