"""The core plugin, always registered: what every other method builds on.

It registers through the same hooks a third party uses; methods (P2, classifier guidance,
PDAE, ...) live under ``plugins/`` and load through entry points.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from guidekit.hookspecs import hookimpl
from guidekit.specs import (
    DatasetSpec,
    Lazy,
    ModelSpec,
    QuickstartContext,
    QuickstartStep,
    StepReport,
    TrainerSpec,
    WeightingSpec,
)

if TYPE_CHECKING:  # torch loads on first use: `guidekit --help` must not import it
    import torch

    from guidekit.data import ImageData
    from guidekit.schedule import NoiseSchedule


def uniform_weights(schedule: NoiseSchedule) -> torch.Tensor:
    """λ_t = 1: the simple ε-loss of DDPM."""
    import torch

    return torch.ones(schedule.num_steps)


@hookimpl
def guidekit_weightings() -> list[WeightingSpec]:
    return [WeightingSpec("uniform", uniform_weights, help="λ_t = 1 (DDPM's simple loss).")]


@hookimpl
def guidekit_models() -> list[ModelSpec]:
    return [ModelSpec("unet", Lazy("guidekit.unet:UNetConfig"), Lazy("guidekit.unet:UNet"),
                      help="guided-diffusion style UNet (ε_θ).")]


def _builtin_dataset(name: str) -> Callable[[str, int | None, int], ImageData]:
    """``BUILTIN_DATASETS[name]`` of :mod:`guidekit.data`, imported when it loads."""

    def load(split: str = "train", image_size: int | None = None, seed: int = 0) -> ImageData:
        from guidekit.data import BUILTIN_DATASETS

        return BUILTIN_DATASETS[name](split, image_size, seed)

    return load


@hookimpl
def guidekit_datasets() -> list[DatasetSpec]:
    return [
        DatasetSpec("digits", _builtin_dataset("digits"),
                    help="scikit-learn's handwritten digits, 16×16 grey, 10 classes."),
        DatasetSpec("shapes", _builtin_dataset("shapes"),
                    help="procedural 32×32 RGB shapes with known factors."),
    ]


@hookimpl
def guidekit_trainers() -> list[TrainerSpec]:
    return [TrainerSpec("ddpm", Lazy("guidekit.ddpm:ddpm_trainer"),
                        help="Train a DDPM noise predictor.",
                        options=Lazy("guidekit.ddpm:DDPM_OPTIONS"))]


def quickstart_ddpm(ctx: QuickstartContext) -> StepReport:
    """Train the DDPM every later step guides or builds on."""
    from guidekit.ddpm import sample_grid, train_ddpm
    from guidekit.lookup import load_dataset
    from guidekit.training import TrainConfig

    data = load_dataset("digits", "train")
    steps = 30 if ctx.fast else QUICKSTART_DDPM_STEPS
    out = ctx.out / "ddpm"
    summary = train_ddpm(
        data, out,
        config=TrainConfig(steps=steps, seed=ctx.seed, save_every=steps,
                           log_every=max(steps // 20, 1), bf16=ctx.bf16),
        samples=0, progress=ctx.progress,
    )
    grids = [
        sample_grid(out, 64, sampler="ddpm", steps=25 if ctx.fast else 250, seed=ctx.seed,
                    name="samples_ddpm.png"),
        sample_grid(out, 64, sampler="ddim", steps=50, seed=ctx.seed, name="samples_ddim.png"),
    ]
    return StepReport(
        "DDPM on digits",
        images=grids,
        metrics={k: summary[k] for k in ("steps", "final_loss", "seconds", "images_per_second")},
        text="Unguided samples from the EMA weights: DDPM ancestral (250 steps) and DDIM "
        "(50 steps, η = 0).",
    )


# About 3.5 minutes on two CPU cores at batch 32 (digits, the default 1.4M-parameter UNet).
QUICKSTART_DDPM_STEPS = 1200


@hookimpl
def guidekit_quickstart_steps() -> list[QuickstartStep]:
    return [QuickstartStep("ddpm", quickstart_ddpm, order=10, help="Train a DDPM on digits.")]
