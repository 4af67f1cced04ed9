"""diffusers UNet2DModel pipelines under guidekit: the converted UNet, the samplers and a
guided loop against diffusers' own pipelines and schedulers, the step spacings, and the
one-line refusals.

Every parity check holds to 1e-5: the largest difference relative to max(1, the largest
value); the clipped and post-processed images lie in [−1, 1] or [0, 1], where that is the
absolute difference, and unclipped samples of a random UNet reach |x| ≈ 200, where float32
rounding alone is ~1e-7 of the value. Tiny UNet2DModels are built here with random weights (normal,
std 0.05, so no layer starts at zero) and saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from guidekit_classifier.guidance import ClassifierGuidance  # noqa: E402

from guidekit.convert_diffusers import convert_diffusers  # noqa: E402
from guidekit.ddpm import load_dpm  # noqa: E402
from guidekit.engine import respacing  # noqa: E402
from guidekit.errors import GuidekitError  # noqa: E402
from guidekit.guidance import GuidanceTerm  # noqa: E402
from guidekit.schedule import space_timesteps, spacing_spec  # noqa: E402

TOL = 1e-5
BASE = dict(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
            attention_head_dim=16)
# the layout choices a UNet2DModel config can make, each converted and compared
VARIANTS = {
    "base": {},
    # google/ddpm-cifar10-32's choices: sines first with shift 1, eps 1e-6, conv padded
    # right/bottom only, one head per layer
    "ddpm-cifar10": dict(flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                         downsample_padding=0, attention_head_dim=None),
    "scale-shift": dict(resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8),
    "class-conditional": dict(num_class_embeds=3),
    "no-mid-attention": dict(add_attention=False),
    "learned-sigma": dict(out_channels=2),
    "odd-widths-three-levels": dict(block_out_channels=(32, 96, 160), layers_per_block=2,
                                    down_block_types=("DownBlock2D", "AttnDownBlock2D",
                                                      "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "AttnUpBlock2D",
                                                    "UpBlock2D"),
                                    norm_num_groups=16, attention_head_dim=None),
}


def make_unet(**changes):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**{**BASE, **changes})
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return unet.eval()


def save_pipeline(path, unet, scheduler=None, **sched):
    scheduler = scheduler or diffusers.DDPMScheduler(**sched)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


def converted(tmp_path, unet, **sched):
    src = save_pipeline(tmp_path / "pipe", unet, **sched)
    return load_dpm(convert_diffusers(src, tmp_path / "gk"))


def max_diff(a, b) -> float:
    """max |a − b| / max(1, max |b|)."""
    b = torch.as_tensor(b).float()
    return float((torch.as_tensor(a).float() - b).abs().max() / b.abs().max().clamp(min=1))


@pytest.mark.parametrize("name", VARIANTS)
def test_converted_unet_matches_diffusers(tmp_path, name):
    unet = make_unet(**VARIANTS[name])
    dpm = converted(tmp_path, unet, variance_type="learned_range" if name == "learned-sigma"
                    else "fixed_small")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 16, 16, generator=gen)
    t = torch.tensor([0, 17, 500, 999])
    y = torch.tensor([0, 1, 2, 1]) if name == "class-conditional" else None
    with torch.no_grad():
        want = unet(x, t, class_labels=y).sample
        got = dpm.model(x, t, y)
    assert float((got - want).abs().max() / want.abs().max()) <= TOL


# --------------------------------------------------------------------------- samplers


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """One tiny DDPMPipeline saved with save_pretrained, and its guidekit conversion."""
    root = tmp_path_factory.mktemp("diffusers")
    unet = make_unet()
    src = save_pipeline(root / "pipe", unet)
    return unet, src, load_dpm(convert_diffusers(src, root / "gk"))


def ddim_pipeline(unet, src, **overrides):
    cfg = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
    return diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler.from_config(cfg, **overrides))


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_matches_ddim_pipeline(pipe, eta, clip):
    unet, src, dpm = pipe
    pipeline = ddim_pipeline(unet, src, clip_sample=clip)
    # guided-diffusion's DDIM (and guidekit's) takes ε from the clipped x̂_0
    want = pipeline(batch_size=3, generator=torch.Generator().manual_seed(5), eta=eta,
                    num_inference_steps=10, use_clipped_model_output=True,
                    output_type="np").images
    engine = dpm.sampler(steps=respacing("ddim", 10, "leading"), clip_x0=clip)
    x = engine.ddim(shape=(3, 1, 16, 16), eta=eta, generator=torch.Generator().manual_seed(5))
    got = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert max_diff(got, want) <= TOL


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_matches_ddpm_pipeline(tmp_path, variance):
    unet = make_unet(out_channels=2 if variance == "learned_range" else 1)
    dpm = converted(tmp_path, unet, num_train_timesteps=50, variance_type=variance)
    sched = diffusers.DDPMScheduler(num_train_timesteps=50, variance_type=variance)
    want = diffusers.DDPMPipeline(unet, sched)(
        batch_size=3, generator=torch.Generator().manual_seed(2), num_inference_steps=50,
        output_type="np").images
    # the checkpoint's defaults carry the scheduler's variance_type and clip_sample
    engine = dpm.sampler(variance=dpm.defaults.variance, clip_x0=dpm.defaults.clip_x0)
    x = engine.ddpm(shape=(3, 1, 16, 16), generator=torch.Generator().manual_seed(2))
    got = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    assert max_diff(got, want) <= TOL


def scheduler_loop(unet, scheduler, steps, x, gen, shift=None, **step_kw):
    """diffusers' own loop: unet → scheduler.step, with ``shift(x, t, eps) -> (eps, add)``
    changing ε before the step and adding to its output (the guided hand-written loop)."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        with torch.no_grad():
            eps = unet(x, t).sample
        add = 0
        if shift is not None:
            eps, add = shift(x, t, eps)
        x = scheduler.step(eps, t, x, generator=gen, **step_kw).prev_sample + add
    return x


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_respaced_ddpm_matches_scheduler_loop(pipe, spacing):
    unet, _, dpm = pipe
    sched = diffusers.DDPMScheduler(timestep_spacing=spacing)
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    want = scheduler_loop(unet, sched, 12, x_T, torch.Generator().manual_seed(4))
    engine = dpm.sampler(steps=respacing("ddpm", 12, spacing), clip_x0=True)
    assert engine.schedule.timesteps.tolist() == sorted(sched.timesteps.tolist())
    got = engine.ddpm(x_T, generator=torch.Generator().manual_seed(4))
    assert max_diff(got, want) <= TOL


