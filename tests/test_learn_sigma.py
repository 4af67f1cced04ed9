"""Learned Σ: the bound's terms against their closed forms on Gaussians, the hybrid
objective's gradients, and class-conditional / fine-tuning runs of `guidekit train ddpm`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from guidekit import ops
from guidekit.ddpm import DDPMTask, load_dpm, train_ddpm
from guidekit.lookup import load_dataset
from guidekit.schedule import NoiseSchedule, ScheduleConfig
from guidekit.testing import assert_one_line_error, run_cli, tiny_unet_config
from guidekit.training import TrainConfig
from guidekit.vlb import discretized_gaussian_log_likelihood, normal_kl, vlb_terms


def test_normal_kl_is_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=gen, dtype=torch.float64), torch.randn(
        100, generator=gen, dtype=torch.float64)
    lv1, lv2 = torch.randn(100, generator=gen, dtype=torch.float64), torch.randn(
        100, generator=gen, dtype=torch.float64)
    want = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want)


def test_discretised_likelihood_is_the_bins_probability_and_sums_to_one():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    mean, log_scale = torch.tensor(0.3, dtype=torch.float64), torch.tensor(
        math.log(0.2), dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(levels, mean, log_scale)
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    d = Normal(mean, log_scale.exp())
    inner = levels[1:-1]
    want = d.cdf(inner + 1 / 255) - d.cdf(inner - 1 / 255)
    torch.testing.assert_close(logp[1:-1].exp(), want)
    torch.testing.assert_close(logp[0].exp(), d.cdf(levels[0] + 1 / 255))
    torch.testing.assert_close(logp[-1].exp(), 1 - d.cdf(levels[-1] - 1 / 255))


@pytest.fixture
def tables():
    return NoiseSchedule.from_config(ScheduleConfig(num_timesteps=100)).float64


def _posterior(tab, x0, x_t, t):
    """q(x_{t−1} | x_t, x_0) from DESIGN's formulas, computed here, in float64."""
    b, ab = tab["betas"][t], tab["alphas_cumprod"][t]
    ab_prev = tab["alphas_cumprod_prev"][t]
    c1 = b * ab_prev.sqrt() / (1 - ab)
    c2 = (1 - b).sqrt() * (1 - ab_prev) / (1 - ab)
    var = b * (1 - ab_prev) / (1 - ab)
    return c1 * x0 + c2 * x_t, var


def test_vlb_terms_are_the_kl_between_the_gaussians(tables):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 1, 2, 2, generator=gen, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 5, 20, 50, 80, 99])
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x_t = ops.q_sample(tables, x0, t, noise)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    v = torch.rand(x0.shape, generator=gen, dtype=torch.float64) * 2 - 1
    got = vlb_terms(tables, x0, x_t, t, eps, v)
    for i, ti in enumerate(t.tolist()):
        mean_q, var_q = _posterior(tables, x0[i], x_t[i], ti)
        b, ab = tables["betas"][ti], tables["alphas_cumprod"][ti]
        mean_p = (x_t[i] - b / (1 - ab).sqrt() * eps[i]) / (1 - b).sqrt()
        frac = (v[i] + 1) / 2
        log_var_p = frac * b.log() + (1 - frac) * tables["posterior_log_variance_clipped"][ti]
        kl = kl_divergence(Normal(mean_q, var_q.sqrt()), Normal(mean_p, (0.5 * log_var_p).exp()))
        assert float(got[i]) == pytest.approx(float(kl.mean()) / math.log(2), rel=1e-9)


def test_vlb_term_vanishes_for_the_true_noise_and_posterior_variance(tables):
    """ε = the noise makes μ_θ = μ̃, and v = −1 makes Σ = β̃: the KL is zero."""
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 1, 3, 3, generator=gen, dtype=torch.float64) * 2 - 1
    t = torch.tensor([3, 30, 60, 99])
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x_t = ops.q_sample(tables, x0, t, noise)
    got = vlb_terms(tables, x0, x_t, t, noise, -torch.ones_like(x0))
    assert float(got.abs().max()) < 1e-9


def test_vlb_term_at_t0_is_the_decoders_nll(tables):
    x0 = torch.linspace(-1, 1, 256, dtype=torch.float64).reshape(1, 1, 16, 16)
    t = torch.zeros(1, dtype=torch.long)
    x_t = ops.q_sample(tables, x0, t, torch.zeros_like(x0))
    eps, v = torch.zeros_like(x0), torch.zeros_like(x0)
    mean = ops.model_mean(tables, x_t, t, eps)
    _, log_var = ops.variance(tables, t, x_t, "learned", v)
    want = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean() / math.log(2)
    assert float(vlb_terms(tables, x0, x_t, t, eps, v)) == pytest.approx(float(want))


