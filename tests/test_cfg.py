"""Classifier-free guidance: sign and scale against a Gaussian mixture whose ε(x_t, y) and
ε(x_t, ∅) are exact, one batched forward, composition, and the command line."""

from __future__ import annotations

import math

import pytest
import torch
from guidekit_cfg import ClassifierFreeGuidance
from torch import Tensor, nn

from guidekit import ops
from guidekit.engine import Sampler
from guidekit.guidance import GuidanceTerm, StepInput
from guidekit.schedule import NoiseSchedule, ScheduleConfig
from guidekit.testing import assert_one_line_error, run_cli, tiny_unet_config

MEANS = torch.tensor([[-2.0, 0.5], [2.0, -0.5], [0.0, 2.5]])  # class means of x_0, (K, D)
SPREAD = 0.3  # each class is N(μ_y, SPREAD² I)
PRIOR = torch.tensor([0.5, 0.3, 0.2])


class ExactMixture(nn.Module):
    """ε(x_t, t, y) of x_0 ~ Σ_y π_y N(μ_y, s² I), exact: label K is ∅ (the mixture).

    x_t | y ~ N(√ᾱ μ_y, v I) with v = ᾱ s² + 1 − ᾱ, so ε(x_t, y) = √(1−ᾱ)(x_t − √ᾱ μ_y)/v,
    and ε(x_t, ∅) is the responsibility-weighted mean of the class ε's.
    """

    def __init__(self, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.ab = schedule.float64["alphas_cumprod"].float()
        self.null_label = len(MEANS)
        self.calls: list[int] = []

    def log_joint(self, x: Tensor, t: Tensor) -> Tensor:
        """log π_y N(x_t; √ᾱ μ_y, v I), (B, K), images (B, 1, 1, D)."""
        ab = self.ab[t][:, None, None]
        v = ab * SPREAD**2 + 1 - ab
        d = x.flatten(1)[:, None, :] - ab.sqrt() * MEANS[None]
        return PRIOR.log()[None] - 0.5 * (d.pow(2) / v).sum(-1) - 0.5 * MEANS.shape[1] * (
            2 * math.pi * v[..., 0]).log()

    def class_eps(self, x: Tensor, t: Tensor) -> Tensor:
        ab = self.ab[t][:, None, None]
        v = ab * SPREAD**2 + 1 - ab
        return (1 - ab).sqrt() * (x.flatten(1)[:, None, :] - ab.sqrt() * MEANS[None]) / v

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.calls.append(x.shape[0])
        per_class = self.class_eps(x, t)  # (B, K, D)
        resp = torch.softmax(self.log_joint(x, t), -1)[..., None]
        null = (resp * per_class).sum(1)
        given = per_class[torch.arange(len(y)), y.clamp(max=len(MEANS) - 1)]
        eps = torch.where((y == self.null_label)[:, None], null, given)
        return eps.reshape(x.shape)


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config(ScheduleConfig(num_timesteps=200))


def _step_input(model: ExactMixture, schedule: NoiseSchedule, x: Tensor, k: int,
                y: Tensor) -> StepInput:
    kk = torch.full((x.shape[0],), k)
    null = torch.full_like(y, model.null_label)
    eps = model(x, kk, null)
    return StepInput(x_t=x, t=kk, k=kk, eps=eps, x0=ops.predict_x0(schedule.tables, x, kk, eps),
                     schedule=schedule, model=model, y=null, label_eps=model(x, kk, y))


@pytest.mark.parametrize("k", [5, 60, 150, 199])
def test_g_is_the_gradient_of_log_p_y_given_x_t(schedule, k):
    """The sign and scale: g = −(ε(y) − ε(∅))/√(1−ᾱ) is ∇ log p(y | x_t) exactly."""
    model = ExactMixture(schedule)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(64, 1, 1, 2, generator=gen) * 2
    y = torch.randint(0, 3, (64,), generator=gen)
    g = ClassifierFreeGuidance(y)(_step_input(model, schedule, x, k, y))
    xr = x.clone().requires_grad_(True)
    t = torch.full((64,), k)
    log_post = torch.log_softmax(model.log_joint(xr, t), -1).gather(1, y[:, None]).sum()
    (want,) = torch.autograd.grad(log_post, xr)
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_ddim_step_is_the_epsilon_mix(schedule, w):
    """One guided DDIM step equals the unguided step on ε̂ = ε(∅) + w·(ε(y) − ε(∅))."""
    model = ExactMixture(schedule)
    x = torch.randn(32, 1, 1, 2, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
    null = torch.full_like(y, model.null_label)
    sampler = Sampler(model, schedule, steps=[120, 100])
    k = torch.full((32,), 1)
    term = GuidanceTerm(ClassifierFreeGuidance(y), w, name="cfg")
    wanted = sampler._wanted([term], x, null)
    eps_hat, _, g = sampler._eps([term], wanted, x, k, null, {})
    tab = sampler.schedule.tables
    guided, _ = ops.ddim_step(tab, x, k, eps_hat, g, None, 0.0, False, True)
    t = sampler.schedule.timesteps[k]
    e0, ey = model(x, t, null), model(x, t, y)
    plain, _ = ops.ddim_step(tab, x, k, e0 + w * (ey - e0), None, None, 0.0, False, True)
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)


def test_both_epsilons_come_from_one_batched_forward(schedule):
    model = ExactMixture(schedule)
    y = torch.tensor([0, 1, 2, 0])
    sampler = Sampler(model, schedule, steps="ddim10")
    sampler.ddim(shape=(4, 1, 1, 2), y=torch.full_like(y, model.null_label),
                 guidance=[GuidanceTerm(ClassifierFreeGuidance(y), 2.0, name="cfg")])
    assert model.calls == [8] * 10  # one forward per step, of both halves


def _sample(schedule, y: Tensor, w: float, sampler: str = "ddim") -> Tensor:
    model = ExactMixture(schedule)
    s = Sampler(model, schedule, steps=None if sampler == "ddpm" else "ddim100")
    gen = torch.Generator().manual_seed(0)
    terms = [GuidanceTerm(ClassifierFreeGuidance(y), w, name="cfg")]
    x = s.sample(sampler, shape=(len(y), 1, 1, 2), generator=gen, guidance=terms,
                 y=torch.full_like(y, model.null_label))
    return x.flatten(1)


def _nearest(x: Tensor) -> Tensor:
    return torch.cdist(x, MEANS).argmin(-1)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_scale_one_samples_the_class_and_zero_the_mixture(schedule, sampler):
    n = 3000
    y = torch.full((n,), 1)
    x1 = _sample(schedule, y, 1.0, sampler)
    # w = 1 is the conditional model: N(μ_1, s²) (mean within 4 standard errors)
    assert (x1.mean(0) - MEANS[1]).abs().max() < 4 * SPREAD / math.sqrt(n) + 0.02
    assert abs(float(x1.std(0).mean()) - SPREAD) < 0.03
    # w = 0 ignores y: the mixture's class frequencies (binomial, 4 standard errors)
    freq = torch.bincount(_nearest(_sample(schedule, y, 0.0, sampler)), minlength=3) / n
    assert (freq - PRIOR).abs().max() < 4 * math.sqrt(0.25 / n)


def test_larger_scale_moves_samples_away_from_the_other_classes(schedule):
    """Past w = 1 the samples sharpen toward regions where p(y | x) is high: judged by a
    blurred posterior (classes of spread 1.5, which still overlap), its log-probability of
    the target rises with w."""
    y = torch.full((500,), 0)
    log_post = []
    for w in (1.0, 2.0, 4.0):
        x = _sample(schedule, y, w)
        lp = torch.log_softmax(-torch.cdist(x, MEANS).pow(2) / (2 * 1.5**2), -1)
        log_post.append(float(lp[:, 0].mean()))
    assert log_post[0] < log_post[1] < log_post[2]


class ToyScore:
    """A fixed score-form g (a stand-in for a classifier's gradient)."""

    def __init__(self, g: Tensor) -> None:
        self.g = g

    def __call__(self, inp: StepInput) -> Tensor:
        return self.g


def test_composes_with_another_guidance_by_summing(schedule):
    model = ExactMixture(schedule)
    x = torch.randn(8, 1, 1, 2, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(4))
    null = torch.full_like(y, model.null_label)
    other = torch.randn(8, 1, 1, 2, generator=torch.Generator().manual_seed(5))
    sampler = Sampler(model, schedule)
    k = torch.full((8,), 90)
    terms = [GuidanceTerm(ClassifierFreeGuidance(y), 2.0, name="cfg"),
             GuidanceTerm(ToyScore(other), 0.5, name="toy")]
    _, _, g = sampler._eps(terms, sampler._wanted(terms, x, null), x, k, null, {})
    cfg_g = ClassifierFreeGuidance(y)(_step_input(model, schedule, x, 90, y))
    torch.testing.assert_close(g, 2.0 * cfg_g + 0.5 * other)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cfg_dpm(tmp_path_factory):
    from guidekit.ddpm import train_ddpm
    from guidekit.lookup import load_dataset
    from guidekit.training import TrainConfig

    images = load_dataset("digits", "train")
    unet = tiny_unet_config(images)
    unet = type(unet)(**{**unet.to_dict(), "num_classes": 10, "null_class": True})
    out = tmp_path_factory.mktemp("cfg") / "dpm"
    train_ddpm(images, out, unet=unet, schedule=ScheduleConfig(num_timesteps=50),
               config=TrainConfig(steps=3, batch_size=8, save_every=3), cond_drop=0.2,
               samples=0, progress=False)
    return out


def test_cfg_samples_through_the_cli(cfg_dpm, tmp_path, capsys):
    import json

    for scale in ("0", "1", "4"):
        code, out, err = run_cli(capsys, "sample", "--checkpoint", str(cfg_dpm), "--guidance",
                                 "cfg", "--scale", scale, "--class-per-row", "--n", "10",
                                 "--steps", "4", "--out", str(tmp_path / f"s{scale}.png"),
                                 "--json")
        assert code == 0, err
        assert math.isfinite(json.loads(out)["std"])


def test_cfg_sampling_is_seeded_and_its_scale_matters(cfg_dpm):
    from guidekit.ddpm import load_dpm
    from guidekit.sampling import GuidanceRequest, sample

    dpm = load_dpm(cfg_dpm)
    alone = sample(dpm, 4, steps=3, guidance=[GuidanceRequest("cfg", 2.0)], classes=[1])
    again = sample(dpm, 4, steps=3, guidance=[GuidanceRequest("cfg", 2.0)], classes=[1])
    uncond = sample(dpm, 4, steps=3, guidance=[GuidanceRequest("cfg", 0.0)], classes=[1])
    torch.testing.assert_close(alone, again)
    assert not torch.equal(alone, uncond)


def test_cfg_on_a_dpm_without_a_null_class_is_one_line(tmp_path, capsys):
    from guidekit.testing import make_tiny_dpm

    dpm = make_tiny_dpm(tmp_path / "u", steps=1)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(dpm), "--guidance", "cfg",
                           "--class", "1", "--n", "2", "--steps", "2", "--out",
                           str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "--cond-drop", "unconditional")


def test_null_class_features_are_those_of_the_first_half():
    from guidekit.unet import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig(image_size=8, in_channels=1, model_channels=8, channel_mult=(1,),
                           attention_resolutions=(), num_classes=3, null_class=True))
    assert unet.null_label == 3
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 4])
    both = unet.down(torch.cat([x, x]), t.repeat(2), torch.tensor([0, 1, 3, 3])).first(2)
    alone = unet.down(x, t, torch.tensor([0, 1]))
    torch.testing.assert_close(both.h, alone.h)
    torch.testing.assert_close(both.emb, alone.emb)
