"""The sampling engine: DDPM ancestral sampling, DDIM, and DDIM inversion, all guided.

The loops live here; the per-step math lives in :mod:`guidekit.ops`. Guidance enters every
loop the same way: the model predicts ε, the guidance terms give their shifts, ε-form
shifts d are taken off ε first (ε̂ = ε − d), and the step op folds the score-form g in
(DDPM: μ + Σ·g; DDIM and inversion: ε̂ = ε − √(1−ᾱ_t)·g). A guidance that declares
``labels`` (classifier-free guidance) gets ε at them from the same batched forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from rich.progress import track
from torch import Tensor, nn

from guidekit import ops
from guidekit.errors import GuidekitError
from guidekit.guidance import GuidanceTerm, StepInput, check_finite, compose, guidance_labels
from guidekit.schedule import NoiseSchedule, spacing_spec

__all__ = [
    "CLIP_ORDERS",
    "SAMPLERS",
    "Sampler",
    "SplitModel",
    "VARIANCES",
    "check_sampler",
    "respacing",
]


VARIANCES = ("small", "large")
SAMPLERS = ("ddim", "ddpm")
# Guided DDIM with clipping: clamp the unguided x̂_0 and then shift (guided-diffusion's order,
# which published classifier-guided results used), or shift and then clamp.
CLIP_ORDERS = ("clip-then-guide", "guide-then-clip")


@runtime_checkable
class SplitModel(Protocol):
    """A noise predictor that runs in two halves, so guidances can reuse the first half's
    features (PDAE's G_ψ reads the UNet's down path): ``middle_up(down(x, t))`` is the
    model's output (``down(x, t, y)`` for a class-conditional one). guidekit's UNet is one;
    any model with these two methods is used so."""

    def down(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Any: ...

    def middle_up(self, features: Any) -> Tensor: ...


Steps = int | str | Sequence[int] | None


def respacing(sampler: str, steps: Steps, spacing: str | None = None) -> Steps:
    """The one step-count rule: an int K takes K steps laid out by ``spacing`` (``leading``,
    ``linspace`` or ``trailing``, diffusers' names); without one, ``"ddimK"`` (leading) for
    DDIM and even (linspace) for DDPM. A string or a list is a respacing spec as given; None
    keeps all T steps."""
    check_sampler(sampler)
    if isinstance(steps, bool):
        raise GuidekitError(f"steps must be a count or a respacing spec, got {steps!r}")
    if isinstance(steps, int):
        if steps < 1:
            raise GuidekitError(f"--steps must be >= 1, got {steps}")
        if spacing is not None:
            return spacing_spec(spacing, steps)
        return f"ddim{steps}" if sampler == "ddim" else steps
    return steps


def check_sampler(sampler: str) -> None:
    """A one-line error unless ``sampler`` is ``ddim`` or ``ddpm``."""
    if sampler not in SAMPLERS:
        raise GuidekitError(f"unknown sampler '{sampler}': choose ddim or ddpm")


class Sampler:
    """Samples from an ε-predicting model under a (possibly respaced) schedule.

    Args:
        model: ε_θ(x, t) taking original training timesteps; if it returns twice x's channels,
            the second half is the learned variance interpolation (improved DDPM) and is used.
        schedule: the training schedule (unrespaced).
        steps: respacing spec (``"ddim50"``, ``50``, ``"10,20"`` or a list); None keeps all.
        variance: fixed Σ for DDPM when the model supplies none: ``"small"`` (β̃) or ``"large"``.
        clip_x0: clamp x̂_0 to [−1, 1] inside each step.
        clip_order: with clipping and score-form guidance in DDIM, ``"clip-then-guide"``
            (guided-diffusion's order) or ``"guide-then-clip"``; see :func:`ops.ddim_step`.
        compile: compile the step ops with ``torch.compile(fullgraph=True)``.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[Tensor, Tensor], Tensor],
        schedule: NoiseSchedule,
        *,
        steps: str | int | Sequence[int] | None = None,
        variance: str = "small",
        clip_x0: bool = False,
        clip_order: str = "clip-then-guide",
        compile: bool = False,
    ) -> None:
        if variance not in VARIANCES:
            raise GuidekitError(f"unknown variance '{variance}': choose small or large")
        if clip_order not in CLIP_ORDERS:
            raise GuidekitError(f"unknown clip order '{clip_order}': choose "
                                f"{' or '.join(CLIP_ORDERS)}")
        self.clip_first = clip_order == "clip-then-guide"
        self.model = model
        self.schedule = schedule if steps is None else schedule.respace(steps)
        self.variance = variance
        self.clip = clip_x0
        step_ops = (ops.ddpm_step, ops.ddim_step, ops.ddim_invert_step)
        if compile:
            step_ops = tuple(torch.compile(f, fullgraph=True) for f in step_ops)
        self._ddpm_step, self._ddim_step, self._invert_step = step_ops

    @property
    def num_steps(self) -> int:
        """Steps of the (possibly respaced) schedule this sampler walks."""
        return self.schedule.num_steps

    def _device(self, x: Tensor) -> dict[str, Tensor]:
        if self.schedule.device != x.device:
            self.schedule.to(x.device)
        return self.schedule.tables

    def predict(
        self, x: Tensor, k: Tensor, y: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Any]:
        """ε, the variance values if the model learns Σ (else None), and the model's features.

        The model sees original timesteps, and the class labels ``y`` when given (a
        class-conditional model). A :class:`SplitModel` (the UNet) runs in its two halves so
        guidances can reuse its down-path features (PDAE does).
        """
        t = self.schedule.timesteps[k]
        extra = () if y is None else (y,)
        features = None
        if isinstance(self.model, SplitModel):
            features = self.model.down(x, t, *extra)
            out = self.model.middle_up(features)
        else:
            out = self.model(x, t, *extra)
        if out.shape[1] == 2 * x.shape[1]:
            eps, v = out.chunk(2, dim=1)
            return eps, v, features
        return out, None, features

    def _wanted(
        self, terms: Sequence[GuidanceTerm], x: Tensor, y: Tensor | None
    ) -> list[Tensor | None]:
        """Per term, the labels it wants ε at (its ``labels``, on x's device), or None."""
        wanted = [guidance_labels(t.guidance, x.shape[0], t.name) for t in terms]
        if y is None and any(w is not None for w in wanted):
            raise GuidekitError("a guidance asks for ε at class labels, but this DPM is "
                                "unconditional: use a class-conditional DPM")
        return [None if w is None else w.to(x.device) for w in wanted]

    def _eps(
        self, terms: Sequence[GuidanceTerm], wanted: list[Tensor | None], x: Tensor,
        k: Tensor, y: Tensor | None, finite: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(ε with the ε-form shifts taken off, the learned variance values or None, the
        score-form g or None). ε at every label set a guidance wants comes from the same
        forward as the step's own: one batch of (1 + m)·B samples."""
        extra = [w for w in wanted if w is not None]
        if not extra:
            eps, v, features = self.predict(x, k, y)
            label_eps = None
        else:
            m, b = 1 + len(extra), x.shape[0]
            assert y is not None  # _wanted refused an unconditional DPM
            eps_all, v, features = self.predict(torch.cat([x] * m), k.repeat(m),
                                                torch.cat([y, *extra]))
            chunks = iter(eps_all.split(b))
            eps = next(chunks)
            label_eps = [None if w is None else next(chunks) for w in wanted]
            v = None if v is None else v[:b]
            features = features.first(b) if hasattr(features, "first") else None
        eps, g = self._guide(terms, x, k, eps, features, y, finite, label_eps)
        return eps, v, g

    def _guide(
        self, terms: Sequence[GuidanceTerm], x: Tensor, k: Tensor, eps: Tensor, features: Any,
        y: Tensor | None, finite: dict[str, Tensor],
        label_eps: list[Tensor | None] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(ε with the ε-form shifts taken off, the score-form g or None): unguided, ε as it
        is and None, so the step ops skip the shift."""
        if not terms:
            return eps, None
        tab = self.schedule.tables
        inp = StepInput(
            x_t=x,
            t=self.schedule.timesteps[k],
            k=k,
            eps=eps,
            x0=ops.predict_x0(tab, x, k, eps),
            schedule=self.schedule,
            model=self.model,
            features=features,
            y=y,
        )
        g, d = compose(list(terms), inp, finite, label_eps)
        return (eps if d is None else eps - d), g

    def _start(
        self, x_T: Tensor | None, shape: Sequence[int] | None, generator, device
    ) -> Tensor:
        if x_T is not None:
            return x_T
        if shape is None:
            raise GuidekitError("give either x_T or shape")
        return torch.randn(tuple(shape), generator=generator, device=device)

    @torch.no_grad()
    def ddpm(
        self,
        x_T: Tensor | None = None,
        *,
        shape: Sequence[int] | None = None,
        guidance: Sequence[GuidanceTerm] = (),
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        progress: bool = False,
        y: Tensor | None = None,
    ) -> Tensor:
        """Ancestral sampling x_T → x_0 with Σ fixed or learned and the mean shifted by Σ·g
        (``y``: class labels of a class-conditional model)."""
        x = self._start(x_T, shape, generator, device)
        tab = self._device(x)
        finite: dict[str, Tensor] = {}
        wanted = self._wanted(guidance, x, y)
        for i in track(
            range(self.num_steps - 1, -1, -1), "DDPM sampling", disable=not progress
        ):
            k = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            eps, v, g = self._eps(guidance, wanted, x, k, y, finite)
            var, log_var = ops.variance(
                tab, k, x, "learned" if v is not None else self.variance, v
            )
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x, _ = self._ddpm_step(tab, x, k, eps, var, log_var, g, noise, self.clip)
        check_finite(finite, x)
        return x

    @torch.no_grad()
    def ddim(
        self,
        x_T: Tensor | None = None,
        *,
        shape: Sequence[int] | None = None,
        eta: float = 0.0,
        guidance: Sequence[GuidanceTerm] = (),
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        progress: bool = False,
        y: Tensor | None = None,
    ) -> Tensor:
        """DDIM sampling x_T → x_0 (η = 0 deterministic, η = 1 DDPM-like), guided in score form
        (``y``: class labels of a class-conditional model)."""
        if eta < 0:
            raise GuidekitError(f"eta must be >= 0, got {eta}")
        x = self._start(x_T, shape, generator, device)
        tab = self._device(x)
        finite: dict[str, Tensor] = {}
        wanted = self._wanted(guidance, x, y)
        for i in track(
            range(self.num_steps - 1, -1, -1), "DDIM sampling", disable=not progress
        ):
            k = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            eps, _, g = self._eps(guidance, wanted, x, k, y, finite)
            noise = (
                torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                if eta > 0
                else None
            )
            x, _ = self._ddim_step(tab, x, k, eps, g, noise, eta, self.clip, self.clip_first)
        check_finite(finite, x)
        return x

    @torch.no_grad()
    def invert(
        self,
        x0: Tensor,
        *,
        guidance: Sequence[GuidanceTerm] = (),
        progress: bool = False,
        y: Tensor | None = None,
    ) -> Tensor:
        """DDIM inversion x_0 → x_T ("inferred x_T"), the inverse of ``ddim(eta=0)``.

        Step k moves from level ᾱ_{k−1} to ᾱ_k with ε evaluated at the current state and the
        timestep of its own level (s_{k−1}; s_0 for the clean start). Guidance applies here too.
        """
        x = x0
        tab = self._device(x)
        finite: dict[str, Tensor] = {}
        wanted = self._wanted(guidance, x, y)
        for i in track(range(self.num_steps), "DDIM inversion", disable=not progress):
            k = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            k_eval = (k - 1).clamp(min=0)
            eps, _, g = self._eps(guidance, wanted, x, k_eval, y, finite)
            x = self._invert_step(tab, x, k, eps, g, self.clip)
        check_finite(finite, x)
        return x

    def sample(
        self,
        sampler: str,
        *,
        shape: Sequence[int],
        eta: float = 0.0,
        guidance: Sequence[GuidanceTerm] = (),
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        progress: bool = False,
        y: Tensor | None = None,
    ) -> Tensor:
        """The one sampler dispatch: :meth:`ddim` (with ``eta``) or :meth:`ddpm`."""
        check_sampler(sampler)
        if sampler == "ddim":
            return self.ddim(shape=shape, eta=eta, guidance=guidance, generator=generator,
                             device=device, progress=progress, y=y)
        return self.ddpm(shape=shape, guidance=guidance, generator=generator, device=device,
                         progress=progress, y=y)
