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

from typing import TYPE_CHECKING

from guidekit import (
    GuidanceSpec,
    ModelSpec,
    Option,
    QuickstartStep,
    TrainerSpec,
    WeightingSpec,
    hookimpl,
)
from guidekit.specs import Lazy, lazy_exports

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

# The names the hooks register, as .training and .latent spell them (KIND, MODEL_NAME):
# written here so that registering needs no torch (tests/test_cli_startup.py holds them equal).
KIND = "pdae"
LATENT_KIND = "pdae-latent"
LATENT_MODEL = "latent_mlp"

# Every module but this one loads on first use: torch loads on first use (`guidekit --help`
# must not import it), and a broken command module must not stop the plugin from loading.
_LAZY = {
    "autoencoding": ("Direction", "edit_held_out", "encode_images", "fit_direction",
                     "interpolate", "interpolation_grid", "manipulate", "manipulation_grid",
                     "reconstruct", "reconstruction_grid"),
    "analysis": ("linear_probe", "one_step_x0", "onestep_grid", "plot_gap",
                 "posterior_mean_gap"),
    "fewstep": ("fewstep_generation",),
    "guidance": ("GUIDANCE_OPTIONS", "PDAEGuidance", "build_pdae_guidance", "load_latents",
                 "save_latents"),
    "latent": ("LATENT_OPTIONS", "LoadedLatentDPM", "latent_model_spec", "latent_trainer",
               "load_latent_dpm", "sample_pdae", "train_pdae_latent"),
    "training": ("PDAE_OPTIONS", "LoadedPDAE", "load_pdae", "pdae_trainer", "train_pdae"),
}
if TYPE_CHECKING:
    import torch
    import typer

    from guidekit import NoiseSchedule

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
    from .guidance import PDAEGuidance, load_latents, save_latents
    from .latent import LoadedLatentDPM, load_latent_dpm, sample_pdae, train_pdae_latent
    from .training import LoadedPDAE, load_pdae, train_pdae


__getattr__ = lazy_exports(__name__, _LAZY)


def pdae_weights(schedule: NoiseSchedule, pdae_gamma: float) -> torch.Tensor:
    """λ_t = (1/(1+SNR))^{1−γ} (SNR/(1+SNR))^γ = SNR^γ / (1+SNR)."""
    import torch

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
        TrainerSpec(KIND, Lazy("guidekit_pdae.training:pdae_trainer"),
                    options=Lazy("guidekit_pdae.training:PDAE_OPTIONS"),
                    help="Train PDAE (encoder + gradient estimator) on a frozen DPM."),
        TrainerSpec(LATENT_KIND, Lazy("guidekit_pdae.latent:latent_trainer"),
                    options=Lazy("guidekit_pdae.latent:LATENT_OPTIONS"),
                    help="Train a DPM over a PDAE's latents, for `guidekit pdae sample`."),
    ]


@hookimpl
def guidekit_models() -> list[ModelSpec]:
    # latent_model_spec() of .latent, its classes loaded on first use
    return [ModelSpec(LATENT_MODEL, Lazy("guidekit_pdae.latent:LatentMLPConfig"),
                      Lazy("guidekit_pdae.latent:LatentMLP"),
                      help="Residual MLP ε-predictor over PDAE latents (pdae-latent).")]


@hookimpl
def guidekit_guidances() -> list[GuidanceSpec]:
    return [GuidanceSpec(KIND, Lazy("guidekit_pdae.guidance:build_pdae_guidance"),
                         options=Lazy("guidekit_pdae.guidance:GUIDANCE_OPTIONS"),
                         help="PDAE's learned mean shift G_ψ(x_t, z, t) toward latents z.")]


@hookimpl
def guidekit_commands(cli: typer.Typer) -> None:
    # imported here: typer only loads for the CLI, and a failing command module cannot
    # break the rest of the plugin
    from .cli import pdae_app

    cli.add_typer(pdae_app, name="pdae")


@hookimpl
def guidekit_quickstart_steps() -> list[QuickstartStep]:
    # quickstart_steps() of .quickstart, its steps loaded when they run
    return [
        QuickstartStep("pdae", Lazy("guidekit_pdae.quickstart:quickstart_pdae"), order=40,
                       help="Train PDAE on the DDPM; gap and one-step x̂_0."),
        QuickstartStep("pdae-autoencoding",
                       Lazy("guidekit_pdae.quickstart:quickstart_autoencoding"), order=50,
                       help="Reconstruct, interpolate, edit; linear probe on z."),
        QuickstartStep("pdae-sample", Lazy("guidekit_pdae.quickstart:quickstart_sample"),
                       order=60, help="Latent DPM over z; sample new digits."),
    ]
