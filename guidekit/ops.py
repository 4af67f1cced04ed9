"""The per-step math of DDPM and DDIM, with guidance folded in as a mean shift.

Every function here is pure tensor code over precomputed schedule tables (see
``NoiseSchedule.tables``) indexed by a step-index tensor ``k`` of shape (B,): no Python
branching on tensor values and no host syncs, so each compiles with
``torch.compile(fullgraph=True)``. Python-level flags (``clip``, ``eta``, ``variance``) are
static and select the graph.

Sign convention: ``g ≈ ∇_{x_t} log p(c | x_t)`` already multiplied by its scale(s).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

Tables = dict[str, Tensor]


def at(table: Tensor, k: Tensor, like: Tensor) -> Tensor:
    """``table[k]`` shaped to broadcast against ``like`` (B, ...)."""
    v = table[k]
    return rearrange(v, "b -> b" + " 1" * (like.ndim - 1))


def q_sample(tab: Tables, x0: Tensor, k: Tensor, noise: Tensor) -> Tensor:
    """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε."""
    return at(tab["sqrt_alphas_cumprod"], k, x0) * x0 + at(
        tab["sqrt_one_minus_alphas_cumprod"], k, x0
    ) * noise


def predict_x0(tab: Tables, x_t: Tensor, k: Tensor, eps: Tensor) -> Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t."""
    return at(tab["sqrt_recip_alphas_cumprod"], k, x_t) * x_t - at(
        tab["sqrt_recipm1_alphas_cumprod"], k, x_t
    ) * eps


def eps_from_x0(tab: Tables, x_t: Tensor, k: Tensor, x0: Tensor) -> Tensor:
    """The ε that maps x_t to x̂_0: (x_t − √ᾱ_t x̂_0) / √(1−ᾱ_t)."""
    return (at(tab["sqrt_recip_alphas_cumprod"], k, x_t) * x_t - x0) / at(
        tab["sqrt_recipm1_alphas_cumprod"], k, x_t
    )


def posterior_mean(tab: Tables, x0: Tensor, x_t: Tensor, k: Tensor) -> Tensor:
    """μ̃(x_t, x_0) = c1·x_0 + c2·x_t of q(x_{t−1} | x_t, x_0)."""
    return at(tab["posterior_mean_coef1"], k, x_t) * x0 + at(
        tab["posterior_mean_coef2"], k, x_t
    ) * x_t


def model_mean(tab: Tables, x_t: Tensor, k: Tensor, eps: Tensor) -> Tensor:
    """μ_θ(x_t, t) = (x_t − β_t/√(1−ᾱ_t) · ε) / √α_t (equal to μ̃(x_t, x̂_0))."""
    beta = at(tab["betas"], k, x_t)
    return (x_t - beta / at(tab["sqrt_one_minus_alphas_cumprod"], k, x_t) * eps) / at(
        tab["alphas"], k, x_t
    ).sqrt()


