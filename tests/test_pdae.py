"""PDAE core: the networks, the weighting, training on a frozen DPM, loading, the guidance
and its one-line errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from guidekit_pdae import pdae_weights
from guidekit_pdae.guidance import PDAEGuidance, load_latents, save_latents
from guidekit_pdae.networks import (
    Encoder,
    EncoderConfig,
    EstimatorConfig,
    GradientEstimator,
    PDAEModel,
)
from guidekit_pdae.training import KIND, fingerprint, load_pdae, train_pdae

from guidekit import ops
from guidekit.ddpm import load_dpm
from guidekit.engine import Sampler
from guidekit.errors import GuidekitError
from guidekit.guidance import GuidanceTerm
from guidekit.lookup import load_dataset
from guidekit.schedule import NoiseSchedule, ScheduleConfig
from guidekit.testing import assert_one_line_error, run_cli
from guidekit.training import TrainConfig
from guidekit.unet import UNet, UNetConfig, down_path_channels


def _cfg(steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=16, lr=2e-3, log_every=1, save_every=steps, **kw)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def tiny_pdae(guidekit_dpm, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("pdae") / "pdae"
    train_pdae(digits, out, pretrained=guidekit_dpm, latent_dim=8, encoder_channels=8,
               config=_cfg(6), progress=False)
    return out


def _weight_digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.suffix in (".safetensors", ".json")}


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize("cfg", [UNetConfig(), UNetConfig(channel_mult=(1, 2), num_res_blocks=2,
                                                          attention_resolutions=())])
def test_down_path_channels_match_the_unet(cfg):
    unet = UNet(cfg)
    assert down_path_channels(cfg) == (unet.skip_channels, unet.down_channels)


def test_estimator_starts_at_zero_and_reads_the_frozen_down_path_once():
    cfg = UNetConfig(model_channels=8, num_heads=1)
    unet = UNet(cfg)
    model = PDAEModel(unet, Encoder(EncoderConfig(latent_dim=4, channels=8)),
                      GradientEstimator(EstimatorConfig(cfg, 4)))
    calls = []
    unet.input_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 50, 999])
    eps, g = model(x, t, model.encoder(x))
    assert len(calls) == 1  # one down pass feeds ε_θ and G_ψ
    assert torch.equal(g, torch.zeros_like(x))
    torch.testing.assert_close(eps, unet(x, t))
    # Gradients reach E_φ and G_ψ only; the frozen UNet has none.
    g.sum().backward()
    assert all(p.grad is None for p in unet.parameters())
    assert any(p.grad is not None for p in model.estimator.parameters())
    model.train()
    assert not unet.training


def test_encoder_rejects_the_wrong_image_shape():
    enc = Encoder(EncoderConfig(image_size=16, in_channels=1))
    with pytest.raises(GuidekitError, match=r"expects \(1, 16, 16\)"):
        enc(torch.randn(2, 3, 32, 32))


def test_pdae_weighting_matches_its_formula():
    sched = NoiseSchedule.from_config(ScheduleConfig())
    snr = sched.float64["snr"]
    gamma = 0.1
    expected = (1 / (1 + snr)) ** (1 - gamma) * (snr / (1 + snr)) ** gamma
    torch.testing.assert_close(pdae_weights(sched, gamma), expected.float())
    # γ = 0 is 1/(1+SNR) = 1−ᾱ_t: the ε-loss turned into an x_0-loss weight.
    torch.testing.assert_close(pdae_weights(sched, 0.0),
                               (1 - sched.float64["alphas_cumprod"]).float())


# --------------------------------------------------------------------------- training


def test_training_never_touches_the_pretrained_dpm(guidekit_dpm, digits, tmp_path):
    before = _weight_digest(guidekit_dpm)
    dpm_fp = fingerprint(load_dpm(guidekit_dpm).model)
    out = tmp_path / "pdae"
    summary = train_pdae(digits, out, pretrained=guidekit_dpm, latent_dim=8, encoder_channels=8,
                         config=_cfg(3), progress=False)
    assert summary["steps"] == 3
    assert _weight_digest(guidekit_dpm) == before
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == KIND
    assert cfg["pretrained"]["fingerprint"] == dpm_fp
    assert cfg["weighting"] == {"name": "pdae", "options": {}}
    pdae = load_pdae(out)
    assert fingerprint(pdae.dpm.model) == dpm_fp
    # What is saved is E_φ and G_ψ only, not a copy of ε_θ.
    names = set(pdae.model.state_dict()) - {f"unet.{k}" for k in pdae.dpm.model.state_dict()}
    assert all(n.startswith(("encoder.", "estimator.")) for n in names)


def test_training_learns_a_shift(tiny_pdae):
    pdae = load_pdae(tiny_pdae)
    x0 = load_dataset("digits", "test").images[:8]
    x_t = torch.randn_like(x0)
    _, g = pdae.shift(x_t, torch.full((8,), 50), pdae.encode(x0))
    assert g.abs().max() > 0  # the zero-initialised output layer has moved


def test_resume_matches_an_uninterrupted_run(guidekit_dpm, digits, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    kw = dict(pretrained=guidekit_dpm, latent_dim=4, encoder_channels=8, progress=False)
    train_pdae(digits, full, config=_cfg(4), **kw)
    train_pdae(digits, part, config=TrainConfig(steps=2, batch_size=16, lr=2e-3, log_every=1,
                                                save_every=2), **kw)
    train_pdae(digits, part, config=_cfg(4), resume=True, **kw)
    a, b = load_pdae(full), load_pdae(part)
    for (k, v), (_, w) in zip(a.model.state_dict().items(), b.model.state_dict().items(),
                              strict=True):
        assert torch.equal(v, w), k


# --------------------------------------------------------------------------- guidance


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_guidance_samples_with_the_trained_eps_under_both_samplers(tiny_pdae, sampler):
    """PDAE guidance (an ε-form shift) steps exactly as a model predicting the training
    loss's ε̂ = guided_eps(ε_θ, G) would, under DDIM and under DDPM (whose mean is then
    μ_θ + β̃_t·G, the trained objective, not Σ·r_t·G)."""
    pdae = load_pdae(tiny_pdae)
    x0 = load_dataset("digits", "test").images[:4]
    z = pdae.encode(x0)
    tab = pdae.dpm.schedule.tables

    def trained_eps_hat(x, t):
        eps, g = pdae.model(x, t, z)
        return ops.guided_eps(tab, x, t, eps, g)

    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))

    def run(model, guidance):
        engine = Sampler(model, pdae.dpm.schedule, steps="ddim5" if sampler == "ddim" else 5)
        gen = torch.Generator().manual_seed(1)
        if sampler == "ddim":
            return engine.ddim(x_T, guidance=guidance)
        return engine.ddpm(x_T, guidance=guidance, generator=gen)

    guided = run(pdae.dpm.model, [GuidanceTerm(PDAEGuidance(pdae, z), name="pdae")])
    torch.testing.assert_close(guided, run(trained_eps_hat, []), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided, run(pdae.dpm.model, []), atol=1e-3)  # G is not zero


def test_guidance_uses_the_samplers_features_and_blends_latents(tiny_pdae):
    pdae = load_pdae(tiny_pdae)
    x0 = load_dataset("digits", "test").images[:4]
    za, zb = pdae.encode(x0), pdae.encode(x0.flip(0))
    sampler = pdae.dpm.sampler(steps="ddim5")
    seen = []

    class Spy(PDAEGuidance):
        def __call__(self, inp):
            seen.append(inp.features is not None)
            return super().__call__(inp)

    x_T = torch.randn_like(x0)
    half = torch.full((4, 2), 0.5)
    out_a = sampler.ddim(x_T, guidance=[GuidanceTerm(Spy(pdae, za))])
    out_mix = sampler.ddim(x_T, guidance=[GuidanceTerm(PDAEGuidance(pdae, [za, zb], half))])
    assert all(seen) and len(seen) == 5
    assert out_a.shape == out_mix.shape == x0.shape
    # A blend with all weight on a is a itself.
    one = torch.tensor([[1.0, 0.0]]).expand(4, 2)
    out_one = sampler.ddim(x_T, guidance=[GuidanceTerm(PDAEGuidance(pdae, [za, zb], one))])
    torch.testing.assert_close(out_one, out_a)


def test_sample_cli_with_pdae_guidance(guidekit_dpm, tiny_pdae, tmp_path, capsys):
    pdae = load_pdae(tiny_pdae)
    z_file = save_latents(pdae.encode(load_dataset("digits", "test").images[:2]),
                          tmp_path / "z.safetensors", pdae)
    torch.testing.assert_close(load_latents(z_file, pdae), pdae.encode(
        load_dataset("digits", "test").images[:2]))
    out = tmp_path / "g.png"
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm),
                           "--guidance", "pdae",
                           "--pdae", str(tiny_pdae), "--latents", str(z_file), "--n", "2",
                           "--steps", "4", "--out", str(out))
    assert code == 0, err
    assert out.exists()


# --------------------------------------------------------------------------- bad input


def test_pretrained_that_is_not_a_dpm(tiny_pdae, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "pdae", "--pretrained", str(tiny_pdae),
                           "--out", str(tmp_path / "p"), "--steps", "1")
    assert_one_line_error(code, err, "'pdae' checkpoint", "'ddpm' checkpoint is needed")
    code, _, err = run_cli(capsys, "train", "pdae", "--pretrained", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "p"), "--steps", "1")
    assert_one_line_error(code, err, "no checkpoint at")


def test_data_of_another_size_than_the_dpm(guidekit_dpm, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "pdae", "--pretrained", str(guidekit_dpm),
                           "--data", "shapes", "--out", str(tmp_path / "p"), "--steps", "1")
    assert_one_line_error(code, err, "1x16x16", "'shapes' has 3x32x32")


def test_pdae_on_another_dpm(guidekit_dpm, tiny_pdae, tmp_path, capsys):
    from guidekit.testing import make_tiny_dpm

    other = make_tiny_dpm(tmp_path / "other", steps=2, seed=1)
    pdae = load_pdae(tiny_pdae)
    z_file = save_latents(pdae.encode(load_dataset("digits", "test").images[:1]),
                          tmp_path / "z.safetensors", pdae)
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(other), "--guidance", "pdae",
                           "--pdae", str(tiny_pdae), "--latents", str(z_file), "--n", "1",
                           "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, "trained on another DPM")
    with pytest.raises(GuidekitError, match="not the one the PDAE"):
        load_pdae(tiny_pdae, pretrained=other)


def test_latents_of_another_model(guidekit_dpm, tiny_pdae, digits, tmp_path, capsys):
    other = tmp_path / "other_pdae"
    train_pdae(digits, other, pretrained=guidekit_dpm, latent_dim=8, encoder_channels=8,
               config=_cfg(1, seed=5), progress=False)
    foreign = save_latents(torch.zeros(1, 8), tmp_path / "z.safetensors", load_pdae(other))
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm),
                           "--guidance", "pdae",
                           "--pdae", str(tiny_pdae), "--latents", str(foreign), "--n", "1",
                           "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, "latents of another model", "re-encode")


@pytest.mark.parametrize("drop, needle", [("--pdae", "needs --pdae"),
                                          ("--latents", "needs --latents")])
def test_guidance_without_its_inputs(guidekit_dpm, tiny_pdae, tmp_path, capsys, drop, needle):
    args = {"--pdae": str(tiny_pdae), "--latents": str(tmp_path / "z.safetensors")}
    args.pop(drop)
    flat = [v for kv in args.items() for v in kv]
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm),
                           "--guidance", "pdae", *flat,
                           "--n", "1", "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert_one_line_error(code, err, needle)
