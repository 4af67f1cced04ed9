"""`guidekit convert`: openai ADM / improved-diffusion / PDAE checkpoints into guidekit folders,
checked against outputs of the reference code (tests/data/*/README.md) through the written
checkpoint, and every bad input as one line."""

from __future__ import annotations

import json
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from guidekit.convert import convert_adm, convert_pdae, parse_openai_flags
from guidekit.ddpm import load_dpm
from guidekit.errors import GuidekitError
from guidekit.unet import set_attention

DATA = Path(__file__).parent / "data"
GD, PDAE = DATA / "guided-diffusion", DATA / "pdae-dpm"
UNCOND = ("--image_size 32 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
          "--learn_sigma True --class_cond False --attention_resolutions 16,8 "
          "--num_head_channels 16 --use_scale_shift_norm True --resblock_updown True "
          "--use_new_attention_order False")
COND = UNCOND.replace("--class_cond False", "--class_cond True").replace(
    "--use_new_attention_order False", "--use_new_attention_order True")
CLASSIFIER = ("--image_size 32 --classifier_width 32 --classifier_depth 1 --channel_mult 1,2,2 "
              "--classifier_attention_resolutions 16,8 --classifier_num_head_channels 16 "
              "--classifier_use_scale_shift_norm True --classifier_resblock_updown True "
              "--classifier_pool attention --num_classes 10")
TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("convert")


def check_sdpa(model: torch.nn.Module, *args: torch.Tensor) -> None:
    with torch.no_grad():
        fused = model(*args)
        plain = set_attention(model, False)(*args)
    set_attention(model, True)
    assert rel(plain, fused) < 1e-5


@pytest.mark.parametrize("name", ["adm_uncond.pt", "adm_uncond.safetensors"])
def test_uncond_matches_guided_diffusion(name, out):
    path = convert_adm(GD / name, out / name, shlex.split(UNCOND))
    dpm = load_dpm(path)
    io = load_file(GD / "adm_uncond.io.safetensors")
    with torch.no_grad():
        got = dpm.model(io["x"], io["t"])
    assert got.shape[1] == 6
    assert rel(got[:, :3], io["out"][:, :3]) < TOL  # ε
    assert rel(got[:, 3:], io["out"][:, 3:]) < TOL  # the variance interpolation v
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["kind"] == "ddpm" and list(cfg["files"]) == ["ema"]
    assert cfg["converted_from"]["file"] == name and "8" in cfg["converted_from"]["note"]
    assert cfg["schedule"]["kind"] == "linear" and cfg["schedule"]["num_timesteps"] == 1000
    check_sdpa(dpm.model, io["x"], io["t"])


def test_cond_matches_guided_diffusion(out):
    dpm = load_dpm(convert_adm(GD / "adm_cond.safetensors", out / "cond", shlex.split(COND)))
    io = load_file(GD / "adm_cond.io.safetensors")
    with torch.no_grad():
        assert rel(dpm.model(io["x"], io["t"], io["y"]), io["out"]) < TOL
    assert dpm.model.config.num_classes == 1000
    check_sdpa(dpm.model, io["x"], io["t"], io["y"])


def test_classifier_matches_guided_diffusion(out):
    from guidekit_classifier.training import check_compatible, load_classifier

    path = convert_adm(GD / "adm_classifier.safetensors", out / "clf", shlex.split(CLASSIFIER))
    clf = load_classifier(path)
    io = load_file(GD / "adm_classifier.io.safetensors")
    x = io["x"].clone().requires_grad_(True)
    logits = clf.model(x, io["t"])
    assert rel(logits.detach(), io["logits"]) < TOL
    (grad,) = torch.autograd.grad(
        torch.log_softmax(logits, -1).gather(1, io["y"][:, None]).sum(), x)
    assert rel(grad, io["grad_log_p_y"]) < TOL
    check_sdpa(clf.model, io["x"], io["t"])
    dpm = json.loads((out / "adm_uncond.pt" / "config.json").read_text()) if (
        out / "adm_uncond.pt").exists() else None
    if dpm:  # converted for the same schedule and images: guidance may pair them
        check_compatible(clf, dpm)


