"""Sampling converted openai models against openai's own trajectories (tests/data/
guided-diffusion/sampling.*): DDIM-10 unguided and classifier-guided with clip_denoised,
one learned-range DDPM step and its classifier-shifted mean, and every command on the
converted fixtures.

Tolerances (max abs difference over max |reference|): 1e-5 for single steps (x̂_0 of a
step: 1e-5 · √(1/ᾱ_t − 1)), 1e-4 for the 10-step trajectories. What limits them is float32
rounding: the reference repeats its own forward passes to about 1e-6, and DDIM amplifies
x̂_0 errors by √(1/ᾱ_t − 1) (≈ 6 at t = 900) in each step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from guidekit_classifier.guidance import ClassifierGuidance
from guidekit_classifier.training import load_classifier
from safetensors.torch import load_file

from guidekit import ops
from guidekit.convert import convert_adm
from guidekit.ddpm import load_dpm
from guidekit.guidance import GuidanceTerm, StepInput
from guidekit.testing import assert_one_line_error, run_cli

DATA = Path(__file__).parent / "data" / "guided-diffusion"


def flags(text: str) -> list[str]:
    return text.split()


UNCOND = flags("--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
          "--learn_sigma True --class_cond False --attention_resolutions 16,8 "
          "--num_head_channels 16 --use_scale_shift_norm True --resblock_updown True "
          "--use_new_attention_order False")
COND = list(UNCOND)
COND[COND.index("--class_cond") + 1] = "True"
COND[COND.index("--use_new_attention_order") + 1] = "True"
CLASSIFIER = flags("--image_size 32 --classifier_width 32 --classifier_depth 1 "
                   "--channel_mult 1,2,2 --classifier_attention_resolutions 16,8 "
                   "--classifier_num_head_channels 16 "
                   "--classifier_use_scale_shift_norm True --classifier_resblock_updown True "
                   "--classifier_pool attention --num_classes 10")
SCALE = json.loads((DATA / "sampling.json").read_text())["classifier_scale"]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("adm")
    convert_adm(DATA / "adm_uncond.pt", root / "uncond", UNCOND)
    convert_adm(DATA / "adm_cond.safetensors", root / "cond", COND)
    convert_adm(DATA / "adm_classifier.safetensors", root / "clf", CLASSIFIER)
    return root


@pytest.fixture(scope="module")
def io():
    return load_file(DATA / "sampling.io.safetensors")


def _guidance(converted, y):
    clf = load_classifier(converted / "clf")
    return [GuidanceTerm(ClassifierGuidance(clf.model, y), scale=SCALE, name="classifier")]


def test_ddim10_trajectories_match_guided_diffusion(converted, io):
    dpm = load_dpm(converted / "uncond")
    sampler = dpm.sampler(steps="ddim10", clip_x0=True)
    assert sampler.schedule.timesteps.tolist() == io["timestep_map"].tolist()
    assert rel(sampler.ddim(io["x_T"]), io["ddim10_unguided"]) <= 1e-4
    guided = sampler.ddim(io["x_T"], guidance=_guidance(converted, io["y"]))
    assert rel(guided, io["ddim10_guided"]) <= 1e-4
    # The other clipping order stays reachable, and is a different sampler.
    other = dpm.sampler(steps="ddim10", clip_x0=True, clip_order="guide-then-clip")
    assert rel(other.ddim(io["x_T"], guidance=_guidance(converted, io["y"])),
               io["ddim10_guided"]) > 1e-2


def test_learned_range_ddpm_step_and_shifted_mean_match(converted, io):
    dpm = load_dpm(converted / "uncond")
    sampler = dpm.sampler(steps="ddim10", clip_x0=True)
    tab, k, x = sampler.schedule.tables, io["k"], io["x_t"]
    eps, v, _ = sampler.predict(x, k)
    var, log_var = ops.variance(tab, k, x, "learned", v)
    assert rel(var, io["p_variance"]) <= 1e-5
    assert rel(log_var, io["p_log_variance"]) <= 1e-5
    zero = torch.zeros_like(x)  # no noise: the step returns its mean
    mean, x0 = ops.ddpm_step(tab, x, k, eps, var, log_var, None, zero, True)
    assert rel(mean, io["p_mean"]) <= 1e-5
    # x̂_0 = (x_t − √(1−ᾱ) ε)/√ᾱ carries ε's float32 rounding times √(1/ᾱ_t − 1) (≈ 3.4 at
    # t = 500): the single-step bound scaled by it
    ab = sampler.schedule.float64["alphas_cumprod"][k]
    assert rel(x0, io["pred_xstart"]) <= 1e-5 * float((1 / ab - 1).sqrt().max())
    (term,) = _guidance(converted, io["y"])
    inp = StepInput(x_t=x, t=sampler.schedule.timesteps[k], k=k, eps=eps, x0=x0,
                    schedule=sampler.schedule, model=dpm.model)
    shifted, _ = ops.ddpm_step(tab, x, k, eps, var, log_var, SCALE * term.guidance(inp), zero,
                               True)
    assert rel(shifted, io["guided_mean"]) <= 1e-5


# --------------------------------------------------------------------------- commands


def test_every_command_runs_on_converted_models(converted, tmp_path, capsys):
    clf = str(converted / "clf")
    for args in (
        ["--checkpoint", str(converted / "uncond"), "--sampler", "ddpm", "--steps", "3"],
        ["--checkpoint", str(converted / "uncond"), "--steps", "3", "--guidance",
         "classifier", "--classifier", clf, "--class", "3", "--scale", "2"],
        ["--checkpoint", str(converted / "cond"), "--steps", "3", "--class", "3"],
        ["--checkpoint", str(converted / "cond"), "--sampler", "ddpm", "--steps", "3",
         "--class", "1", "--class", "7", "--guidance", "classifier", "--classifier", clf],
    ):
        code, out, err = run_cli(capsys, "sample", *args, "--n", "2", "--json",
                                 "--out", str(tmp_path / "s.png"))
        assert code == 0, err
        assert json.loads(out)["n"] == 2
    for dpm, extra in (("uncond", []), ("cond", [])):
        pdae = tmp_path / f"pdae-{dpm}"
        code, out, err = run_cli(
            capsys, "train", "pdae", "--pretrained", str(converted / dpm), "--data", "shapes",
            "--out", str(pdae), "--steps", "2", "--batch-size", "4", "--latent-dim", "8",
            "--json", *extra)
        assert code == 0, err
        code, out, err = run_cli(capsys, "pdae", "gap", "--pdae", str(pdae), "--data",
                                 "shapes", "--n", "4", "--timesteps", "10,500", "--json",
                                 "--out-dir", str(tmp_path / f"gap-{dpm}"))
        assert code == 0, err
        rows = json.loads(out)["timesteps"]
        assert [r["t"] for r in rows] == [10, 500]


@pytest.mark.parametrize("args, needles", [
    (["--checkpoint", "{cond}", "--steps", "2"], ["class-conditional", "--class N"]),
    (["--checkpoint", "{cond}", "--steps", "2", "--class", "1000"],
     ["class 1000 is out of range", "0..999"]),
    (["--checkpoint", "{uncond}", "--steps", "2", "--class", "3"],
     ["unconditional", "--class"]),
])
def test_class_mistakes_are_one_line(converted, tmp_path, capsys, args, needles):
    args = [a.format(cond=converted / "cond", uncond=converted / "uncond") for a in args]
    code, _, err = run_cli(capsys, "sample", *args, "--n", "2", "--out", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, *needles)


def test_a_classifier_for_another_image_size_is_one_line(converted, guidekit_dpm, tmp_path,
                                                         capsys):
    """The converted 32×32 RGB classifier guiding guidekit's 16×16 digits DPM."""
    code, _, err = run_cli(capsys, "sample", "--checkpoint", str(guidekit_dpm), "--steps", "2",
                           "--guidance", "classifier", "--classifier", str(converted / "clf"),
                           "--class", "1", "--n", "2", "--out", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "classifier")
