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
``train_pdae_latent``, ``sample_pdae`` (pdae sample) and ``fewstep_generation`` (pdae
fewstep) do the rest; :class:`PDAEGuidance` is the ``pdae`` guidance for a
``guidekit.GuidanceTerm``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import torch

from guidekit import (
    GuidanceSpec,
    ModelSpec,
    NoiseSchedule,
    Option,
    QuickstartStep,
    TrainerSpec,
    WeightingSpec,
    hookimpl,
)

from .guidance import (
    GUIDANCE_OPTIONS,
    PDAEGuidance,
    build_pdae_guidance,
    load_latents,
    save_latents,
)
from .latent import KIND as LATENT_KIND
from .latent import (
    LATENT_OPTIONS,
    LoadedLatentDPM,
    latent_model_spec,
    latent_trainer,
    load_latent_dpm,
    sample_pdae,
    train_pdae_latent,
)
from .training import KIND, PDAE_OPTIONS, LoadedPDAE, load_pdae, pdae_trainer, train_pdae

__version__ = "0.1.0"

__all__ = [
    "Direction",
    "LoadedLatentDPM",
    "LoadedPDAE",
    "PDAEGuidance",
    "edit_held_out",
    "encode_images",
    "fewstep_generation",
    "fit_direction",
    "interpolate",
    "interpolation_grid",
    "linear_probe",
    "load_latent_dpm",
    "load_latents",
    "load_pdae",
    "manipulate",
    "manipulation_grid",
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
                     "interpolate", "interpolation_grid", "manipulate", "manipulation_grid",
                     "reconstruct", "reconstruction_grid"),
    "analysis": ("linear_probe", "one_step_x0", "onestep_grid", "plot_gap",
                 "posterior_mean_gap"),
    "fewstep": ("fewstep_generation",),
}
if TYPE_CHECKING:
    import typer

    from .analysis import linear_probe, one_step_x0, onestep_grid, plot_gap, posterior_mean_gap
    from .autoencoding import (
        Direction,
        edit_held_out,
        encode_images,
        fit_direction,
        interpolate,
        interpolation_grid,
        manipulate,
        manipulation_grid,
        reconstruct,
        reconstruction_grid,
    )
    from .fewstep import fewstep_generation


def __getattr__(name: str) -> Any:
    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")


def pdae_weights(schedule: NoiseSchedule, pdae_gamma: float) -> torch.Tensor:
    """λ_t = (1/(1+SNR))^{1−γ} (SNR/(1+SNR))^γ = SNR^γ / (1+SNR)."""
    snr = schedule.float64["snr"]
    return (snr**pdae_gamma / (1 + snr)).to(torch.float32)


@hookimpl
def guidekit_weightings() -> list[WeightingSpec]:
    return [
        WeightingSpec(
            "pdae", pdae_weights,
            help="PDAE: SNR^γ / (1+SNR), favouring the noisy steps where the gap is.",
            options=[Option("pdae_gamma", float, 0.1, "γ of the PDAE weighting.")],
        )
    ]


@hookimpl
def guidekit_trainers() -> list[TrainerSpec]:
    return [
        TrainerSpec(KIND, pdae_trainer, options=PDAE_OPTIONS,
                    help="Train PDAE (encoder + gradient estimator) on a frozen DPM."),
        TrainerSpec(LATENT_KIND, latent_trainer, options=LATENT_OPTIONS,
                    help="Train a DPM over a PDAE's latents, for `guidekit pdae sample`."),
    ]


@hookimpl
def guidekit_models() -> list[ModelSpec]:
    return [latent_model_spec()]


@hookimpl
def guidekit_guidances() -> list[GuidanceSpec]:
    return [GuidanceSpec(KIND, build_pdae_guidance, options=GUIDANCE_OPTIONS,
                         help="PDAE's learned mean shift G_ψ(x_t, z, t) toward latents z.")]


@hookimpl
def guidekit_commands(cli: typer.Typer) -> None:
    # imported here: typer only loads for the CLI, and a failing command module cannot
    # break the rest of the plugin
    from .cli import pdae_app

    cli.add_typer(pdae_app, name="pdae")


@hookimpl
def guidekit_quickstart_steps() -> list[QuickstartStep]:
    from .quickstart import quickstart_steps

    return quickstart_steps()