def test_pdae_matches_its_repository(out):
    dpm = load_dpm(convert_pdae(PDAE / "checkpoint.pt", None, out / "pdae", 32))
    io = load_file(PDAE / "io.safetensors")
    with torch.no_grad():
        assert rel(dpm.model(io["x"], io["t"]), io["out"]) < TOL
    check_sdpa(dpm.model, io["x"], io["t"])
    assert dpm.model.config.attention_resolutions == (16, 8)  # factors 2, 4 of 32px


def test_pdae_linear_betas_do_not_scale_with_t(tmp_path):
    from guidekit.schedule import make_betas

    yml = (PDAE / "config.yml").read_text().replace("timesteps: 1000", "timesteps: 500")
    (tmp_path / "config.yml").write_text(yml)
    path = convert_pdae(PDAE / "checkpoint.pt", tmp_path / "config.yml", tmp_path / "o", 32)
    betas = make_betas(load_dpm(path).schedule.config)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


def test_flags_parse_as_openais_scripts():
    flags, given = parse_openai_flags(["--use_fp16=yes", "--dropout", "0.1", "--num_heads",
                                       "-1"])
    assert flags["use_fp16"] is True and flags["dropout"] == 0.1 and flags["num_heads"] == -1
    assert given == {"use_fp16", "dropout", "num_heads"} and flags["image_size"] == 64
    flags, _ = parse_openai_flags([], "improved-diffusion")
    assert flags["rescale_timesteps"] is True


def test_improved_diffusion_rescales_timesteps(tmp_path):
    """improved-diffusion's defaults: t·1000/T, conv resampling; the fixture's ResBlock
    resampling is then the one-line mismatch naming the flag."""
    flags = shlex.split(UNCOND.replace(" --num_head_channels 16", "").replace(
        " --resblock_updown True", "").replace(" --use_new_attention_order False", ""))
    with pytest.raises(GuidekitError, match="resblock_updown"):
        convert_adm(GD / "adm_uncond.pt", tmp_path / "o", [*flags, "--diffusion_steps", "4000"],
                    defaults="improved-diffusion")


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


@pytest.mark.parametrize("change, needle", [
    (("--class_cond False", "--class_cond True"), "--class_cond False"),
    (("--learn_sigma True", "--learn_sigma False"), "--learn_sigma True"),
    (("--use_scale_shift_norm True", "--use_scale_shift_norm False"),
     "--use_scale_shift_norm True"),
    (("--resblock_updown True", "--resblock_updown False"), "--resblock_updown True"),
    (("--num_channels 32", "--num_channels 64"), "--num_channels 32"),
    (("--num_res_blocks 1", "--num_res_blocks 2"), "--num_res_blocks"),
    (("--attention_resolutions 16,8", "--attention_resolutions 32"), "--attention_resolutions"),
    (("--learn_sigma True", "--learn_sigma maybe"), "boolean"),
    (("--attention_resolutions", "--atention_resolutions"), "did you mean --attention_resol"),
    (("--class_cond False", "--predict_xstart True"), "ε-predicting"),
    (("--channel_mult 1,2", ""), "give --channel_mult"),
])
def test_bad_flags_are_one_line(tmp_path, change, needle):
    with pytest.raises(GuidekitError) as exc:
        convert_adm(GD / "adm_uncond.pt", tmp_path / "o", shlex.split(UNCOND.replace(*change)))
    assert needle in one_line(exc)
    assert not (tmp_path / "o").exists()  # nothing written before the weights fit


def test_classifier_flags_on_a_diffusion_model(tmp_path):
    with pytest.raises(GuidekitError, match="not a classifier"):
        convert_adm(GD / "adm_uncond.pt", tmp_path / "o", ["--classifier_depth", "1"])


