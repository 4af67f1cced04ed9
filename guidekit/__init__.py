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

# public name -> the module that defines it (imported on first use)
_EXPORTS: dict[str, str] = {
    # a trained DPM and DDPM training
    "DPM": "guidekit.ddpm",
    "load_dpm": "guidekit.ddpm",
    "train_ddpm": "guidekit.ddpm",
    "TrainConfig": "guidekit.training",
    "UNetConfig": "guidekit.unet",
    "ScheduleConfig": "guidekit.schedule",
    "NoiseSchedule": "guidekit.schedule",
    # data
    "ImageData": "guidekit.data",
    "load_dataset": "guidekit.lookup",
    "save_image_grid": "guidekit.data",
    "save_images": "guidekit.data",
    # sampling and guidance
    "sample": "guidekit.sampling",
    "GuidanceRequest": "guidekit.sampling",
    "Sampler": "guidekit.engine",
    "Guidance": "guidekit.guidance",
    "GuidanceTerm": "guidekit.guidance",
    "StepInput": "guidekit.guidance",
    # plugins: the registry, the hook marker and the specs a hook returns
    "get_registry": "guidekit.plugins",
    "hookimpl": "guidekit.hookspecs",
    "GuidanceSpec": "guidekit.specs",
    "GuidanceContext": "guidekit.specs",
    "WeightingSpec": "guidekit.specs",
    "TrainerSpec": "guidekit.specs",
    "ModelSpec": "guidekit.specs",
    "DatasetSpec": "guidekit.specs",
    "QuickstartStep": "guidekit.specs",
    "QuickstartContext": "guidekit.specs",
    "StepReport": "guidekit.specs",
    "TrainerContext": "guidekit.specs",
    "Option": "guidekit.options",
    "run_quickstart": "guidekit.quickstart",
    # errors
    "GuidekitError": "guidekit.errors",
    "CheckpointError": "guidekit.errors",
    "DivergedError": "guidekit.errors",
    "PluginError": "guidekit.errors",
}

# a literal, so linters and type checkers see the re-exports; a test keeps it == _EXPORTS
__all__ = [
    "CheckpointError",
    "DPM",
    "DatasetSpec",
    "DivergedError",
    "Guidance",
    "GuidanceContext",
    "GuidanceRequest",
    "GuidanceSpec",
    "GuidanceTerm",
    "GuidekitError",
    "ImageData",
    "ModelSpec",
    "NoiseSchedule",
    "Option",
    "PluginError",
    "QuickstartContext",
    "QuickstartStep",
    "Sampler",
    "ScheduleConfig",
    "StepInput",
    "StepReport",
    "TrainConfig",
    "TrainerContext",
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
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see; the same names as _EXPORTS
    from guidekit.data import ImageData, save_image_grid, save_images
    from guidekit.ddpm import DPM, load_dpm, train_ddpm
    from guidekit.engine import Sampler
    from guidekit.errors import CheckpointError, DivergedError, GuidekitError, PluginError
    from guidekit.guidance import Guidance, GuidanceTerm, StepInput
    from guidekit.hookspecs import hookimpl
    from guidekit.lookup import load_dataset
    from guidekit.options import Option
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
        TrainerContext,
        TrainerSpec,
        WeightingSpec,
    )
    from guidekit.training import TrainConfig
    from guidekit.unet import UNetConfig
