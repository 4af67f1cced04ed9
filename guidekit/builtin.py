"""The core plugin, always registered: what every other method builds on.

It registers through the same hooks a third party uses; methods (P2, classifier guidance,
PDAE, ...) live under ``plugins/`` and load through entry points.
"""

from __future__ import annotations

from pathlib import Path

import torch

from guidekit.data import BUILTIN_DATASETS
from guidekit.hookspecs import hookimpl
from guidekit.schedule import NoiseSchedule
from guidekit.specs import (
    DatasetSpec,
    ModelSpec,
    QuickstartContext,
    QuickstartStep,
    StepReport,
    TrainerSpec,
    WeightingSpec,
)
from guidekit.unet import UNet, UNetConfig


def uniform_weights(schedule: NoiseSchedule) -> torch.Tensor:
    """λ_t = 1: the simple ε-loss of DDPM."""
    return torch.ones(schedule.num_steps)


@hookimpl
def guidekit_weightings() -> list[WeightingSpec]:
    return [WeightingSpec("uniform", uniform_weights, help="λ_t = 1 (DDPM's simple loss).")]


@hookimpl
def guidekit_models() -> list[ModelSpec]:
    return [ModelSpec("unet", UNetConfig, UNet, help="guided-diffusion style UNet (ε_θ).")]


@hookimpl
def guidekit_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec("digits", BUILTIN_DATASETS["digits"],
                    help="scikit-learn's handwritten digits, 16×16 grey, 10 classes."),
        DatasetSpec("shapes", BUILTIN_DATASETS["shapes"],
                    help="procedural 32×32 RGB shapes with known factors."),
    ]


@hookimpl
def guidekit_trainers() -> list[TrainerSpec]:
    from guidekit.ddpm import train_ddpm

    return [TrainerSpec("ddpm", train_ddpm, help="Train a DDPM noise predictor.")]


def quickstart_ddpm(ctx: QuickstartContext) -> StepReport:
    """Train the DDPM every later step guides or builds on."""
    from guidekit.data import load_dataset
    from guidekit.ddpm import train
    from guidekit.training import TrainConfig

    data = load_dataset("digits", "train")
    steps = 30 if ctx.fast else QUICKSTART_DDPM_STEPS
    summary = train(
        data, ctx.out / "ddpm",
        config=TrainConfig(steps=steps, batch_size=64, lr=1e-3, ema_decay=0.995,
                           seed=ctx.seed, save_every=steps, log_every=max(steps // 20, 1)),
        samples=64, progress=ctx.progress,
    )
    return StepReport(
        "DDPM on digits",
        images=[Path(summary["samples"])],
        metrics={k: summary[k] for k in ("steps", "final_loss", "seconds", "images_per_second")},
        text="Unguided DDIM-50 samples from the EMA weights.",
    )


QUICKSTART_DDPM_STEPS = 1500


@hookimpl
def guidekit_quickstart_steps() -> list[QuickstartStep]:
    return [QuickstartStep("ddpm", quickstart_ddpm, order=10, help="Train a DDPM on digits.")]