def test_trailing_scheduler_config_is_the_default_spacing(tmp_path):
    unet = make_unet()
    dpm = converted(tmp_path, unet, timestep_spacing="trailing", clip_sample=False)
    assert (dpm.defaults.spacing, dpm.defaults.clip_x0) == ("trailing", False)
    sched = diffusers.DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    want = scheduler_loop(unet, sched, 10, x_T, None, eta=0.0)
    from guidekit.sampling import sample

    got = sample(dpm, 2, steps=10, seed=6, sampler="ddim")  # x_T from seed 6, as above
    assert max_diff(got, want.clamp(-1, 1)) <= TOL


# --------------------------------------------------------------------------- guided


class TinyClassifier(torch.nn.Module):
    """Logits linear in x, scaled by t (so a wrong timestep shows): gradients of order 0.1,
    which move the samples visibly at scale 3."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.lin = torch.nn.Linear(256, 3)

    def forward(self, x, t):
        return self.lin(torch.tanh(x).flatten(1)) * (1 + t.float() / 1000)[:, None]


@pytest.fixture(scope="module")
def classifier():
    return TinyClassifier().eval().requires_grad_(False)


def grad_log_p(clf, x, t, y):
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        log_p = torch.log_softmax(clf(x, t.expand(len(x))), -1).gather(1, y[:, None]).sum()
        return torch.autograd.grad(log_p, x)[0]


@pytest.mark.parametrize("clip", [False, True])
def test_classifier_guided_ddim_matches_hand_loop(pipe, classifier, clip):
    """guidekit's ε-shift, ε − √(1−ᾱ_t)·s·∇log p, handed to diffusers' DDIM step; with
    clipping, the shift goes first (guide-then-clip), as diffusers' step then clips."""
    unet, src, dpm = pipe
    y, s = torch.tensor([0, 2]), 3.0
    sched = ddim_pipeline(unet, src, clip_sample=clip).scheduler
    abar = sched.alphas_cumprod

    def shift(x, t, eps):
        return eps - (1 - abar[t]).sqrt() * s * grad_log_p(classifier, x, t, y), 0

    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    want = scheduler_loop(unet, sched, 10, x_T, None, shift, eta=0.0,
                          use_clipped_model_output=True)
    engine = dpm.sampler(steps=respacing("ddim", 10), clip_x0=clip,
                         clip_order="guide-then-clip")
    got = engine.ddim(x_T, guidance=[GuidanceTerm(ClassifierGuidance(classifier, y), s)])
    assert max_diff(got, want) <= TOL
    unguided = engine.ddim(x_T)
    assert max_diff(got, unguided) > 1e-2  # the guidance moved the samples


