"""Sampling a trained DPM with any mix of registered guidances: the Python API behind
``guidekit sample``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from guidekit.ddpm import DPM
from guidekit.errors import GuidekitError
from guidekit.guidance import GuidanceTerm, timestep_weight
from guidekit.options import parse_plugin_options
from guidekit.plugins import get_registry
from guidekit.specs import GuidanceContext

SAMPLERS = ("ddim", "ddpm")


@dataclass
class GuidanceRequest:
    """One ``--guidance NAME`` with its scale, timestep schedule and plugin options."""

    name: str
    scale: float = 1.0
    schedule: str = "constant"
    options: dict[str, Any] = field(default_factory=dict)


def requests_from_cli(
    names: Sequence[str], scales: Sequence[float], schedules: Sequence[str], args: Sequence[str]
) -> list[GuidanceRequest]:
    """Pair repeated --guidance/--scale/--guidance-schedule flags and parse plugin options.

    One --scale (or schedule) applies to every guidance; otherwise give one per guidance.
    """
    names = list(names)
    if not names:
        if scales or schedules:
            raise GuidekitError("--scale/--guidance-schedule need a --guidance NAME")
        if args:
            raise GuidekitError(f"unexpected argument(s): {' '.join(args)}")
        return []
    scales = _per_guidance(list(scales) or [1.0], len(names), "--scale")
    schedules = _per_guidance(list(schedules) or ["constant"], len(names), "--guidance-schedule")
    registry = get_registry()
    specs = [registry.guidance(n) for n in names]
    options = parse_plugin_options([(f"guidance '{s.name}'", s.options) for s in specs], args)
    return [
        GuidanceRequest(n, sc, sh, opt)
        for n, sc, sh, opt in zip(names, scales, schedules, options, strict=True)
    ]


def _per_guidance(values: list, n: int, flag: str) -> list:
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise GuidekitError(f"give one {flag} for all guidances or one per guidance ({n})")
    return values


def build_terms(
    dpm: DPM, requests: Sequence[GuidanceRequest], num_samples: int
) -> list[GuidanceTerm]:
    """Build each requested guidance against ``dpm`` (the plugins' ``build`` hooks)."""
    registry = get_registry()
    device = next(iter(dpm.model.parameters())).device
    terms = []
    for req in requests:
        spec = registry.guidance(req.name)
        ctx = GuidanceContext(
            model=dpm.model,
            schedule=dpm.schedule,
            dpm_config=dpm.config,
            num_samples=num_samples,
            device=device,
            options=dict(req.options),
            checkpoint_dir=dpm.checkpoint.path,
        )
        terms.append(
            GuidanceTerm(
                spec.build(ctx),
                scale=req.scale,
                weight=timestep_weight(dpm.schedule, req.schedule),
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
    clip_x0: bool = True,
    variance: str = "small",
    compile: bool = False,
    progress: bool = False,
) -> Tensor:
    """Draw ``n`` images in [−1, 1] from ``dpm``, guided by ``guidance``.

    ``steps``: an int respaces to that many steps ("ddimK" spacing for DDIM, even spacing for
    DDPM), a string is any respacing spec, None keeps all T steps.
    """
    if sampler not in SAMPLERS:
        raise GuidekitError(f"unknown sampler '{sampler}': choose ddim or ddpm")
    if n < 1:
        raise GuidekitError(f"--n must be >= 1, got {n}")
    if isinstance(steps, int):
        steps = f"ddim{steps}" if sampler == "ddim" else steps
    device = next(iter(dpm.model.parameters())).device
    engine = dpm.sampler(steps=steps, variance=variance, clip_x0=clip_x0, compile=compile)
    terms = build_terms(dpm, guidance, n)
    gen = torch.Generator(device).manual_seed(seed)
    shape = (n, *dpm.image_shape)
    if sampler == "ddim":
        x = engine.ddim(shape=shape, eta=eta, guidance=terms, generator=gen, device=device,
                        progress=progress)
    else:
        x = engine.ddpm(shape=shape, guidance=terms, generator=gen, device=device,
                        progress=progress)
    return x.clamp(-1, 1)
