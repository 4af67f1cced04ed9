"""PDAE (Zhang et al., 2022): a pre-trained DPM turned into an autoencoder.

An encoder E_φ maps x_0 to z, and a gradient estimator G_ψ(x_t, z, t) learns the mean shift
that fills the frozen DPM's posterior mean gap. Registers the ``pdae`` weighting, the ``pdae``
trainer (and ``pdae-latent``, a DPM over z), the ``pdae`` guidance, the ``guidekit pdae``
commands, and quickstart steps.

Every command has a Python function in ``__all__``::

    from guidekit_pdae import load_pdae, reconstruct, train_pdae

    train_pdae(data, "runs/pdae", pretrained="runs/ddpm")     # guidekit train pdae
    pdae = load_pdae("runs/pdae")
    result = reconstruct(pdae, test.images[:64], steps=100)   # guidekit pdae reconstruct

``encode_images`` (pdae encode), ``interpolate``, ``edit_held_out`` (manipulate),
``posterior_mean_gap`` (gap), ``one_step_x0`` (onestep), ``linear_probe`` (probe),
``train_pdae_latent`` and ``sample_pdae`` (pdae sample) do the rest; :class:`PDAEGuidance`
is the ``pdae`` guidance for a ``guidekit.GuidanceTerm``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import torch
import typer

from guidekit import trainer_options as opt
from guidekit.data import load_dataset
from guidekit.hookspecs import hookimpl
from guidekit.schedule import NoiseSchedule
from guidekit.specs import GuidanceSpec, ModelSpec, QuickstartStep, TrainerSpec, WeightingSpec

from .guidance import (
    PDAEGuidance,
    build_pdae_guidance,
    guidance_options,
    load_latents,
    save_latents,
)
from .latent import KIND as LATENT_KIND
from .latent import (
    LoadedLatentDPM,
    latent_model_spec,
    load_latent_dpm,
    sample_pdae,
    train_latent_command,
    train_pdae_latent,
)
from .training import KIND, LoadedPDAE, load_pdae, train_pdae

__version__ = "0.1.0"

__all__ = [
    "Direction",
    "LoadedLatentDPM",
    "LoadedPDAE",
    "PDAEGuidance",
    "edit_held_out",
    "encode_images",
    "fit_direction",
    "interpolate",
    "interpolation_grid",
    "linear_probe",
    "load_latent_dpm",
    "load_latents",
    "load_pdae",
    "manipulate",
    "one_step_x0",
    "onestep_grid",
    "pdae_weights",
    "plot_gap",
    "posterior_mean_gap",
    "reconstruct",
    "reconstruction_grid",
    "sample_pdae",
    "save_latents",
    "train_pdae",
    "train_pdae_latent",
]

# The command modules load on first use, as the ``guidekit pdae`` commands do: a broken one
# must not stop the plugin from loading.
_LAZY = {
    "autoencoding": ("Direction", "edit_held_out", "encode_images", "fit_direction",
                     "interpolate", "interpolation_grid", "manipulate", "reconstruct",
                     "reconstruction_grid"),
    "analysis": ("linear_probe", "one_step_x0", "onestep_grid", "plot_gap",
                 "posterior_mean_gap"),
}
if TYPE_CHECKING:
    from .analysis import linear_probe, one_step_x0, onestep_grid, plot_gap, posterior_mean_gap
    from .autoencoding import (
        Direction,
        edit_held_out,
        encode_images,
        fit_direction,
        interpolate,
        interpolation_grid,
        manipulate,
        reconstruct,
        reconstruction_grid,
    )


def __getattr__(name: str) -> Any:
    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")


def pdae_weights(schedule: NoiseSchedule, pdae_gamma: float = 0.1) -> torch.Tensor:
    """λ_t = (1/(1+SNR))^{1−γ} (SNR/(1+SNR))^γ = SNR^γ / (1+SNR)."""
    snr = schedule.float64["snr"]
    return (snr**pdae_gamma / (1 + snr)).to(torch.float32)


def train_pdae_command(
    ctx: typer.Context,
    pretrained: Path = typer.Option(..., help="The frozen DDPM checkpoint to build on."),
    data: opt.Data = "digits",
    out: opt.Out = Path("runs/pdae"),
    latent_dim: int = typer.Option(64, help="Size of z."),
    encoder_channels: int = typer.Option(32, help="Base width of the encoder E_φ."),
    weighting: opt.Weighting = "pdae",
    steps: opt.Steps = 2000,
    batch_size: opt.BatchSize = 32,
    lr: opt.LR = 1e-3,
    weight_decay: opt.WeightDecay = 0.0,
    ema_decay: opt.EMADecay = 0.995,
    grad_clip: opt.GradClip = 1.0,
    image_size: opt.ImageSize = None,
    seed: opt.Seed = 0,
    bf16: opt.BF16 = False,
    compile: opt.Compile = False,
    device: opt.Device = None,
    resume: opt.Resume = False,
    save_every: opt.SaveEvery = 500,
    log_every: opt.LogEvery = 50,
    json_out: opt.JSONOut = False,
) -> None:
    """Train PDAE's encoder and gradient estimator on a frozen DPM (its weights never change).
    Weighting options (e.g. --pdae-gamma) follow --weighting."""
    images = load_dataset(data, "train", image_size, seed)
    summary = train_pdae(
        images, out, pretrained=pretrained, latent_dim=latent_dim,
        encoder_channels=encoder_channels, weighting=weighting,
        weighting_options=opt.weighting_options(ctx), config=opt.train_config(ctx),
        resume=resume, progress=not json_out,
    )
    opt.report(summary, json_out, f"trained {KIND} in {summary['seconds']} s -> {out}")


@hookimpl
def guidekit_weightings() -> list[WeightingSpec]:
    return [
        WeightingSpec(
            "pdae", pdae_weights,
            help="PDAE: SNR^γ / (1+SNR), favouring the noisy steps where the gap is.",
            options=[click.Option(["--pdae-gamma"], type=float, default=0.1, show_default=True,
                                  help="γ of the PDAE weighting.")],
        )
    ]


@hookimpl
def guidekit_trainers() -> list[TrainerSpec]:
    return [
        TrainerSpec(KIND, train_pdae_command,
                    help="Train PDAE (encoder + gradient estimator) on a frozen DPM."),
        TrainerSpec(LATENT_KIND, train_latent_command,
                    help="Train a DPM over a PDAE's latents, for `guidekit pdae sample`."),
    ]


@hookimpl
def guidekit_models() -> list[ModelSpec]:
    return [latent_model_spec()]


@hookimpl
def guidekit_guidances() -> list[GuidanceSpec]:
    return [GuidanceSpec(KIND, build_pdae_guidance, options=guidance_options(),
                         help="PDAE's learned mean shift G_ψ(x_t, z, t) toward latents z.")]


@hookimpl
def guidekit_commands(cli: typer.Typer) -> None:
    # imported here so a failing command module cannot break the rest of the plugin
    from .commands import pdae_app

    cli.add_typer(pdae_app, name="pdae")


@hookimpl
def guidekit_quickstart_steps() -> list[QuickstartStep]:
    from .quickstart import quickstart_steps

    return quickstart_steps()