def test_existing_checkpoint_needs_force(out):
    with pytest.raises(GuidekitError, match="--force"):
        convert_adm(GD / "adm_cond.safetensors", out / "cond", shlex.split(COND))
    convert_adm(GD / "adm_cond.safetensors", out / "cond", shlex.split(COND), force=True)


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what unpickling would run: create the marker file
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_code_carrying_pickle_is_refused_unrun(tmp_path, how):
    marker, bad = tmp_path / "ran", tmp_path / "evil.pt"
    obj = {"input_blocks.0.0.weight": Payload(marker)}
    if how == "pickle":
        bad.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, bad)
    with pytest.raises(GuidekitError) as exc:
        convert_adm(bad, tmp_path / "o", shlex.split(UNCOND))
    assert "refused" in one_line(exc) and "nothing in it was executed" in str(exc.value)
    assert not marker.exists()


def test_bad_weight_files(tmp_path):
    save_file({"w": torch.zeros(3, dtype=torch.int8)}, tmp_path / "int.safetensors")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    for name, needle in [("int.safetensors", "int8"), ("list.pt", "state dict"),
                         ("junk.safetensors", "cannot read"), ("none.pt", "no file")]:
        with pytest.raises(GuidekitError) as exc:
            convert_adm(tmp_path / name, tmp_path / "o", shlex.split(UNCOND))
        assert needle in one_line(exc)


def test_fp16_weights_are_cast(tmp_path):
    sd = {k: v.half() for k, v in load_file(GD / "adm_uncond.safetensors").items()}
    save_file(sd, tmp_path / "half.safetensors")
    dpm = load_dpm(convert_adm(tmp_path / "half.safetensors", tmp_path / "o",
                               shlex.split(UNCOND) + ["--use_fp16", "True"]))
    assert all(p.dtype == torch.float32 for p in dpm.model.parameters())
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["converted_from"]["not_applied"] == ["use_fp16"]


GOOD = (PDAE / "config.yml").read_text()


@pytest.mark.parametrize("text, needle", [
    ("- 1\n- 2\n", "must be a mapping"),
    ("{{{", "not valid YAML"),
    ("diffusion_config: {}\ndenoise_fn_config: 3\n", "'denoise_fn_config' must be dict"),
    (GOOD.replace("base_channel: 32", "base_channel: [32]"), "'base_channel' must be int"),
    (GOOD.replace("timesteps: 1000", "timesteps: '1000'"), "'timesteps' must be int"),
    (GOOD.replace("betas_type: linear", "betas_type: quadratic"), "linear or cosine"),
    (GOOD.replace("use_new_attention_order: false", "use_new_attention_order: 1"),
     "must be bool"),
    (GOOD.replace("base_channel: 32", "base_channel: 64"), "do not fit config.yml"),
    ("!!python/object/apply:os.system ['touch x']\n", "not valid YAML"),
])
def test_hostile_pdae_config_is_one_line(tmp_path, text, needle):
    (tmp_path / "config.yml").write_text(text)
    with pytest.raises(GuidekitError) as exc:
        convert_pdae(PDAE / "checkpoint.pt", tmp_path / "config.yml", tmp_path / "o", 32)
    assert needle in one_line(exc)


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from guidekit.cli.convert import app

    runner = CliRunner()
    # openai's flags may come before WEIGHTS, as in a pasted README line
    done = runner.invoke(app, ["adm", *shlex.split(UNCOND), str(GD / "adm_uncond.pt"),
                               "--out", str(tmp_path / "a"), "--json"])
    assert done.exit_code == 0, done.output
    info = json.loads(done.output)
    assert info["kind"] == "ddpm" and info["learn_sigma"] and info["parameters"] > 0
    done = runner.invoke(app, ["pdae", str(PDAE / "checkpoint.pt"), "--image-size", "32",
                               "--out", str(tmp_path / "p")])
    assert done.exit_code == 0 and "wrote ddpm checkpoint" in done.output
    done = runner.invoke(app, ["adm", str(GD / "adm_uncond.pt"), "--out", str(tmp_path / "a")])
    assert isinstance(done.exception, GuidekitError) and "--force" in str(done.exception)
