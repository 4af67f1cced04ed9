"""``guidekit convert adm|pdae|diffusers``: released checkpoints into guidekit checkpoint
folders (the work is :mod:`guidekit.convert`'s and :mod:`guidekit.convert_diffusers`'s; this
module only reads the command line and prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from guidekit.cli.params import EXTRA_ARGS, JSONOut, echo_json
from guidekit.errors import GuidekitError

__all__ = ["app", "register"]

app = typer.Typer(help="Convert released checkpoints (openai ADM / improved-diffusion, PDAE, "
                  "diffusers UNet2DModel pipelines) into guidekit checkpoint folders.",
                  no_args_is_help=True)

Out = typer.Option(..., "--out", help="The guidekit checkpoint folder to write.")
Force = typer.Option(False, "--force", help="Replace a checkpoint already at --out.")


def _summary(path: Path, json_out: bool) -> None:
    from guidekit.checkpoint import read_checkpoint

    cfg = read_checkpoint(path).config
    model, sched, source = cfg["model"]["config"], cfg["schedule"], cfg["converted_from"]
    info: dict[str, Any] = {
        "out": str(path), "kind": cfg["kind"], "format": cfg["converted_from"]["format"],
        "parameters": cfg["converted_from"]["parameters"], "image_size": model["image_size"],
        "num_classes": model.get("num_classes"), "learn_sigma": model.get("learn_sigma", False),
        "schedule": f"{source.get('scheduler', {}).get('beta_schedule', sched['kind'])} "
                    f"T={sched['num_timesteps']}",
        "timestep_scale": model.get("timestep_scale", 1.0),
    }
    if "note" in cfg["converted_from"]:
        info["note"] = cfg["converted_from"]["note"]
    if "sampling" in cfg:
        info["sampling"] = cfg["sampling"]
    if json_out:
        echo_json(info)
        return
    classes = info["num_classes"] or "unconditional"
    sigma = ", learned Σ" if info["learn_sigma"] else ""
    typer.echo(f"wrote {info['kind']} checkpoint {path}: {info['parameters']:,} parameters, "
               f"{info['image_size']}px, classes: {classes}{sigma}, schedule "
               f"{info['schedule']}" + (f" (t·{info['timestep_scale']:g})"
                                        if info["timestep_scale"] != 1 else ""))
    if "sampling" in info:
        d = info["sampling"]
        typer.echo(f"sampling defaults: clip x̂_0 {'on' if d['clip_x0'] else 'off'}, "
                   f"variance {d['variance']}, {d['spacing']} spacing")
    if "note" in info:
        typer.echo(f"note: {info['note']}")


def _split_weights(args: list[str]) -> tuple[Path, list[str]]:
    """WEIGHTS and openai's flags, in any order: every openai flag takes a value (or is
    --name=value), so a bare word that is no flag's value is the file. WEIGHTS is not a typer
    argument because click would take the first bare word, often a flag's value, for it."""
    found, flags, i = [], [], 0
    while i < len(args):
        token = args[i]
        if token.startswith("--") and len(token) > 2:
            take = 1 if "=" in token else 2
            flags += args[i:i + take]
            i += take
        else:
            found.append(token)
            i += 1
    if len(found) != 1:
        raise GuidekitError("give one WEIGHTS file (.pt, .pth or .safetensors)" if not found
                            else f"give one WEIGHTS file, got {', '.join(found)}")
    return Path(found[0]), flags


@app.command("adm", context_settings=EXTRA_ARGS,
             options_metavar="WEIGHTS [OPENAI FLAGS] [OPTIONS]")
def adm_command(
    ctx: typer.Context,
    out: Path = Out,
    defaults: str = typer.Option(
        "guided-diffusion", help="Whose script defaults fill the flags left out: "
        "guided-diffusion or improved-diffusion."),
    force: bool = Force,
    json_out: JSONOut = False,
) -> None:
    """Convert an openai guided-diffusion / improved-diffusion model or noisy classifier.

    WEIGHTS is the .pt / .pth / .safetensors state dict. Give openai's flags as its
    README writes them (--image_size 256 --learn_sigma True ..., or --name=value); guidekit
    adds --channel_mult, --num_classes and --classifier_num_head_channels for sizes openai
    never released. A file without output_blocks is a classifier (--classifier_* flags).

    --use_fp16, --use_checkpoint, --use_kl, --rescale_learned_sigmas and
    --timestep_respacing are recorded, not applied: the weights are stored in float32 and
    guidekit computes in float32 (or bf16 autocast where a command offers it); respacing is
    `guidekit sample --steps / --respacing`.

    Head counts (--num_head_channels, --num_heads) and --use_new_attention_order change no
    tensor shape, so the weights cannot check them: give them as the README does."""
    from guidekit.convert import convert_adm

    weights, flags = _split_weights(list(ctx.args))
    _summary(convert_adm(weights, out, flags, defaults=defaults, force=force), json_out)


@app.command("pdae")
def pdae_command(
    checkpoint: Path = typer.Argument(..., help="PDAE's checkpoint.pt (EMA weights under "
                                      "ema_denoise_fn)."),
    config: Path = typer.Option(None, "--config", help="Its config.yml (default: the one "
                                "beside CHECKPOINT)."),
    image_size: int = typer.Option(..., "--image-size", help="The model's image size (not in "
                                   "config.yml)."),
    out: Path = Out,
    force: bool = Force,
    json_out: JSONOut = False,
) -> None:
    """Convert a PDAE repository pre-trained DPM (checkpoint.pt + config.yml)."""
    from guidekit.convert import convert_pdae

    _summary(convert_pdae(checkpoint, config, out, image_size, force=force), json_out)


@app.command("diffusers")
def diffusers_command(
    folder: Path = typer.Argument(..., help="A diffusers pipeline folder (model_index.json, "
                                  "unet/, scheduler/) or its unet/ folder."),
    scheduler: Path = typer.Option(None, "--scheduler", help="scheduler_config.json or its "
                                   "folder (default: the pipeline's scheduler/)."),
    image_size: int = typer.Option(None, "--image-size", help="Image size to run at "
                                   "(default: the UNet's sample_size)."),
    out: Path = Out,
    force: bool = Force,
    json_out: JSONOut = False,
) -> None:
    """Convert a diffusers UNet2DModel pipeline (DDPMPipeline, DDIMPipeline, or one saved
    by diffusers' training example), needing the diffusers extra.

    The schedule is the β list the scheduler config gives; its clip_sample, variance_type
    and timestep_spacing become the checkpoint's sampling defaults. The converted UNet is
    run beside diffusers' own on a probe batch, and nothing is written unless they agree.
    Only prediction_type epsilon is taken."""
    from guidekit.convert_diffusers import convert_diffusers

    _summary(convert_diffusers(folder, out, scheduler=scheduler, image_size=image_size,
                               force=force), json_out)


def register(cli: typer.Typer) -> None:
    """Add the ``convert`` group to ``cli``."""
    cli.add_typer(app, name="convert")