def test_classifier_guided_ddpm_matches_hand_loop(pipe, classifier):
    """guidekit's mean shift Σ_t·s·∇log p added to diffusers' DDPM step output, Σ_t being
    diffusers' own β̃_t (0 at the last step, so the clean sample is not shifted)."""
    unet, _, dpm = pipe
    y, s = torch.tensor([1, 0]), 3.0
    sched = diffusers.DDPMScheduler()

    def shift(x, t, eps):
        var = sched._get_variance(t)
        return eps, var * s * grad_log_p(classifier, x, t, y)

    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    want = scheduler_loop(unet, sched, 25, x_T, torch.Generator().manual_seed(10), shift)
    engine = dpm.sampler(steps=respacing("ddpm", 25, "leading"), clip_x0=True)
    got = engine.ddpm(x_T, guidance=[GuidanceTerm(ClassifierGuidance(classifier, y), s)],
                      generator=torch.Generator().manual_seed(10))
    assert max_diff(got, want) <= TOL
    unguided = engine.ddpm(x_T, generator=torch.Generator().manual_seed(10))
    assert max_diff(got, unguided) > 1e-2  # the guidance moved the samples


# --------------------------------------------------------------------------- spacing


@pytest.mark.parametrize("T", [1000, 999, 250])
@pytest.mark.parametrize("k", [1, 7, 10, 30, 50, 61, 100, 249])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_spacings_are_diffusers_timesteps(T, k, spacing):
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    sched.set_timesteps(k)
    # diffusers' trailing grid can round up to K + 1 values ending in −1 (T = 1000, K = 61);
    # guidekit keeps its first K
    want = sorted(sched.timesteps.tolist()[:k])
    got = space_timesteps(T, spacing_spec(spacing, k))
    if spacing == "linspace" and k == 1:
        want = [T - 1]  # guidekit starts one step from noise at T − 1, diffusers at 0
    assert got == want and len(got) == k


# --------------------------------------------------------------------------- refusals


def cli(guidekit_cli, *args):
    """(exit status, the error line or the output)."""
    result = guidekit_cli(*args)
    if result.code == 2:
        return 2, result.err.strip().removeprefix("error: ")
    return result.code, result.out.strip()


def test_not_a_diffusers_folder(tmp_path, guidekit_cli):
    (tmp_path / "x").mkdir()
    code, out = cli(guidekit_cli, "convert", "diffusers", str(tmp_path / "x"), "--out",
                    str(tmp_path / "o"))
    assert code == 2 and "is not a diffusers model" in out and len(out.splitlines()) == 1


def test_missing_scheduler_config(tmp_path, guidekit_cli):
    src = save_pipeline(tmp_path / "pipe", make_unet())
    (src / "scheduler" / "scheduler_config.json").unlink()
    code, out = cli(guidekit_cli, "convert", "diffusers", str(src), "--out",
                    str(tmp_path / "o"))
    assert code == 2 and "no scheduler config" in out and "--scheduler" in out
    # a bare unet/ folder with its scheduler given works
    save_pipeline(tmp_path / "other", make_unet())
    code, out = cli(guidekit_cli, "convert", "diffusers", str(src / "unet"), "--scheduler",
                    str(tmp_path / "other" / "scheduler"), "--out", str(tmp_path / "o"))
    assert code == 0, out


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_unsupported_prediction_type(tmp_path, guidekit_cli, kind):
    src = save_pipeline(tmp_path / "pipe", make_unet(), prediction_type=kind)
    code, out = cli(guidekit_cli, "convert", "diffusers", str(src), "--out",
                    str(tmp_path / "o"))
    assert code == 2 and f"prediction_type='{kind}'" in out and "epsilon" in out
    assert not (tmp_path / "o").exists()


def test_image_size_the_unet_cannot_take(tmp_path, guidekit_cli):
    src = save_pipeline(tmp_path / "pipe", make_unet())
    code, out = cli(guidekit_cli, "convert", "diffusers", str(src), "--image-size", "15",
                    "--out", str(tmp_path / "o"))
    assert code == 2 and "image size 15" in out and "multiple of 2" in out
    code, out = cli(guidekit_cli, "convert", "diffusers", str(src), "--image-size", "24",
                    "--out", str(tmp_path / "o"), "--json")
    assert code == 0 and json.loads(out)["image_size"] == 24


