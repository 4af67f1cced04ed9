"""guidekit: guided diffusion with one DDPM/DDIM engine and guidance methods as plugins.

The public API is what ``__all__`` lists; everything else is internal and may change::

    import guidekit

    data = guidekit.load_dataset("digits")
    guidekit.train_ddpm(data, "runs/ddpm", config=guidekit.TrainConfig(steps=1200))
    dpm = guidekit.load_dpm("runs/ddpm")
    x = guidekit.sample(dpm, 16, sampler="ddim", steps=50)
    guidekit.save_image_grid(x, "samples.png", scale=4)

Guidance methods ship as plugins with their own Python API: ``guidekit_classifier``
(classifier guidance) and ``guidekit_pdae`` (PDAE). Names load on first use, so
``import guidekit`` stays cheap (torch is imported only when a name needs it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute there); the attribute differs only for train_ddpm
_EXPORTS: dict[str, tuple[str, str]] = {
    # a trained DPM and DDPM training
    "DPM": ("guidekit.ddpm", "DPM"),
    "load_dpm": ("guidekit.ddpm", "load_dpm"),
    "train_ddpm": ("guidekit.ddpm", "train"),
    "TrainConfig": ("guidekit.training", "TrainConfig"),
    "UNetConfig": ("guidekit.unet", "UNetConfig"),
    "ScheduleConfig": ("guidekit.schedule", "ScheduleConfig"),
    "NoiseSchedule": ("guidekit.schedule", "NoiseSchedule"),
    # data
    "ImageData": ("guidekit.data", "ImageData"),
    "load_dataset": ("guidekit.data", "load_dataset"),
    "save_image_grid": ("guidekit.data", "save_image_grid"),
    "save_images": ("guidekit.data", "save_images"),
    # sampling and guidance
    "sample": ("guidekit.sampling", "sample"),
    "GuidanceRequest": ("guidekit.sampling", "GuidanceRequest"),
    "Sampler": ("guidekit.engine", "Sampler"),
    "Guidance": ("guidekit.guidance", "Guidance"),
    "GuidanceTerm": ("guidekit.guidance", "GuidanceTerm"),
    "StepInput": ("guidekit.guidance", "StepInput"),
    # plugins: the registry, the hook marker and the specs a hook returns
    "get_registry": ("guidekit.plugins", "get_registry"),
    "hookimpl": ("guidekit.hookspecs", "hookimpl"),
    "GuidanceSpec": ("guidekit.specs", "GuidanceSpec"),
    "GuidanceContext": ("guidekit.specs", "GuidanceContext"),
    "WeightingSpec": ("guidekit.specs", "WeightingSpec"),
    "TrainerSpec": ("guidekit.specs", "TrainerSpec"),
    "ModelSpec": ("guidekit.specs", "ModelSpec"),
    "DatasetSpec": ("guidekit.specs", "DatasetSpec"),
    "QuickstartStep": ("guidekit.specs", "QuickstartStep"),
    "QuickstartContext": ("guidekit.specs", "QuickstartContext"),
    "StepReport": ("guidekit.specs", "StepReport"),
    "run_quickstart": ("guidekit.quickstart", "run_quickstart"),
    # errors
    "GuidekitError": ("guidekit.errors", "GuidekitError"),
    "CheckpointError": ("guidekit.errors", "CheckpointError"),
    "PluginError": ("guidekit.errors", "PluginError"),
}

__all__ = [
    "CheckpointError",
    "DPM",
    "DatasetSpec",
    "Guidance",
    "GuidanceContext",
    "GuidanceRequest",
    "GuidanceSpec",
    "GuidanceTerm",
    "GuidekitError",
    "ImageData",
    "ModelSpec",
    "NoiseSchedule",
    "PluginError",
    "QuickstartContext",
    "QuickstartStep",
    "Sampler",
    "ScheduleConfig",
    "StepInput",
    "StepReport",
    "TrainConfig",
    "TrainerSpec",
    "UNetConfig",
    "WeightingSpec",
    "get_registry",
    "hookimpl",
    "load_dataset",
    "load_dpm",
    "run_quickstart",
    "sample",
    "save_image_grid",
    "save_images",
    "train_ddpm",
]


def __getattr__(name: str) -> Any:
    # PEP 562: import on first use, so the pytest plugin and `guidekit --help` need no torch
    if name not in _EXPORTS:
        raise AttributeError(f"module 'guidekit' has no attribute '{name}'")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see; the same names as _EXPORTS
    from guidekit.data import ImageData, load_dataset, save_image_grid, save_images
    from guidekit.ddpm import DPM, load_dpm
    from guidekit.ddpm import train as train_ddpm
    from guidekit.engine import Sampler
    from guidekit.errors import CheckpointError, GuidekitError, PluginError
    from guidekit.guidance import Guidance, GuidanceTerm, StepInput
    from guidekit.hookspecs import hookimpl
    from guidekit.plugins import get_registry
    from guidekit.quickstart import run_quickstart
    from guidekit.sampling import GuidanceRequest, sample
    from guidekit.schedule import NoiseSchedule, ScheduleConfig
    from guidekit.specs import (
        DatasetSpec,
        GuidanceContext,
        GuidanceSpec,
        ModelSpec,
        QuickstartContext,
        QuickstartStep,
        StepReport,
        TrainerSpec,
        WeightingSpec,
    )
    from guidekit.training import TrainConfig
    from guidekit.unet import UNetConfig
