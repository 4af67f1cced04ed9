"""The named things a plugin registers: guidances, loss weightings, trainers, models, datasets.

Each spec is a small frozen dataclass that a hook returns in a list (see
:mod:`guidekit.hookspecs`). ``options`` are :class:`~guidekit.options.Option` declarations:
the CLI turns them into flags, and every caller, CLI or Python, gets each option's value (its
default when not given) by the option's name. A spec checks its fields when it is built, so a
malformed one fails inside the plugin that made it, naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from guidekit.guidance import class_labels
from guidekit.options import Option
from guidekit.schedule import NoiseSchedule

if TYPE_CHECKING:
    from guidekit.data import ImageData
    from guidekit.guidance import Guidance

__all__ = [
    "DatasetSpec",
    "GuidanceContext",
    "GuidanceSpec",
    "ModelSpec",
    "QuickstartContext",
    "QuickstartStep",
    "StepReport",
    "TrainerContext",
    "TrainerSpec",
    "WeightingSpec",
]



@dataclass
class GuidanceContext:
    """What a guidance's ``build`` gets: the DPM being sampled and this guidance's options."""

    model: nn.Module  # ε_θ, frozen, in eval mode
    schedule: NoiseSchedule  # the DPM's training schedule (unrespaced)
    dpm_config: dict[str, Any]  # the DPM checkpoint's config.json
    num_samples: int  # batch size of the run
    device: torch.device
    options: dict[str, Any] = field(default_factory=dict)  # every option's value, by name
    checkpoint_dir: Path | None = None
    classes: tuple[int, ...] = ()  # the run's --class values (the class of every sample)
    class_per_row: bool = False  # --class-per-row: one class per block of samples

    def target_classes(self, num_classes: int, what: str = "the guidance") -> Tensor:
        """The (num_samples,) class of every sample from the run's ``--class`` /
        ``--class-per-row``, checked against ``num_classes`` (what ``what`` knows): for
        guidances that steer toward a class. The same labels condition a class-conditional
        DPM."""
        labels = class_labels(self.num_samples, num_classes, self.classes, self.class_per_row,
                              what)
        return labels.to(self.device)


@dataclass(frozen=True)
class GuidanceSpec:
    """A guidance method: ``build(ctx)`` returns a :class:`~guidekit.guidance.Guidance`."""

    name: str
    build: Callable[[GuidanceContext], Guidance]
    help: str = ""
    options: Sequence[Option] = ()

    def __post_init__(self) -> None:
        _check(self, "build")


@dataclass(frozen=True)
class WeightingSpec:
    """A loss weighting: ``weights(schedule, **options)`` returns λ_t ≥ 0 for every training
    step, a (T,) tensor, which multiplies the per-sample ε-loss. It gets every option's value
    as a keyword."""

    name: str
    weights: Callable[..., Tensor]
    help: str = ""
    options: Sequence[Option] = ()

    def __post_init__(self) -> None:
        _check(self, "weights")


@dataclass
class TrainerContext:
    """What a trainer's ``train`` gets: its option values and how to report progress."""

    options: dict[str, Any]  # every declared option's value, by name (defaults filled)
    weighting_options: dict[str, Any] = field(default_factory=dict)  # the --weighting's own
    progress: bool = True  # show progress bars (off under --json)


@dataclass(frozen=True)
class TrainerSpec:
    """``guidekit train NAME``: ``train(ctx)`` trains and returns a :class:`StepReport`
    (its ``metrics`` are what ``--json`` prints). ``options`` become the command's flags;
    guidekit adds ``--json``, and the options of the chosen weighting when the trainer
    declares an option named ``weighting``."""

    name: str
    train: Callable[[TrainerContext], StepReport]
    help: str = ""
    options: Sequence[Option] = ()

    def __post_init__(self) -> None:
        _check(self, "train")
        if "json" in {o.name for o in self.options}:
            raise TypeError(f"trainer '{self.name}': guidekit adds --json itself")


@dataclass(frozen=True)
class ModelSpec:
    """A network architecture that checkpoints can name: ``model_class(config_class(...))``."""

    name: str
    config_class: type
    model_class: type
    help: str = ""

    def __post_init__(self) -> None:
        _check(self)
        for attr in ("config_class", "model_class"):
            if not isinstance(getattr(self, attr), type):
                raise TypeError(f"model '{self.name}': {attr} must be a class")
        if not callable(getattr(self.config_class, "from_dict", None)):
            raise TypeError(f"model '{self.name}': config_class needs a from_dict classmethod")


@dataclass(frozen=True)
class DatasetSpec:
    """A built-in dataset: ``load(split, image_size, seed)`` returns an ``ImageData``."""

    name: str
    load: Callable[[str, int | None, int], ImageData]
    help: str = ""

    def __post_init__(self) -> None:
        _check(self, "load")


@dataclass
class StepReport:
    """What a quickstart step or a trainer reports: a title, PNGs (grids, plots), tables
    (rows of plain values) and figures (``metrics``, plain JSON values: what ``--json``
    prints)."""

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

    def __post_init__(self) -> None:
        _check(self, "run")
        if isinstance(self.order, bool) or not isinstance(self.order, int):
            raise TypeError(f"quickstart step '{self.name}': order must be an int")


_SPEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def _check(spec: Any, *functions: str) -> None:
    """The fields every spec shares: a CLI-safe name, callables, a help string, options."""
    what = type(spec).__name__
    if not isinstance(spec.name, str) or not _SPEC_NAME.match(spec.name):
        raise TypeError(f"{what} name must be a non-empty string of letters, digits, '-', '_' "
                        f"or '.', got {spec.name!r}")
    for attr in functions:
        if not callable(getattr(spec, attr)):
            raise TypeError(f"{what} '{spec.name}': {attr} must be callable, got "
                            f"{type(getattr(spec, attr)).__name__}")
    if not isinstance(spec.help, str):
        raise TypeError(f"{what} '{spec.name}': help must be a string")
    options = getattr(spec, "options", ())
    if isinstance(options, (str, bytes)) or not all(isinstance(o, Option) for o in options):
        raise TypeError(f"{what} '{spec.name}': options must be a list of guidekit Option "
                        "declarations")
    names = [o.name for o in options]
    if len(names) != len(set(names)):
        raise TypeError(f"{what} '{spec.name}': an option name is declared twice")
    if hasattr(spec, "options"):
        object.__setattr__(spec, "options", tuple(options))
