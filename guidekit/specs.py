"""The named things a plugin registers: guidances, loss weightings, trainers, models, datasets.

Each spec is a small frozen dataclass that a hook returns in a list (see
:mod:`guidekit.hookspecs`). ``options`` are ``click.Option`` objects: the CLI adds them to the
commands that use the spec, and passes their values to ``build``/``weights`` as keywords.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import torch
from torch import Tensor, nn

from guidekit.schedule import NoiseSchedule

if TYPE_CHECKING:
    from guidekit.data import ImageData
    from guidekit.guidance import Guidance


@dataclass
class GuidanceContext:
    """What a guidance's ``build`` gets: the DPM being sampled and this guidance's options."""

    model: nn.Module  # ε_θ, frozen, in eval mode
    schedule: NoiseSchedule  # the DPM's training schedule (unrespaced)
    dpm_config: dict[str, Any]  # the DPM checkpoint's config.json
    num_samples: int  # batch size of the run
    device: torch.device
    options: dict[str, Any] = field(default_factory=dict)  # this guidance's option values
    checkpoint_dir: Path | None = None


@dataclass(frozen=True)
class GuidanceSpec:
    """A guidance method: ``build(ctx)`` returns a :class:`~guidekit.guidance.Guidance`."""

    name: str
    build: Callable[[GuidanceContext], Guidance]
    help: str = ""
    options: Sequence[click.Option] = ()


@dataclass(frozen=True)
class WeightingSpec:
    """A loss weighting: ``weights(schedule, **options)`` returns λ_t for every training step,
    a (T,) tensor, which multiplies the per-sample ε-loss."""

    name: str
    weights: Callable[..., Tensor]
    help: str = ""
    options: Sequence[click.Option] = ()


@dataclass(frozen=True)
class TrainerSpec:
    """``guidekit train NAME``: ``command`` is a typer command function (its parameters are
    the command's options)."""

    name: str
    command: Callable[..., Any]
    help: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """A network architecture that checkpoints can name: ``model_class(config_class(...))``."""

    name: str
    config_class: type
    model_class: type
    help: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    """A built-in dataset: ``load(split, image_size, seed)`` returns an ``ImageData``."""

    name: str
    load: Callable[[str, int | None, int], ImageData]
    help: str = ""


@dataclass
class StepReport:
    """What a quickstart step shows: a title, PNGs (grids, plots), tables and figures."""

    title: str
    images: list[Path] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    text: str = ""


@dataclass
class QuickstartContext:
    """What a quickstart step gets: the output folder and what earlier steps produced."""

    out: Path  # the quickstart folder; a step keeps its checkpoint in out / step name
    seed: int
    fast: bool  # tiny settings for smoke tests
    progress: bool
    results: dict[str, StepReport] = field(default_factory=dict)  # by step name


@dataclass(frozen=True)
class QuickstartStep:
    """One step of ``guidekit quickstart``; ``run(ctx)`` trains or evaluates and reports."""

    name: str
    run: Callable[[QuickstartContext], StepReport]
    order: int = 100
    help: str = ""
