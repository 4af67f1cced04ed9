"""The named things a plugin registers: guidances, loss weightings, trainers, models, datasets.

Each spec is a small frozen dataclass that a hook returns in a list (see
:mod:`guidekit.hookspecs`). ``options`` are :class:`~guidekit.options.Option` declarations:
the CLI turns them into flags, and every caller, CLI or Python, gets each option's value (its
default when not given) by the option's name. A spec checks its fields when it is built, so a
malformed one fails inside the plugin that made it, naming the field.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guidekit.errors import PluginError
from guidekit.options import Option

if TYPE_CHECKING:  # torch loads on first use: `guidekit --help` must not import it
    import torch
    from torch import Tensor, nn

    from guidekit.data import ImageData
    from guidekit.guidance import Guidance
    from guidekit.schedule import NoiseSchedule

__all__ = [
    "Claim",
    "DatasetSpec",
    "GuidanceContext",
    "GuidanceSpec",
    "Lazy",
    "lazy_exports",
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
        from guidekit.guidance import class_labels

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

    _functions = ("build",)

    def __post_init__(self) -> None:
        _check(self)

    def __getattribute__(self, attr: str) -> Any:
        return _read(self, attr)


@dataclass(frozen=True)
class WeightingSpec:
    """A loss weighting: ``weights(schedule, **options)`` returns λ_t ≥ 0 for every training
    step, a (T,) tensor, which multiplies the per-sample ε-loss. It gets every option's value
    as a keyword."""

    name: str
    weights: Callable[..., Tensor]
    help: str = ""
    options: Sequence[Option] = ()

    _functions = ("weights",)

    def __post_init__(self) -> None:
        _check(self)

    def __getattribute__(self, attr: str) -> Any:
        return _read(self, attr)


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

    _functions = ("train",)

    def __post_init__(self) -> None:
        _check(self)

    def __getattribute__(self, attr: str) -> Any:
        return _read(self, attr)


@dataclass(frozen=True)
class ModelSpec:
    """A network architecture that checkpoints can name: ``model_class(config_class(...))``."""

    name: str
    config_class: type
    model_class: type
    help: str = ""

    _functions = ()

    def __post_init__(self) -> None:
        _check(self)

    def __getattribute__(self, attr: str) -> Any:
        return _read(self, attr)


@dataclass(frozen=True)
class DatasetSpec:
    """A built-in dataset: ``load(split, image_size, seed)`` returns an ``ImageData``."""

    name: str
    load: Callable[[str, int | None, int], ImageData]
    help: str = ""

    _functions = ("load",)

    def __post_init__(self) -> None:
        _check(self)

    def __getattribute__(self, attr: str) -> Any:
        return _read(self, attr)


@dataclass(frozen=True)
class Claim:
    """One claim a quickstart report makes, checked on the run's own figures: what is
    claimed, whether it held, and the figures it rests on (one line, for the report)."""

    claim: str
    holds: bool
    evidence: str

    def to_dict(self) -> dict[str, Any]:
        return {"claim": self.claim, "holds": self.holds, "evidence": self.evidence}


@dataclass
class StepReport:
    """What a quickstart step or a trainer reports: a title, PNGs (grids, plots), tables
    (rows of plain values), figures (``metrics``, plain JSON values: what ``--json``
    prints) and, for a quickstart step, the claims its figures are checked against."""

    title: str
    images: list[Path] = field(default_factory=list)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    claims: list[Claim] = field(default_factory=list)


@dataclass
class QuickstartContext:
    """What a quickstart step gets: the output folder and what earlier steps produced."""

    out: Path  # the quickstart folder; a step keeps its checkpoint in out / step name
    seed: int
    fast: bool  # tiny settings for smoke tests
    progress: bool
    results: dict[str, StepReport] = field(default_factory=dict)  # by step name
    # bf16 autocast for the training steps: on where the hardware computes bf16 natively
    bf16: bool = False


@dataclass(frozen=True)
class QuickstartStep:
    """One step of ``guidekit quickstart``; ``run(ctx)`` trains or evaluates and reports."""

    name: str
    run: Callable[[QuickstartContext], StepReport]
    order: int = 100
    help: str = ""

    _functions = ("run",)

    def __post_init__(self) -> None:
        _check(self)
        if isinstance(self.order, bool) or not isinstance(self.order, int):
            raise TypeError(f"quickstart step '{self.name}': order must be an int")

    def __getattribute__(self, attr: str) -> Any:
        return _read(self, attr)


def lazy_exports(package: str, names: dict[str, Sequence[str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for a plugin package: ``names`` maps each submodule
    to the public names it defines, imported on first use, so importing the package (which
    ``guidekit --help`` does for every plugin) stays free of torch::

        __getattr__ = lazy_exports(__name__, {"guidance": ("MyGuidance",)})
    """
    def __getattr__(name: str) -> Any:
        for module, defined in names.items():
            if name in defined:
                return getattr(importlib.import_module(f"{package}.{module}"), name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    return __getattr__


@dataclass(frozen=True)
class Lazy:
    """A spec field named by ``"module:attribute"`` and imported when first read, so a
    plugin registers names, help and options without importing what runs them (torch, its
    networks): ``guidekit --help`` and ``guidekit plugins`` stay fast. Any field but
    ``name``, ``help`` and ``order`` may be one::

        TrainerSpec("ddpm", Lazy("guidekit.ddpm:ddpm_trainer"), help="Train a DDPM.",
                    options=Lazy("guidekit.ddpm:DDPM_OPTIONS"))

    The loaded value is checked as one given directly would be; a target that fails to
    import or load, or a value of the wrong kind, is a one-line
    :class:`~guidekit.errors.PluginError` naming the spec, the field and the target."""

    target: str

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not _TARGET.match(self.target):
            raise TypeError(f"Lazy target must be 'module:attribute' (dots allowed in both), "
                            f"got {self.target!r}")

    def load(self) -> Any:
        """The value the target names, its module imported now."""
        module, _, path = self.target.partition(":")
        value: Any = importlib.import_module(module)
        for attr in path.split("."):
            value = getattr(value, attr)
        return value


_SPEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")
_EAGER = ("name", "help", "order")  # what the registry and --help read without loading


def _check(spec: Any) -> None:
    """The fields every spec shares: a CLI-safe name, callables, a help string, options; a
    :class:`Lazy` field is checked when first read (:func:`_read`)."""
    what = type(spec).__name__
    if not isinstance(spec.name, str) or not _SPEC_NAME.match(spec.name):
        raise TypeError(f"{what} name must be a non-empty string of letters, digits, '-', '_' "
                        f"or '.', got {spec.name!r}")
    for f in dataclasses.fields(spec):
        value = spec.__dict__[f.name]
        if f.name == "help" and not isinstance(value, str):
            raise TypeError(f"{what} '{spec.name}': help must be a string")
        if f.name not in _EAGER and not isinstance(value, Lazy):
            object.__setattr__(spec, f.name, _checked(spec, f.name, value))


def _checked(spec: Any, attr: str, value: Any) -> Any:
    """``value`` for field ``attr`` of ``spec`` once checked (options as a tuple), or a
    TypeError naming the field."""
    what = f"{type(spec).__name__} '{spec.name}'"
    if attr in spec._functions and not callable(value):
        raise TypeError(f"{what}: {attr} must be callable, got {type(value).__name__}")
    if attr == "options":
        wrong = f"{what}: options must be a list of guidekit Option declarations"
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise TypeError(wrong)
        options = tuple(value)
        if not all(isinstance(o, Option) for o in options):
            raise TypeError(wrong)
        names = [o.name for o in options]
        if len(names) != len(set(names)):
            raise TypeError(f"{what}: an option name is declared twice")
        if isinstance(spec, TrainerSpec) and "json" in names:
            raise TypeError(f"trainer '{spec.name}': guidekit adds --json itself")
        return options
    if attr in ("config_class", "model_class"):
        if not isinstance(value, type):
            raise TypeError(f"model '{spec.name}': {attr} must be a class")
        if attr == "config_class" and not callable(getattr(value, "from_dict", None)):
            raise TypeError(f"model '{spec.name}': config_class needs a from_dict classmethod")
    return value


def _read(spec: Any, attr: str) -> Any:
    """A spec's attribute (its ``__getattribute__``): a :class:`Lazy` field is loaded and
    checked on first read, then kept."""
    value = object.__getattribute__(spec, attr)
    if not isinstance(value, Lazy):
        return value
    bug = "the plugin has a bug: report it to its authors or uninstall it"
    try:
        loaded = value.load()
    except (Exception, SystemExit) as exc:
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise PluginError(f"{type(spec).__name__} '{spec.name}': {attr} ({value.target}) "
                          f"failed to load: {reason}; {bug}") from None
    try:
        loaded = _checked(spec, attr, loaded)
    except TypeError as exc:
        raise PluginError(f"{exc} (loaded from {value.target}); {bug}") from None
    object.__setattr__(spec, attr, loaded)
    return loaded