def test_extra_not_installed(tmp_path, guidekit_cli, monkeypatch):
    src = save_pipeline(tmp_path / "pipe", make_unet())
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    code, out = cli(guidekit_cli, "convert", "diffusers", str(src), "--out",
                    str(tmp_path / "o"))
    assert code == 2 and out.endswith("pip install 'guidekit[diffusers]'")


def test_sample_spacing_option(pipe, tmp_path, guidekit_cli):
    _, _, dpm = pipe
    gk = str(dpm.checkpoint.path)
    code, out = cli(guidekit_cli, "sample", "--checkpoint", gk, "--steps", "4", "--spacing",
                    "trailing", "--n", "2", "--out", str(tmp_path / "s.png"), "--json")
    from guidekit.sampling import sample

    trailing = sample(dpm, 2, steps=4, spacing="trailing")
    leading = sample(dpm, 2, steps=4)
    assert max_diff(trailing, leading) > 1e-3  # the option changes the steps
    assert json.loads(out)["mean"] == pytest.approx(float(trailing.mean()), abs=1e-6)
    code, out = cli(guidekit_cli, "sample", "--checkpoint", gk, "--spacing", "middle",
                    "--out", str(tmp_path / "s.png"))
    assert code == 2 and "unknown spacing 'middle'" in out
    code, out = cli(guidekit_cli, "sample", "--checkpoint", gk, "--spacing", "leading",
                    "--respacing", "ddim4", "--out", str(tmp_path / "s.png"))
    assert code == 2 and "not both" in out


def test_folder_given_as_a_checkpoint_says_convert(pipe, tmp_path, guidekit_cli):
    _, src, _ = pipe
    for path in (src, src / "unet"):
        code, out = cli(guidekit_cli, "sample", "--checkpoint", str(path), "--out",
                        str(tmp_path / "s.png"))
        assert code == 2 and f"guidekit convert diffusers {path}" in out