class Output(nn.Module):
    """A 'model' whose output is one trainable tensor, to read the loss's gradients."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.out = nn.Parameter(torch.randn(shape) * 0.1)
        self.config = type("C", (), {"learn_sigma": True, "num_classes": None})()

    def forward(self, x, t):
        return self.out


def _grads(vlb_weight: float):
    data = load_dataset("digits", "train")
    sched = NoiseSchedule.from_config(ScheduleConfig(num_timesteps=50))
    torch.manual_seed(0)
    model = Output((4, 2, 16, 16))
    task = DDPMTask(model, sched, torch.ones(50), {"name": "uniform", "options": {}}, data,
                    {"name": "unet", "config": {}}, vlb_weight=vlb_weight)
    loss = task.loss({"model": model}, data.images[:4], None, torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad(loss, model.out)
    return g


def test_the_vlb_term_trains_sigma_only():
    """The hybrid loss's gradient on the ε half is L_simple's (a stop-gradient mean); the Σ
    half gets gradient only from the bound."""
    simple, hybrid = _grads(0.0), _grads(0.001)
    torch.testing.assert_close(hybrid[:, :1], simple[:, :1])
    assert float(simple[:, 1:].abs().max()) == 0.0
    assert float(hybrid[:, 1:].abs().max()) > 0.0


# --------------------------------------------------------------------------- training runs


def _train(out, steps=3, resume=False, **unet_kw):
    images = load_dataset("digits", "train")
    unet = tiny_unet_config(images)
    unet = type(unet)(**{**unet.to_dict(), **unet_kw})
    cond_drop = 0.25 if unet_kw.get("null_class") else 0.0
    return train_ddpm(images, out, unet=unet, schedule=ScheduleConfig(num_timesteps=50),
                      config=TrainConfig(steps=steps, batch_size=8, save_every=3, log_every=1),
                      cond_drop=cond_drop, samples=0, progress=False, resume=resume)


def test_learned_sigma_run_resumes_exactly(tmp_path):
    _train(tmp_path / "a", steps=6, learn_sigma=True)
    _train(tmp_path / "b", steps=3, learn_sigma=True)
    _train(tmp_path / "b", steps=6, learn_sigma=True, resume=True)
    a, b = load_dpm(tmp_path / "a"), load_dpm(tmp_path / "b")
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name
    assert a.config["objective"] == {"cond_drop": 0.0, "vlb_weight": 0.001}


def test_class_conditional_run_uses_labels_and_drops_some(tmp_path):
    from guidekit.ddpm import DDPMTask as Task

    _train(tmp_path / "c", null_class=True, num_classes=10)
    dpm = load_dpm(tmp_path / "c")
    assert dpm.model.null_label == 10 and dpm.config["objective"]["cond_drop"] == 0.25
    task = Task(dpm.model, dpm.schedule, torch.ones(50), {}, load_dataset("digits", "train"),
                cond_drop=0.25)
    labels = torch.arange(10).repeat(400)
    (y,) = task._condition(labels, torch.Generator().manual_seed(0))
    dropped = y == 10
    assert abs(float(dropped.float().mean()) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 4000)
    assert torch.equal(y[~dropped], labels[~dropped])


def test_class_cond_cli_and_its_mistakes(tmp_path, capsys):
    base = ("train", "ddpm", "--model-channels", "8", "--channel-mult", "1,2",
            "--attention", "", "--num-heads", "1", "--timesteps", "50", "--batch-size", "8",
            "--samples", "10")
    code, out, err = run_cli(capsys, *base, "--out", str(tmp_path / "cc"), "--steps", "2",
                             "--class-cond", "--cond-drop", "0.1", "--learn-sigma", "--json")
    assert code == 0, err
    config = json.loads((tmp_path / "cc" / "config.json").read_text())
    assert config["model"]["config"]["num_classes"] == 10
    assert config["model"]["config"]["learn_sigma"] is True
    from guidekit.data import save_images

    folder = tmp_path / "unlabelled"
    save_images(load_dataset("digits", "train").images[:8], folder)
    cases = [
        (("--cond-drop", "0.1"), "--class-cond"),
        (("--class-cond", "--cond-drop", "1.5"), "[0, 1)"),
        (("--class-cond", "--data", str(folder)), "labels"),
    ]
    for extra, needle in cases:
        code, _, err = run_cli(capsys, *base, "--out", str(tmp_path / "bad"), "--steps", "1",
                               *extra)
        assert_one_line_error(code, err, needle)


def test_init_fine_tunes_a_checkpoint_and_refuses_new_architecture(tmp_path, capsys):
    _train(tmp_path / "start", learn_sigma=True)
    code, out, err = run_cli(capsys, "train", "ddpm", "--init", str(tmp_path / "start"),
                             "--out", str(tmp_path / "tuned"), "--steps", "2", "--batch-size",
                             "8", "--samples", "0", "--json")
    assert code == 0, err
    start, tuned = load_dpm(tmp_path / "start"), load_dpm(tmp_path / "tuned")
    assert tuned.config["model"] == start.config["model"]
    assert tuned.config["schedule"] == start.config["schedule"]
    assert not torch.equal(next(iter(start.model.parameters())),
                           next(iter(tuned.model.parameters())))
    for extra, needle in [(("--model-channels", "16"), "--model-channels"),
                          (("--resume",), "--resume"),
                          (("--data", "shapes"), "px")]:
        code, _, err = run_cli(capsys, "train", "ddpm", "--init", str(tmp_path / "start"),
                               "--out", str(tmp_path / "t2"), "--steps", "1", *extra)
        assert_one_line_error(code, err, needle)