def variance(
    tab: Tables, k: Tensor, like: Tensor, kind: str, var_values: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(Σ_t, log Σ_t) of the reverse step: fixed ``"small"`` (β̃_t) or ``"large"`` (β_t), or
    ``"learned"`` from the model's interpolation output v ∈ [−1, 1] (improved DDPM: v=1 is
    β_t, v=−1 is β̃_t).

    Σ is what the guidance shift uses; log Σ scales the noise. They differ only for "small"
    at the first step, where β̃_0 = 0 and log β̃ is clipped to stay finite (no noise is added
    there anyway), so the shift vanishes as the posterior says.
    """
    if kind == "small":
        return at(tab["posterior_variance"], k, like), at(
            tab["posterior_log_variance_clipped"], k, like
        )
    if kind == "large":
        log_var = at(tab["large_log_variance"], k, like)
    else:
        assert var_values is not None, "learned variance needs the model's variance output"
        frac = (var_values + 1) / 2
        log_var = frac * at(tab["betas"], k, like).log() + (1 - frac) * at(
            tab["posterior_log_variance_clipped"], k, like
        )
    return log_var.exp(), log_var


def ddpm_step(
    tab: Tables,
    x_t: Tensor,
    k: Tensor,
    eps: Tensor,
    var: Tensor,
    log_var: Tensor,
    g: Tensor | None,
    noise: Tensor,
    clip: bool = False,
) -> tuple[Tensor, Tensor]:
    """One ancestral step x_t → x_{t−1} with mean shift μ = μ_θ + Σ_t·g.

    ``var, log_var`` come from :func:`variance`; ``g=None`` means unguided. Returns
    (x_{t−1}, x̂_0). No noise is added at the last step (k = 0).
    """
    x0 = predict_x0(tab, x_t, k, eps)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = posterior_mean(tab, x0, x_t, k)
    if g is not None:
        mean = mean + var * g
    last = rearrange((k == 0).to(x_t.dtype), "b -> b" + " 1" * (x_t.ndim - 1))
    return mean + (1 - last) * (0.5 * log_var).exp() * noise, x0


def ddim_step(
    tab: Tables,
    x_t: Tensor,
    k: Tensor,
    eps: Tensor,
    g: Tensor | None,
    noise: Tensor | None,
    eta: float = 0.0,
    clip: bool = False,
    clip_first: bool = True,
) -> tuple[Tensor, Tensor]:
    """One DDIM step x_t → x_{t'} in score form: ε̂ = ε − √(1−ᾱ_t)·g.

    Returns (x_{t'}, x̂_0); σ = η·√((1−ᾱ_{t'})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t'}). ``g=None`` means
    unguided and ``noise=None`` means η = 0: both skip their terms (a static choice, so the
    compiled graph does not carry them).

    With ``clip``, x̂_0 is clamped to [−1, 1] and ε re-derived from it. ``clip_first`` (the
    default, guided-diffusion's order) clamps the x̂_0 of the unguided ε, then shifts the
    re-derived ε by g and does not clamp again; otherwise the shifted ε̂'s x̂_0 is clamped.
    Unguided, the two orders are the same step.
    """
    s1m = at(tab["sqrt_one_minus_alphas_cumprod"], k, x_t)
    if clip and clip_first and g is not None:
        eps = eps_from_x0(tab, x_t, k, predict_x0(tab, x_t, k, eps).clamp(-1, 1))
        eps_hat = eps - s1m * g
        x0 = predict_x0(tab, x_t, k, eps_hat)
    else:
        eps_hat = eps if g is None else eps - s1m * g
        x0 = predict_x0(tab, x_t, k, eps_hat)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps_hat = eps_from_x0(tab, x_t, k, x0)
    return _ddim_to(tab, k, x0, eps_hat, noise, eta), x0


def _ddim_to(tab: Tables, k: Tensor, x0: Tensor, eps: Tensor, noise: Tensor | None,
             eta: float) -> Tensor:
    """x_{t'} = √ᾱ_{t'} x̂_0 + √(1−ᾱ_{t'}−σ²) ε̂ + σ z."""
    ab_prev = at(tab["alphas_cumprod_prev"], k, x0)
    if noise is None:
        return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    ab = at(tab["alphas_cumprod"], k, x0)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp(min=0).sqrt()
    direction = (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
    return ab_prev.sqrt() * x0 + direction + sigma * noise


def ddim_invert_step(
    tab: Tables, x: Tensor, k: Tensor, eps: Tensor, g: Tensor | None, clip: bool = False
) -> Tensor:
    """The deterministic DDIM update run forward: level ᾱ_{k−1} (1 before the first step) → ᾱ_k.

    ``eps`` is the model's prediction at the current state (see ``engine.Sampler.invert``).
    With ``clip``, ε is re-derived from the clamped x̂_0 before the direction term, as the
    sampler does (and guided-diffusion's and PDAE's encoders).
    """
    ab_cur = at(tab["alphas_cumprod_prev"], k, x)
    ab_next = at(tab["alphas_cumprod"], k, x)
    s1m = (1 - ab_cur).sqrt()
    eps_hat = eps if g is None else eps - s1m * g
    x0 = (x - s1m * eps_hat) / ab_cur.sqrt()
    if clip:
        x0 = x0.clamp(-1, 1)
        # At the clean start (ᾱ = 1) x̂_0 is x itself and ε is not determined by it.
        eps_hat = torch.where(s1m > 0, (x - ab_cur.sqrt() * x0) / s1m.clamp(min=1e-12),
                              eps_hat)
    return ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps_hat


def guided_eps(tab: Tables, x_t: Tensor, k: Tensor, eps: Tensor, g: Tensor) -> Tensor:
    """ε̂ of a DDPM step whose mean is shifted by β̃_t·g, written on ε:
    ε̂ = ε − √α_t (1−ᾱ_{t−1}) / √(1−ᾱ_t) · g. PDAE's loss is ‖ε − ε̂‖² at scale 1."""
    coef = (
        at(tab["alphas"], k, x_t).sqrt()
        * (1 - at(tab["alphas_cumprod_prev"], k, x_t))
        / at(tab["sqrt_one_minus_alphas_cumprod"], k, x_t)
    )
    return eps - coef * g


__all__ = [
    "at",
    "q_sample",
    "predict_x0",
    "eps_from_x0",
    "posterior_mean",
    "model_mean",
    "variance",
    "ddpm_step",
    "ddim_step",
    "ddim_invert_step",
    "guided_eps",
]