def test_foreign_unet_and_hostile_configs(tmp_path, guidekit_cli):
    src = save_pipeline(tmp_path / "pipe", make_unet())
    cfg_path = src / "unet" / "config.json"
    good = json.loads(cfg_path.read_text())
    for bad, text in [({"center_input_sample": True}, "center_input_sample"),
                      ({"block_out_channels": "12"}, "block_out_channels"),
                      ({"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]},
                       "CrossAttnDownBlock2D"),
                      ({"_class_name": "UNet2DConditionModel"}, "UNet2DConditionModel")]:
        cfg_path.write_text(json.dumps({**good, **bad}))
        with pytest.raises(GuidekitError, match=text):
            convert_diffusers(src, tmp_path / "o")
    cfg_path.write_text("[1, 2]")
    code, out = cli(guidekit_cli, "convert", "diffusers", str(src), "--out",
                    str(tmp_path / "o"))
    assert code == 2 and "JSON object" in out


# --------------------------------------------------------------------------- PDAE


def test_pdae_trains_and_reconstructs_on_a_diffusers_unet(pipe, tmp_path, guidekit_cli):
    """G_ψ mirrors diffusers' up path block for block (its ResnetBlock2D / Attention /
    Upsample2D shapes, with z's projection added), and the PDAE commands run on it."""
    from guidekit_pdae.networks import EstimatorConfig, GradientEstimator

    unet, _, dpm = pipe
    est = GradientEstimator(EstimatorConfig(dpm.model.config, latent_dim=8))
    theirs = [(name, p.shape) for name, p in dpm.model.output_blocks.named_parameters()]
    ours = [(name, p.shape) for name, p in est.up.named_parameters()
            if "cond_layers" not in name]
    assert ours == theirs
    diffusers_up = sum(p.numel() for p in unet.up_blocks.parameters())
    assert sum(p.numel() for _, p in dpm.model.output_blocks.named_parameters()) == (
        diffusers_up)
    gk = str(dpm.checkpoint.path)
    code, out = cli(guidekit_cli, "train", "pdae", "--pretrained", gk, "--out",
                    str(tmp_path / "pdae"), "--steps", "3", "--batch-size", "4", "--json")
    assert code == 0, out
    code, out = cli(guidekit_cli, "pdae", "reconstruct", "--pdae", str(tmp_path / "pdae"),
                    "--n", "2", "--steps", "5", "--xT", "inferred", "--out-dir",
                    str(tmp_path / "rec"), "--json")
    assert code == 0, out
    assert (tmp_path / "rec" / "grid.png").is_file()


@pytest.mark.parametrize("bad,text", [
    ({"clip_sample_range": None}, "clip_sample_range"),
    ({"variance_type": ["fixed_small"]}, "variance_type"),
    ({"variance_type": "learned"}, "variance_type"),
    ({"timestep_spacing": 3}, "timestep_spacing"),
    ({"num_train_timesteps": 10**400}, "num_train_timesteps"),
    ({"num_train_timesteps": "1000"}, "num_train_timesteps"),
    ({"beta_schedule": "exotic"}, "cannot build its schedule"),
    ({"thresholding": True}, "thresholding"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
])
def test_hostile_scheduler_configs_get_one_line(tmp_path, guidekit_cli, bad, text):
    src, code, out = convert_edited(tmp_path, guidekit_cli, "scheduler/scheduler_config.json",
                                    bad)
    assert code == 2 and text in out and len(out.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def convert_edited(tmp_path, guidekit_cli, name, changes):
    """Save a pipeline, update one of its JSON files with ``changes``, convert it by the CLI:
    (the pipeline folder, exit status, output)."""
    src = save_pipeline(tmp_path / "pipe", make_unet())
    path = src / name
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return src, *cli(guidekit_cli, "convert", "diffusers", str(src), "--out",
                     str(tmp_path / "o"))


@pytest.mark.parametrize("bad,text", [
    ({"down_block_types": [["DownBlock2D"], "AttnDownBlock2D"]}, "is not one guidekit"),
    ({"dropout": 10**400}, "dropout"),
    ({"norm_eps": "1e-5"}, "norm_eps"),
    ({"attention_head_dim": -1}, "attention_head_dim"),
    ({"sample_size": 2**24}, "4096"),
    ({"layers_per_block": 10**6}, "layers_per_block"),
    ({"downsample_type": "resnet"}, "downsample_type"),
    ({"sample_size": [16, 32]}, "not square"),
])
def test_hostile_unet_configs_get_one_line(tmp_path, guidekit_cli, bad, text):
    src, code, out = convert_edited(tmp_path, guidekit_cli, "unet/config.json", bad)
    assert code == 2 and text in out and len(out.splitlines()) == 1
    path = src / "unet" / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)  # nested past the parser's recursion
    code, out = cli(guidekit_cli, "convert", "diffusers", str(src), "--out",
                    str(tmp_path / "o"))
    assert code == 2 and "not a readable JSON" in out


def test_non_square_sample_size_takes_image_size(tmp_path):
    unet = make_unet()
    src = save_pipeline(tmp_path / "pipe", unet)
    path = src / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sample_size": [16, 32]}))
    dpm = load_dpm(convert_diffusers(src, tmp_path / "o", image_size=32))
    assert dpm.image_shape == (1, 32, 32)


def test_latent_diffusion_pipelines_are_refused(tmp_path, guidekit_cli):
    src = save_pipeline(tmp_path / "pipe", make_unet())
    index = json.loads((src / "model_index.json").read_text())
    index.update(_class_name="LDMPipeline", vqvae=["diffusers", "VQModel"])
    (src / "model_index.json").write_text(json.dumps(index))
    code, out = cli(guidekit_cli, "convert", "diffusers", str(src), "--out",
                    str(tmp_path / "o"))
    assert code == 2 and "vqvae" in out and "latent-diffusion" in out


def test_a_conversion_that_disagrees_with_diffusers_is_not_written(tmp_path, monkeypatch):
    """The probe guard: swap q and v in every attention layer (q and k would hardly show:
    these random weights make the attention near uniform) and nothing is written."""
    import guidekit.convert_diffusers as conv

    real = conv.map_state_dict

    def swapped(sd, cfg):
        sd = dict(sd)
        for key in [k for k in sd if ".to_q." in k]:
            other = key.replace(".to_q.", ".to_v.")
            sd[key], sd[other] = sd[other], sd[key]
        return real(sd, cfg)

    monkeypatch.setattr(conv, "map_state_dict", swapped)
    src = save_pipeline(tmp_path / "pipe", make_unet())
    with pytest.raises(GuidekitError, match="disagrees with diffusers' own"):
        convert_diffusers(src, tmp_path / "o")
    assert not (tmp_path / "o").exists()
