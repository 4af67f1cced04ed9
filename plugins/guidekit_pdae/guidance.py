"""The ``pdae`` guidance: g from the learned gradient estimator G_ψ(x_t, z, t).

G_ψ is trained as the DDPM mean shift β̃_t·G. The ε it implies is
ε̂ = ε_θ − √α_t (1−ᾱ_{t−1})/√(1−ᾱ_t) · G, so the score it estimates is
∇_{x_t} log p(z | x_t) = r_t · G with r_t = √α_t (1−ᾱ_{t−1}) / (1−ᾱ_t) (original t).
Returning r_t·G keeps the engine's convention (g is a score): DDIM then reproduces the trained
ε̂ exactly, and DDPM shifts the mean by Σ·r_t·G (r_t > 0.98 for t ≥ 100 on the linear schedule).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from guidekit import GuidanceContext, GuidekitError, Option, StepInput, ops
from guidekit.checkpoint import atomic_save_tensors, read_checkpoint

from .training import KIND, LoadedPDAE, fingerprint, load_pdae

LATENT_KEY = "z"


def shift_coef(pdae: LoadedPDAE) -> Tensor:
    """c_t = √α_t (1−ᾱ_{t−1}) / √(1−ᾱ_t) for every original timestep, (T,): PDAE trains
    ε̂ = ε_θ − c_t·G (``ops.guided_eps``), so c_t·G is its ε-space shift."""
    f = pdae.dpm.schedule.float64
    c = f["alphas"].sqrt() * (1 - f["alphas_cumprod_prev"]) / (1 - f["alphas_cumprod"]).sqrt()
    return c.to(torch.float32)


class PDAEGuidance:
    """The ε-space shift d = c_t · Σ_i w_i G_ψ(x_t, z_i, t), so every sampler steps with the
    ε̂ = ε_θ − d that PDAE was trained on: one latent per sample, or a blend of several
    (``weights`` (B, L) over ``latents`` L × (B, D)), as ``pdae interpolate --mode shift``
    needs."""

    form = "eps"

    def __init__(
        self, pdae: LoadedPDAE, latents: Tensor | list[Tensor], weights: Tensor | None = None
    ) -> None:
        self.pdae = pdae
        self.latents = [latents] if isinstance(latents, Tensor) else list(latents)
        dim = pdae.latent_dim
        for z in self.latents:
            if z.ndim != 2 or z.shape[1] != dim:
                raise GuidekitError(f"PDAE latents must be (N, {dim}), got {tuple(z.shape)}")
        self.weights = weights
        self.coef = shift_coef(pdae).to(pdae.device)

    def __call__(self, inp: StepInput) -> Tensor:
        feats = inp.features
        if feats is None:  # a model without a down path was sampled: run the frozen one
            feats = self.pdae.model.unet.down(inp.x_t, inp.t, inp.y)
        total = torch.zeros_like(inp.x_t)
        for i, z in enumerate(self.latents):
            w = 1.0 if self.weights is None else self.weights[:, i].view(
                -1, *([1] * (inp.x_t.ndim - 1)))
            total = total + w * self.pdae.model.estimator(feats, z.to(inp.x_t.dtype))
        return ops.at(self.coef, inp.t, inp.x_t) * total


def save_latents(z: Tensor, path: str | Path, pdae: LoadedPDAE) -> Path:
    """Write latents (N, D) as safetensors, tagged with the PDAE's weight fingerprint."""
    path = Path(path)
    atomic_save_tensors({LATENT_KEY: z}, path, metadata={
        "pdae_fingerprint": pdae.fingerprint, "pdae_path": str(pdae.path)})
    return path


def load_latents(path: str | Path, pdae: LoadedPDAE) -> Tensor:
    """Read latents written by ``pdae encode``; latents of another PDAE are an error."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise GuidekitError(f"no latent file at {path} (write one with `guidekit pdae encode`)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            z = f.get_tensor(LATENT_KEY)
    except Exception as exc:  # not safetensors, or no 'z' inside
        raise GuidekitError(f"{path} is not a latent file from `guidekit pdae encode` ({exc})"
                            ) from None
    if meta.get("pdae_fingerprint") != pdae.fingerprint:
        raise GuidekitError(
            f"{path} holds latents of another model (PDAE {meta.get('pdae_path', '?')}, "
            f"fingerprint {meta.get('pdae_fingerprint', 'none')}), not of {pdae.path}: "
            "re-encode the images with this PDAE"
        )
    return z.to(pdae.device)


GUIDANCE_OPTIONS: tuple[Option, ...] = (
    Option("pdae", Path, None, "PDAE checkpoint (guidekit train pdae)."),
    Option("latents", Path, None, "Latent file from `guidekit pdae encode`."),
    Option("latent_index", int, None, "Use only this latent of the file for every sample."),
)


def build_pdae_guidance(ctx: GuidanceContext) -> PDAEGuidance:
    """``--guidance pdae --pdae PATH --latents FILE``: one latent for every sample, or one
    per sample."""
    pdae_path, latents, index = (ctx.options[k] for k in ("pdae", "latents", "latent_index"))
    if pdae_path is None:
        raise GuidekitError("--guidance pdae needs --pdae PDAE_CHECKPOINT")
    if latents is None:
        raise GuidekitError("--guidance pdae needs --latents FILE (from `guidekit pdae encode`)")
    trained_on = read_checkpoint(pdae_path, KIND).section("pretrained")
    if fingerprint(ctx.model) != trained_on.get("fingerprint"):
        raise GuidekitError(f"the PDAE at {pdae_path} was trained on another DPM "
                            f"({str(trained_on.get('path'))[:200]}) than the one sampled: "
                            "sample that one")
    pdae = load_pdae(pdae_path, ctx.checkpoint_dir, device=ctx.device)
    z = load_latents(latents, pdae)
    if index is not None:
        if not 0 <= index < len(z):
            raise GuidekitError(f"--latent-index {index} is out of range: the file holds "
                                f"{len(z)} latents")
        z = z[index : index + 1]
    if len(z) == 1:
        z = z.expand(ctx.num_samples, -1)
    elif len(z) != ctx.num_samples:
        raise GuidekitError(f"{latents} holds {len(z)} latents for {ctx.num_samples} "
                            "samples: use --n equal to that, or --latent-index I")
    return PDAEGuidance(pdae, z)
