"""The variational bound's per-timestep terms, for training a learned Σ (improved DDPM).

L_vlb = L_0 + Σ_{t≥1} L_t with
L_t = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)) for t ≥ 1 (two Gaussians: closed form) and
L_0 = −log p_θ(x_0 | x_1), a Gaussian discretised to the 256 levels of 8-bit data in [−1, 1].
Both are reported in bits per dimension, as improved DDPM does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from guidekit import ops
from guidekit.ops import Tables

__all__ = ["discretized_gaussian_log_likelihood", "normal_kl", "vlb_terms"]

_BIN = 1.0 / 255.0  # half the width of one of 256 levels spanning [−1, 1]


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).pow(2) * torch.exp(-logvar2))


def _std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) per element for x on the 256 levels of [−1, 1], under N(mean, e^{2·log_scale})
    integrated over x's bin (the outermost bins reach to ±∞, so the levels' probabilities sum
    to one)."""
    centred = x - mean
    inv = torch.exp(-log_scale)
    cdf_hi = _std_normal_cdf(inv * (centred + _BIN))
    cdf_lo = _std_normal_cdf(inv * (centred - _BIN))
    tiny = 1e-12
    log_hi = torch.log(cdf_hi.clamp(min=tiny))  # bin (−∞, −1 + 1/255] at x = −1
    log_sf = torch.log((1.0 - cdf_lo).clamp(min=tiny))  # bin [1 − 1/255, ∞) at x = 1
    log_mid = torch.log((cdf_hi - cdf_lo).clamp(min=tiny))
    return torch.where(x < -0.999, log_hi, torch.where(x > 0.999, log_sf, log_mid))


def vlb_terms(
    tab: Tables, x0: Tensor, x_t: Tensor, k: Tensor, eps: Tensor, var_values: Tensor
) -> Tensor:
    """L_t per sample (B,), in bits per dimension: the KL of the model's reverse step from the
    true posterior for k ≥ 1, the decoder's −log-likelihood of x_0 at k = 0.

    ``eps`` gives the model's mean μ_θ(x_t, ε) and ``var_values`` its learned Σ (the
    interpolation v ∈ [−1, 1]); hybrid training passes ε detached, so this term trains Σ only.
    """
    true_mean = ops.posterior_mean(tab, x0, x_t, k)
    true_log_var = ops.at(tab["posterior_log_variance_clipped"], k, x_t)
    mean = ops.model_mean(tab, x_t, k, eps)
    _, log_var = ops.variance(tab, k, x_t, "learned", var_values)
    kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1)
    return torch.where(k == 0, nll, kl) / math.log(2.0)
