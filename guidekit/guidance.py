"""Guidance: an estimate g ≈ ∇_{x_t} log p(c | x_t) that the engine folds into each step.

A guidance is any callable taking a :class:`StepInput` and returning g with x_t's shape.
Several compose by summing, each with its own scale and per-timestep weight.

A guidance returns one of two forms, named by its ``form`` attribute:

- ``"score"`` (the default): g ≈ ∇ log p(c | x_t). DDPM shifts the mean, μ + s·Σ·g; DDIM
  shifts ε, ε̂ = ε − s·√(1−ᾱ_t)·g (guided-diffusion's ``condition_mean``/``condition_score``).
- ``"eps"``: an ε-space shift d, applied as ε̂ = ε − s·d before the step in every sampler,
  so DDPM's mean is μ_θ(x_t, ε̂). A network trained on ε̂ (PDAE's G_ψ) then samples with
  exactly the ε̂ it was trained on, whichever sampler runs.

Two more optional attributes serve guidances built on a class-conditional model itself
(classifier-free guidance):

- ``labels``, a (B,) long tensor: the engine evaluates ε(x_t, labels) in the same batched
  forward as the step's own ε and hands it over as :attr:`StepInput.label_eps`;
- ``unconditional_base = True``: the step's own ε is the model's null class ε(x_t, ∅)
  (the model must have one), so the guidance's shift is all that conditions the samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from guidekit.errors import DivergedError, GuidekitError
from guidekit.schedule import NoiseSchedule

__all__ = [
    "FORMS",
    "Guidance",
    "GuidanceTerm",
    "StepInput",
    "check_finite",
    "class_labels",
    "compose",
    "count_diverged",
    "guidance_form",
    "guidance_labels",
    "parse_timestep_spec",
    "timestep_weight",
]

FORMS = ("score", "eps")



@dataclass
class StepInput:
    """What a guidance sees at one step of sampling or inversion."""

    x_t: Tensor  # the current sample, (B, C, H, W)
    t: Tensor  # original training timesteps, (B,) long: what the model saw
    k: Tensor  # step index into ``schedule`` (differs from t when respaced), (B,) long
    eps: Tensor  # the model's unguided ε prediction
    x0: Tensor  # the unguided x̂_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t
    schedule: NoiseSchedule  # the (possibly respaced) schedule being sampled
    model: Callable[[Tensor, Tensor], Tensor]  # ε_θ(x, t), for guidances that differentiate it
    # The model's intermediate features from this step's forward (a UNet's DownFeatures), so
    # a guidance built on them does not run the network again; None for other models.
    features: Any = None
    y: Tensor | None = None  # the class labels a class-conditional model is sampled with
    # ε(x_t, labels) for a guidance that declares ``labels``, from the step's batched forward
    label_eps: Tensor | None = None


@runtime_checkable
class Guidance(Protocol):
    """Returns g ≈ ∇_{x_t} log p(c | x_t), shaped like ``inp.x_t``.

    Called inside ``torch.no_grad()``; a guidance that needs autograd (a classifier's
    gradient) opens ``torch.enable_grad()`` itself on a detached copy of x_t. An object with
    ``form = "eps"`` returns an ε-space shift instead (see the module docstring).
    """

    def __call__(self, inp: StepInput) -> Tensor: ...


@dataclass
class GuidanceTerm:
    """One guidance with its scale and an optional weight per original timestep, (T,)."""

    guidance: Guidance
    scale: float = 1.0
    weight: Tensor | None = None
    name: str = ""


def guidance_form(guidance: Any, name: str = "") -> str:
    """``"score"`` or ``"eps"``: what ``guidance`` returns (its ``form``, default score)."""
    form = getattr(guidance, "form", "score")
    if form not in FORMS:
        raise GuidekitError(f"guidance '{name}' has form {form!r}: it must be 'score' "
                            "(g ≈ ∇ log p) or 'eps' (an ε-space shift)")
    return form


def guidance_labels(guidance: Any, batch: int, name: str = "") -> Tensor | None:
    """The (B,) labels ``guidance`` wants ε evaluated at (its ``labels``), or None."""
    labels = getattr(guidance, "labels", None)
    if labels is None:
        return None
    if not isinstance(labels, Tensor) or labels.shape != (batch,) or labels.is_floating_point():
        raise GuidekitError(f"guidance '{name}' declares labels that are not a ({batch},) "
                            "integer tensor: one class label per sample")
    return labels.long()


def compose(
    terms: list[GuidanceTerm], inp: StepInput, finite: dict[str, Tensor] | None = None,
    label_eps: Sequence[Tensor | None] | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """(Σ s_i·w_i(t)·g_i over the score-form terms, the same over the ε-form terms): each
    None when no term has that form.

    Each g must be a tensor of x_t's shape, dtype and device (a one-line error naming the
    guidance otherwise). ``finite`` collects, per guidance, whether every g so far was
    finite, on the device: :func:`check_finite` reads it once after the loop, so the check
    costs no host sync per step. ``label_eps``: per term, the ε at its declared ``labels``
    (None for a term without), passed on as that term's :attr:`StepInput.label_eps`.
    """
    totals: dict[str, Tensor] = {}
    for i, term in enumerate(terms):
        form = guidance_form(term.guidance, term.name)
        extra = None if label_eps is None else label_eps[i]
        g = term.guidance(inp if extra is None else replace(inp, label_eps=extra))
        _check_output(term.name, g, inp.x_t)
        if finite is not None:
            ok = torch.isfinite(g).all()
            finite[term.name] = ok if term.name not in finite else finite[term.name] & ok
        # a Python number, not a device tensor: on CUDA that would be a copy and a stream
        # sync at every step
        scale: float | Tensor = float(term.scale)
        if term.weight is not None:
            w = term.weight.to(g.device, g.dtype)[inp.t]
            scale = term.scale * w.reshape(-1, *([1] * (g.ndim - 1)))
        totals[form] = scale * g if form not in totals else totals[form] + scale * g
    return totals.get("score"), totals.get("eps")


def _check_output(name: str, g: Any, x_t: Tensor) -> None:
    if not isinstance(g, Tensor):
        raise GuidekitError(f"guidance '{name}' returned {type(g).__name__}, not a tensor: "
                            "it must return g with x_t's shape, dtype and device")
    if g.shape != x_t.shape or g.dtype != x_t.dtype or g.device != x_t.device:
        raise GuidekitError(
            f"guidance '{name}' returned a {g.dtype} tensor of shape {tuple(g.shape)} on "
            f"{g.device}, expected x_t's {x_t.dtype} {tuple(x_t.shape)} on {x_t.device}"
        )


def count_diverged(x: Tensor) -> int:
    """How many samples of a batch hold a non-finite value (one host sync)."""
    return int((~torch.isfinite(x.flatten(1))).any(1).sum())


def check_finite(finite: dict[str, Tensor], x: Tensor) -> None:
    """A one-line error naming the first guidance whose g was ever non-finite (``x``: the
    samples it produced, to say how many diverged)."""
    for name, ok in finite.items():
        if not bool(ok):
            bad = count_diverged(x)
            diverged = f" and {bad} of {x.shape[0]} samples diverged" if bad else ""
            raise DivergedError(f"guidance '{name}' returned non-finite values (NaN or inf)"
                                f"{diverged}: check its options, or lower --scale")


def parse_timestep_spec(spec: object) -> tuple[str, float, float] | None:
    """The one reading of a guidance schedule spec (see :func:`timestep_weight`):
    None for ``constant``, else ``(kind, lo, hi)`` with an empty bound as ∓inf. A spec that
    is empty, malformed, has a bound that is not a number, or LO ≥ HI is a one-line error."""
    if not isinstance(spec, str) or not spec.strip():
        raise GuidekitError("--guidance-schedule is empty: give constant, snr:LO:HI or t:LO:HI")
    kind, *bounds = spec.strip().lower().split(":")
    if kind == "constant" and not bounds:
        return None
    if kind not in ("snr", "t") or len(bounds) != 2:
        raise GuidekitError(f"bad guidance schedule '{spec}': use 'constant', 'snr:LO:HI' or "
                            "'t:LO:HI'")
    values = []
    for bound, empty in zip(bounds, (-math.inf, math.inf), strict=True):
        try:
            v = float(bound) if bound.strip() else empty
        except ValueError:
            v = math.nan
        if math.isnan(v):
            raise GuidekitError(f"bad guidance schedule '{spec}': bound '{bound}' is not a "
                                f"number: give numbers or leave a bound empty, as in "
                                f"{kind}:LO:HI or {kind}::HI")
        values.append(v)
    lo, hi = values
    if lo >= hi:
        raise GuidekitError(f"guidance schedule '{spec}' is off at every timestep: LO must be "
                            f"below HI in {kind}:LO:HI")
    return kind, lo, hi


def timestep_weight(schedule: NoiseSchedule, spec: str) -> Tensor | None:
    """A per-timestep weight over the schedule's T original steps from a short spec.

    - ``"constant"``: no weight (always on).
    - ``"snr:LO:HI"``: on where LO ≤ SNR(t) < HI (either bound may be empty), off elsewhere;
      e.g. ``snr:0.01:1`` is the content stage of the P2 paper.
    - ``"t:LO:HI"``: on for original timesteps LO ≤ t < HI.
    """
    parsed = parse_timestep_spec(spec)
    if parsed is None:
        return None
    kind, lo, hi = parsed
    if not torch.equal(schedule.timesteps.cpu(), torch.arange(schedule.num_steps)):
        raise GuidekitError("build guidance schedules on the unrespaced training schedule")
    if kind == "snr":
        value = schedule.float64["snr"]
    else:
        value = torch.arange(schedule.num_steps, dtype=torch.float64)
    w = ((value >= lo) & (value < hi)).to(torch.float32)
    if not bool(w.any()):
        raise GuidekitError(f"guidance schedule '{spec}' is off at every timestep of this "
                            f"schedule: widen {kind}:LO:HI")
    return w.to(schedule.device)


def class_labels(
    n: int, num_classes: int, classes: Sequence[int] | None, per_row: bool = False,
    what: str = "the model",
) -> Tensor:
    """The (n,) class of every sample.

    - ``classes`` with one value: that class for all;
    - several values: cycled in order (their number must equal or divide ``n``);
    - ``per_row``: class r for the r-th block of n // num_classes consecutive samples.
    """
    classes = list(classes or ())
    if per_row and classes:
        raise GuidekitError("give --class or --class-per-row, not both")
    if per_row:
        if n % num_classes:
            raise GuidekitError(
                f"--class-per-row needs the number of samples to be a multiple of the "
                f"{num_classes} classes, got --n {n}"
            )
        return torch.arange(num_classes).repeat_interleave(n // num_classes)
    if not classes:
        raise GuidekitError("choose the class to guide toward: --class N (repeatable) or "
                            "--class-per-row")
    for c in classes:
        if not 0 <= c < num_classes:
            raise GuidekitError(f"class {c} is out of range: {what} knows classes "
                                f"0..{num_classes - 1}")
    if n % len(classes):
        raise GuidekitError(
            f"{len(classes)} classes do not divide the {n} samples: give one --class, one per "
            f"sample, or a number of classes that divides --n"
        )
    return torch.tensor(classes, dtype=torch.long).repeat(n // len(classes))
