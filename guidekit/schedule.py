"""Noise schedules, their derived tables, and respacing.

Tables are computed in float64 (the products over 1000 steps lose precision in float32) and
stored as float32 tensors that move to the sampling device once, so a step only gathers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from guidekit.config import ConfigMixin
from guidekit.errors import GuidekitError

__all__ = [
    "SPACINGS",
    "NoiseSchedule",
    "ScheduleConfig",
    "make_betas",
    "space_timesteps",
    "spacing_spec",
]


_KINDS = ("linear", "cosine", "given")
# diffusers' names for where K of the T steps go: "leading" is guidekit's "ddimK" (0, s, 2s,
# ... with s = T // K), "linspace" its even spacing "K", "trailing" counts back from T − 1.
SPACINGS = ("leading", "linspace", "trailing")
MAX_TIMESTEPS = 100_000  # far beyond any published schedule (1000–4000)


@dataclass(frozen=True)
class ScheduleConfig(ConfigMixin):
    """How β_t is laid out over the T training steps: ``linear`` (DDPM, scaled so any T spans
    the range of T = 1000), ``cosine`` (improved DDPM), or ``given`` (``betas`` as listed: a
    converted diffusers model's, taken exactly as its scheduler computes them)."""

    kind: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4  # linear only
    beta_end: float = 0.02  # linear only
    betas: tuple[float, ...] = ()  # given only

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            choices = ", ".join(_KINDS)
            raise GuidekitError(f"unknown schedule '{self.kind}': choose one of {choices}")
        if isinstance(self.num_timesteps, bool) or not isinstance(self.num_timesteps, int) or (
                not 1 <= self.num_timesteps <= MAX_TIMESTEPS):
            raise GuidekitError(f"num_timesteps (--timesteps) must be an integer in "
                                f"1..{MAX_TIMESTEPS}, got {self.num_timesteps!r}")
        if not 0 < self.beta_start <= self.beta_end < 1:  # also refuses NaN
            raise GuidekitError(f"the schedule needs 0 < beta_start <= beta_end < 1, got "
                                f"{self.beta_start!r} and {self.beta_end!r}")
        if not isinstance(self.betas, (list, tuple)) or not all(
                isinstance(b, float) or isinstance(b, int) and not isinstance(b, bool)
                and abs(b) < 2 for b in self.betas):
            raise GuidekitError("schedule betas must be a list of numbers in (0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if (self.kind == "given") != bool(self.betas):
            raise GuidekitError("a 'given' schedule lists its betas, and only it does")
        if self.betas and len(self.betas) != self.num_timesteps:
            raise GuidekitError(f"the schedule lists {len(self.betas)} betas for "
                                f"num_timesteps={self.num_timesteps}")
        if self.betas and not all(0 < b < 1 for b in self.betas):
            raise GuidekitError("schedule betas must lie in (0, 1); a zero-terminal-SNR "
                                "schedule (β_T = 1) is not supported")


def make_betas(config: ScheduleConfig) -> torch.Tensor:
    """β_1..β_T in float64: linear (DDPM), cosine (improved DDPM, β capped at 0.999) or the
    given list."""
    T = config.num_timesteps
    if config.kind == "given":
        return torch.tensor(config.betas, dtype=torch.float64)
    if config.kind == "linear":
        # Scaled so that any T spans the same noise range as T=1000 (as in improved DDPM).
        scale = 1000 / T
        return torch.linspace(
            scale * config.beta_start, scale * config.beta_end, T, dtype=torch.float64
        ).clamp(max=0.999)

    def abar(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    u = torch.arange(T + 1, dtype=torch.float64) / T
    return (1 - abar(u[1:]) / abar(u[:-1])).clamp(max=0.999)


class NoiseSchedule:
    """All per-step coefficients of the forward process and the reverse posterior.

    Index k runs over the (possibly respaced) steps; ``timesteps[k]`` is the original training
    timestep that the model and every guidance see. For an unrespaced schedule they coincide.
    """

    def __init__(
        self,
        betas: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        config: ScheduleConfig | None = None,
    ) -> None:
        b = betas.to(torch.float64)
        if b.ndim != 1 or len(b) == 0 or bool((b <= 0).any()) or bool((b >= 1).any()):
            raise GuidekitError("betas must be a non-empty 1-D tensor with values in (0, 1)")
        self.config = config
        self.num_steps = len(b)
        self.timesteps = (
            torch.arange(len(b)) if timesteps is None else timesteps.to(torch.long).clone()
        )
        a = 1 - b
        ab = torch.cumprod(a, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=b.dtype), ab[:-1]])
        ab_next = torch.cat([ab[1:], torch.zeros(1, dtype=b.dtype)])
        post_var = b * (1 - ab_prev) / (1 - ab)
        # β̃ at the first step is 0; log of it is clipped to the next value (as in improved DDPM).
        post_var_clipped = torch.cat([post_var[1:2], post_var[1:]]) if len(b) > 1 else b
        large = torch.cat([post_var[1:2], b[1:]]) if len(b) > 1 else b
        tables = {
            "betas": b,
            "alphas": a,
            "alphas_cumprod": ab,
            "alphas_cumprod_prev": ab_prev,
            "alphas_cumprod_next": ab_next,
            "sqrt_alphas_cumprod": ab.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - ab).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / ab).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / ab - 1).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_var_clipped.log(),
            # "large" variance: β_t, with β̃ at the first step so x_0 is not over-noised.
            "large_log_variance": large.log(),
            "posterior_mean_coef1": b * ab_prev.sqrt() / (1 - ab),
            "posterior_mean_coef2": a.sqrt() * (1 - ab_prev) / (1 - ab),
            "snr": ab / (1 - ab),
        }
        self.float64 = tables
        self._tables = {k: v.to(torch.float32) for k, v in tables.items()}

    def __getattr__(self, name: str) -> torch.Tensor:
        tables = self.__dict__.get("_tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(name)

    @property
    def tables(self) -> dict[str, torch.Tensor]:
        """The per-timestep tables (ᾱ_t, β_t, posterior coefficients, ...) by name."""
        return self._tables

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> NoiseSchedule:
        """The schedule a :class:`ScheduleConfig` describes."""
        return cls(make_betas(config), config=config)

    @property
    def device(self) -> torch.device:
        """Where the tables live."""
        return self._tables["betas"].device

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Move the float32 tables to ``device`` (in place; returns self)."""
        self._tables = {k: v.to(device) for k, v in self._tables.items()}
        self.timesteps = self.timesteps.to(device)
        return self

    def respace(self, steps: str | int | Sequence[int]) -> NoiseSchedule:
        """A schedule over a subset of the steps: ᾱ'_k = ᾱ_{s_k}, β'_k = 1 − ᾱ'_k/ᾱ'_{k−1}."""
        if self.num_steps != len(self.timesteps) or not torch.equal(
            self.timesteps.cpu(), torch.arange(self.num_steps)
        ):
            raise GuidekitError("respace the original schedule, not an already respaced one")
        keep = space_timesteps(self.num_steps, steps)
        ab = self.float64["alphas_cumprod"][keep]
        ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
        new = NoiseSchedule(1 - ab / ab_prev, timesteps=torch.tensor(keep), config=self.config)
        return new.to(self.device)


def space_timesteps(num_timesteps: int, spec: str | int | Sequence[int]) -> list[int]:
    """Which original steps a respaced schedule keeps, sorted.

    - ``"ddimK"``: K steps with an integer stride, as in DDIM (0, s, 2s, ...); diffusers'
      ``"leading"`` spacing.
    - ``K`` or ``"K"``: K steps spread evenly over [0, T-1], ending at T-1, rounded as
      numpy rounds ``linspace`` (diffusers' ``"linspace"`` spacing).
    - ``"trailingK"``: diffusers' ``"trailing"`` spacing, round(T, T − T/K, ...) − 1.
    - ``"a,b,c"``: split the T steps into sections and take a, b, c evenly spaced steps from
      each (guided-diffusion's convention).
    - a list of ints: exactly those steps.
    """
    T = num_timesteps
    if isinstance(spec, str):
        s = spec.strip().lower()
        m = re.fullmatch(r"ddim(\d+)", s)
        if m:
            k = int(m.group(1))
            if not 1 <= k <= T:
                raise GuidekitError(f"cannot take {k} DDIM steps out of {T}: choose 1..{T}")
            stride = T // k
            return list(range(0, stride * k, stride))
        m = re.fullmatch(r"trailing(\d+)", s)
        if m:
            k = int(m.group(1))
            if not 1 <= k <= T:
                raise GuidekitError(f"cannot take {k} trailing steps out of {T}: choose 1..{T}")
            # diffusers' own expression, kept to its first K values: np.arange(T, 0, −T/K)
            # can round up to K + 1 values, the last of them −1.
            steps = np.round(np.arange(T, 0, -T / k)[:k]).astype(np.int64) - 1
            return sorted(set(int(v) for v in steps))
        try:
            parts = [int(p) for p in s.split(",")]
        except ValueError:
            raise GuidekitError(
                f"bad step spec '{spec}': use 'ddimK', 'trailingK', a count like '50', or "
                "section counts like '10,20'"
            ) from None
        if len(parts) == 1:
            return _even(T, parts[0])
        return _sections(T, parts)
    if isinstance(spec, int):
        return _even(T, spec)
    steps = sorted(set(int(s) for s in spec))
    if not steps or steps[0] < 0 or steps[-1] >= T:
        raise GuidekitError(f"explicit timesteps must be within 0..{T - 1}")
    return steps


def _even(T: int, k: int) -> list[int]:
    if not 1 <= k <= T:
        raise GuidekitError(f"cannot take {k} steps out of {T}: choose 1..{T}")
    if k == 1:
        return [T - 1]  # one step starts from noise, at T − 1 (diffusers' linspace takes 0)
    # numpy's linspace and round-half-to-even, as diffusers computes its "linspace" steps.
    return sorted(set(int(v) for v in np.linspace(0, T - 1, k).round()))


def spacing_spec(spacing: str, k: int) -> str:
    """The respacing spec of K steps laid out as diffusers' ``spacing`` names it."""
    if spacing not in SPACINGS:
        raise GuidekitError(f"unknown spacing '{spacing}': choose one of {', '.join(SPACINGS)}")
    return {"leading": f"ddim{k}", "linspace": str(k), "trailing": f"trailing{k}"}[spacing]


def _sections(T: int, counts: list[int]) -> list[int]:
    size, extra = divmod(T, len(counts))
    out: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        n = size + (1 if i < extra else 0)
        if not 1 <= count <= n:
            raise GuidekitError(f"section {i} has {n} steps; cannot take {count} of them")
        stride = (n - 1) / (count - 1) if count > 1 else 1
        out += [start + round(stride * j) for j in range(count)]
        start += n
    return out
