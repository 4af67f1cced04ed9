"""Reconstruction guidance for inpainting, as in diffusion posterior sampling (DPS).

At every step the DPM's clean estimate x̂_0(x_t) should agree with the reference y on the
known pixels m. The guidance is the gradient of that (Gaussian) log-likelihood, taken through
the model by autograd::

    g = −∇_{x_t} ‖m ⊙ (x̂_0(x_t) − y)‖² / (2σ²)                   (--inpaint-norm sigma)
    g = −∇_{x_t} ‖m ⊙ (x̂_0(x_t) − y)‖² / (2σ·‖m ⊙ (x̂_0 − y)‖)     (--inpaint-norm residual)

with x̂_0 = (x_t − √(1−ᾱ_t) ε_θ(x_t, t)) / √ᾱ_t. The first is the likelihood as written; the
second is DPS's normalisation, which divides by the residual's norm (held constant in the
gradient), so the pull does not grow with the residual. It is the default because the first
diverges under DDPM's mean shift μ + s·Σ_t·g: at high noise x̂_0 is a steep function of x_t,
and every σ up to 4 overflowed on the digits DPM; DDIM only survives it because it clips x̂_0
(the README has the sweep). The engine scales g by ``--scale`` and folds it in.
"""

from __future__ import annotations

import torch
from guidekit import GuidanceContext, GuidekitError, Option, StepInput, ops
from torch import Tensor

from .inputs import MASKS, image_size_of, load_image, load_mask

NAME = "inpaint"
NORMS = ("residual", "sigma")
DEFAULT_NORM = "residual"
# Chosen by the sweep in the README (held-out digits, DDIM-50 and DDPM-100, scale 1): near
# the best judged agreement of both samplers (DDPM alone prefers 0.03 with residual).
DEFAULT_SIGMAS = {"residual": 0.01, "sigma": 0.1}
MISSING_IMAGE = ("--guidance inpaint needs --image IMG and --mask MASK "
                 "(`guidekit inpaint prepare` writes a pair)")


class InpaintGuidance:
    """g = −∇_{x_t} ‖m ⊙ (x̂_0(x_t) − y)‖² / (2σ²), or DPS's residual-normalised form.

    ``sigma`` defaults to :data:`DEFAULT_SIGMAS` of the chosen ``norm``.

    ``image`` y is (B, C, H, W) or (1, C, H, W) in [−1, 1]; ``mask`` m is (B or 1, 1 or C, H, W)
    with 1 on known pixels. Each sample's loss depends on that sample alone, so the gradient of
    the summed loss is every sample's own gradient.
    """

    def __init__(self, image: Tensor, mask: Tensor, sigma: float | None = None,
                 norm: str = DEFAULT_NORM) -> None:
        if norm not in NORMS:
            raise GuidekitError(f"unknown --inpaint-norm '{norm}': choose {' or '.join(NORMS)}")
        sigma = DEFAULT_SIGMAS[norm] if sigma is None else sigma
        if not sigma > 0:
            raise GuidekitError(f"--inpaint-sigma must be > 0, got {sigma}")
        if image.ndim != 4 or mask.ndim != 4 or image.shape[-2:] != mask.shape[-2:]:
            raise GuidekitError(f"inpainting needs image (B, C, H, W) and mask (B, 1, H, W) of "
                                f"one size, got {tuple(image.shape)} and {tuple(mask.shape)}")
        self.image, self.mask = image, mask
        self.sigma, self.norm = float(sigma), norm

    def loss(self, x0: Tensor) -> Tensor:
        """Per-sample ‖m ⊙ (x̂_0 − y)‖² / (2σ²) (or the residual form), shape (B,)."""
        r = self.mask.to(x0) * (x0 - self.image.to(x0))
        sq = r.pow(2).flatten(1).sum(1)
        if self.norm == "sigma":
            return sq / (2 * self.sigma**2)
        # DPS: the step size divides by the residual's norm, a constant of the gradient
        return sq / (2 * self.sigma * sq.detach().sqrt().clamp_min(1e-12))

    def __call__(self, inp: StepInput) -> Tensor:
        if self.image.shape[0] not in (1, inp.x_t.shape[0]):
            raise GuidekitError(f"inpainting was given {self.image.shape[0]} reference images "
                                f"for a batch of {inp.x_t.shape[0]}: give one or one each")
        # The engine samples under no_grad; this guidance differentiates through ε_θ.
        with torch.enable_grad():
            x = inp.x_t.detach().requires_grad_(True)
            eps = inp.model(x, inp.t)[:, : x.shape[1]]  # drop a learned-variance half
            # inp.k indexes the (possibly respaced) schedule; the model saw the original t
            x0 = ops.predict_x0(inp.schedule.tables, x, inp.k, eps)
            (grad,) = torch.autograd.grad(self.loss(x0).sum(), x)
        return -grad


# The ``guidekit sample`` options of ``--guidance inpaint`` (guidekit fills the defaults).
GUIDANCE_OPTIONS: tuple[Option, ...] = (
    Option("image", str, None, "The reference PNG; resized to the DPM's size and channels."),
    Option("mask", str, None, f"A PNG of the image's size, white = known, or "
           f"{', '.join(MASKS)} (the part kept)."),
    Option("inpaint_sigma", float, None, "σ: smaller pulls harder (default "
           + ", ".join(f"{v:g} with {k}" for k, v in DEFAULT_SIGMAS.items()) + ")."),
    Option("inpaint_norm", str, DEFAULT_NORM, "residual: DPS's ‖r‖²/(2σ‖r‖); sigma: the "
           "likelihood ‖r‖²/(2σ²), for DDIM only.", choices=NORMS),
)


def build_inpaint_guidance(ctx: GuidanceContext) -> InpaintGuidance:
    """``spec.build``: load --image and --mask at the DPM's size and channels."""
    image_path, mask_spec = ctx.options["image"], ctx.options["mask"]
    if not image_path or not mask_spec:
        raise GuidekitError(MISSING_IMAGE)
    data = ctx.dpm_config["data"]
    size, channels = int(data["image_size"]), int(data["channels"])
    image = load_image(image_path, channels, size)
    mask = load_mask(mask_spec, size, image_size_of(image_path))
    return InpaintGuidance(image.to(ctx.device), mask.to(ctx.device),
                           sigma=ctx.options["inpaint_sigma"], norm=ctx.options["inpaint_norm"])


__all__ = [
    "DEFAULT_NORM",
    "DEFAULT_SIGMAS",
    "GUIDANCE_OPTIONS",
    "NAME",
    "NORMS",
    "InpaintGuidance",
    "build_inpaint_guidance",
]
