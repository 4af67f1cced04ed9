"""Sampling a trained DPM with any mix of registered guidances: the Python API behind
``guidekit sample``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

from guidekit.ddpm import DPM
from guidekit.engine import respacing
from guidekit.errors import DivergedError, GuidekitError
from guidekit.guidance import (
    GuidanceTerm,
    class_labels,
    count_diverged,
    parse_timestep_spec,
    timestep_weight,
)
from guidekit.lookup import guidance_spec, plugin_call
from guidekit.memory import check_fits
from guidekit.options import check_seed, resolve_options
from guidekit.specs import GuidanceContext

__all__ = [
    "GuidanceRequest",
    "WORKING_COPIES",
    "build_terms",
    "check_request",
    "dpm_classes",
    "sample",
]

# Batch-sized tensors a sampling step holds at once (x_t, ε, x̂_0, the noise, g, x_{t-1},
# and slack for the model's own): the --n memory bound counts n images this many times.
WORKING_COPIES = 8


@dataclass
class GuidanceRequest:
    """One ``--guidance NAME`` with its scale, timestep schedule and plugin options (by
    option name; the ones left out take their declared defaults)."""

    name: str
    scale: float = 1.0
    schedule: str = "constant"
    options: dict[str, Any] = field(default_factory=dict)


def _finite(value: object, flag: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise GuidekitError(f"{flag} must be a finite number, got {value!r}: give one like "
                            "1.0")
    return float(value)


def check_request(req: GuidanceRequest) -> None:
    """A one-line error unless ``req`` has a name, a finite scale and a well-formed schedule
    spec (whether the schedule is on at some timestep is checked by ``timestep_weight``)."""
    if not isinstance(req.name, str) or not req.name.strip():
        raise GuidekitError("--guidance is empty: give a guidance name (`guidekit plugins` "
                            "lists them)")
    _finite(req.scale, f"--scale of guidance '{req.name}'")
    try:
        parse_timestep_spec(req.schedule)
    except GuidekitError as exc:
        raise GuidekitError(f"guidance '{req.name}': {exc}") from None


def dpm_classes(
    dpm: DPM, n: int, classes: Sequence[int] = (), per_row: bool = False
) -> Tensor | None:
    """The labels a class-conditional ``dpm`` is sampled with, from ``--class`` /
    ``--class-per-row``; None for an unconditional one."""
    num_classes = getattr(getattr(dpm.model, "config", None), "num_classes", None)
    if num_classes is None:
        return None
    if not classes and not per_row:
        raise GuidekitError(f"this DPM is class-conditional ({num_classes} classes): give "
                            "--class N (repeat to cycle) or --class-per-row")
    return class_labels(n, num_classes, classes, per_row, "this class-conditional DPM")


def _base_labels(dpm: DPM, terms: Sequence[GuidanceTerm], y: Tensor | None) -> Tensor | None:
    """The labels of the step's own ε: the null class ∅ when a guidance asks for an
    unconditional base (classifier-free guidance), else ``y``."""
    asking = [t.name for t in terms if getattr(t.guidance, "unconditional_base", False)]
    if not asking:
        return y
    null = getattr(dpm.model, "null_label", None)
    if y is None or null is None:
        raise GuidekitError(f"guidance '{asking[0]}' samples from the DPM's null class, which "
                            "this DPM lacks: train one with `guidekit train ddpm --class-cond "
                            "--cond-drop 0.1`")
    return torch.full_like(y, null)


def build_terms(
    dpm: DPM, requests: Sequence[GuidanceRequest], num_samples: int,
    classes: Sequence[int] = (), class_per_row: bool = False,
) -> list[GuidanceTerm]:
    """Build each requested guidance against ``dpm`` (the plugins' ``build`` hooks);
    ``classes`` / ``class_per_row``: the class of every sample, for guidances that steer
    toward one."""
    device = next(iter(dpm.model.parameters())).device
    terms = []
    for req in requests:
        check_request(req)
        # the schedule first: a typo in it should not wait for a classifier to load
        weight = timestep_weight(dpm.schedule, req.schedule)
        spec = guidance_spec(req.name)
        ctx = GuidanceContext(
            model=dpm.model,
            schedule=dpm.schedule,
            dpm_config=dpm.config,
            num_samples=num_samples,
            device=device,
            options=resolve_options(spec.options, req.options, f"guidance '{req.name}'"),
            checkpoint_dir=dpm.checkpoint.path,
            classes=tuple(classes),
            class_per_row=class_per_row,
        )
        built = plugin_call("guidance", req.name, spec.build, ctx)
        if not callable(built):
            raise GuidekitError(f"guidance '{req.name}': build returned "
                                f"{type(built).__name__}, not a callable guidance")
        terms.append(
            GuidanceTerm(
                built,
                scale=float(req.scale),
                weight=weight,
                name=req.name,
            )
        )
    return terms


def sample(
    dpm: DPM,
    n: int,
    *,
    sampler: str = "ddim",
    steps: int | str | None = 50,
    eta: float = 0.0,
    guidance: Sequence[GuidanceRequest] = (),
    seed: int = 0,
    clip_x0: bool | None = None,
    clip_order: str = "clip-then-guide",
    variance: str | None = None,
    spacing: str | None = None,
    classes: Sequence[int] = (),
    class_per_row: bool = False,
    compile: bool = False,
    progress: bool = False,
) -> Tensor:
    """Draw ``n`` images in [−1, 1] from ``dpm``, guided by ``guidance``.

    ``steps``: an int respaces to that many steps, laid out by ``spacing`` (``leading``,
    ``linspace`` or ``trailing``); a string is any respacing spec, None keeps all T steps.
    ``clip_x0``, ``variance`` and ``spacing`` left as None take the DPM's defaults
    (:class:`~guidekit.ddpm.SamplingDefaults`: a converted diffusers model's scheduler
    choices; else clipping on, β̃, and leading for DDIM / linspace for DDPM). ``classes`` /
    ``class_per_row``: the class of every sample (see :func:`class_labels`): it conditions a
    class-conditional DPM, and class guidances (the classifier's) steer toward it. A run that
    diverges (non-finite samples) is a one-line :class:`~guidekit.errors.GuidekitError`,
    never NaNs, and so is a bad value: ``n`` < 1 or more than memory holds
    (n·C·H·W·4 bytes × :data:`WORKING_COPIES` against the device's memory), a seed
    outside 0 ≤ seed < 2**63, a non-finite or negative ``eta``, a non-finite scale, an empty
    schedule, spacing or respacing.
    """
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise GuidekitError(f"--n must be an integer >= 1, got {n!r}")
    n = int(n)
    seed = check_seed(seed)
    eta = _finite(eta, "--eta")
    if eta < 0:
        raise GuidekitError(f"--eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), "
                            f"got {eta}")
    if isinstance(steps, str) and not steps.strip():
        raise GuidekitError("--respacing is empty: give a spec like ddim25 or 10,5, or "
                            "leave it out")
    if spacing is not None and (not isinstance(spacing, str) or not spacing.strip()):
        raise GuidekitError("--spacing is empty: give leading, linspace or trailing, or "
                            "leave it out")
    device = next(iter(dpm.model.parameters())).device
    check_fits(n * math.prod(dpm.image_shape) * 4 * WORKING_COPIES, device,
               f"sampling --n {n} images of {'x'.join(map(str, dpm.image_shape))}",
               "lower --n (sample in several runs with different --seed)")
    engine = dpm.sampler(steps=respacing(sampler, steps, spacing or dpm.defaults.spacing),
                         variance=variance, clip_x0=clip_x0, clip_order=clip_order,
                         compile=compile)
    classes = tuple(classes or ())
    y = dpm_classes(dpm, n, classes, class_per_row)
    if y is None and not guidance and (classes or class_per_row):
        raise GuidekitError("this DPM is unconditional and no --guidance steers toward "
                            "--class: add --guidance classifier --classifier PATH, or drop "
                            "--class")
    terms = build_terms(dpm, guidance, n, classes, class_per_row)
    y = _base_labels(dpm, terms, y)
    gen = torch.Generator(device).manual_seed(seed)
    try:
        x = engine.sample(sampler, shape=(n, *dpm.image_shape), eta=eta, guidance=terms,
                          generator=gen, device=device, progress=progress,
                          y=None if y is None else y.to(device))
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        # the bound above counts the images, not the network's activations on them
        oom = isinstance(exc, torch.OutOfMemoryError) or any(
            m in str(exc) for m in ("can't allocate memory", "out of memory"))
        if not oom:
            raise
        raise GuidekitError(f"out of memory sampling --n {n} on {device}: lower --n "
                            "(sample in several runs with different --seed)") from None
    bad = count_diverged(x)
    if bad:
        raise DivergedError(f"{bad} of {n} samples diverged (non-finite values): lower "
                            "--scale, or sample with --sampler ddim")
    return x.clamp(-1, 1)
