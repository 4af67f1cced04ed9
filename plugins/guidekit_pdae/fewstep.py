"""Few-step generation: does filling the posterior mean gap help most at few DDIM steps?

The PDAE paper (FFHQ128 FID at 10/20/50/100 steps) reports plain DDIM 31.87 / 20.53 /
15.82 / 11.95 against PDAE 20.16 / 17.18 / 12.81 / 10.31: the learned shift matters most
when the steps are few. ``guidekit pdae fewstep`` repeats the comparison: for each step count
K, DDIM-K of the pre-trained DPM alone and DDIM-K with PDAE's shift toward latents z drawn
by the latent DPM, from the same x_T; both scored against held-out images by the Fréchet
distance (and precision / recall, density / coverage) in a judge's feature space.

The latents z are drawn once (``latent_steps`` DDIM steps of the latent DPM, seed) and reused
at every K, as is x_T (seed + 1, as ``pdae sample`` draws it): between rows only K changes,
and between the two columns only the shift.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import track
from torch import Tensor

from guidekit import GuidekitError, save_image_grid
from guidekit.plots import pyplot, save_figure
from guidekit.trainer_options import parse_ints

from .autoencoding import GRID_SCALE, ddim_sampler, decode
from .latent import LoadedLatentDPM, check_pairing, decode_latents, sample_latents
from .training import LoadedPDAE

DEFAULT_STEPS = (10, 20, 50, 100)
METHODS = ("ddim", "pdae")
DECODE_BATCH = 256  # images decoded at once: bounds the UNet's activations
GRID_IMAGES = 8  # samples per grid row


def parse_steps(text: str | None, num_steps: int) -> list[int]:
    """``"10,20,50"`` → [10, 20, 50] (sorted, unique, each in 1..T); None: 10, 20, 50, 100
    (those up to T)."""
    if text is None:
        return [k for k in DEFAULT_STEPS if k <= num_steps] or [num_steps]
    steps = parse_ints(text, "--steps")
    if not steps:
        raise GuidekitError(f"--steps must list at least one step count, got '{text}'")
    bad = [k for k in steps if not 1 <= k <= num_steps]
    if bad:
        raise GuidekitError(f"--steps {bad} out of range: the DPM has T = {num_steps} "
                            f"training steps, use 1..{num_steps}")
    return sorted(set(steps))


def _decode_batches(pdae: LoadedPDAE, method: str, steps: int, z: Tensor, x_T: Tensor,
                    judge: Any) -> tuple[Tensor, Tensor]:
    """(judge features of every sample, the first :data:`GRID_IMAGES` samples) of DDIM-``steps``
    from ``x_T``: plain (x̂_0 clipped, as ``pdae sample``) or with PDAE's shift toward ``z``.
    Decoded a batch at a time, so only the features of all n are held."""
    from guidekit_classifier.quality import judge_features

    sampler = ddim_sampler(pdae, steps, clip=True) if method == "ddim" else None
    feats, kept = [], []
    for zb, xb in zip(z.split(DECODE_BATCH), x_T.split(DECODE_BATCH), strict=True):
        if sampler is not None:
            x = decode(sampler, xb, [])
        else:
            x = decode_latents(pdae, zb, steps=steps, x_T=xb)
        feats.append(judge_features(judge, x))
        if sum(map(len, kept)) < GRID_IMAGES:
            kept.append(x[:GRID_IMAGES].cpu())
    return torch.cat(feats), torch.cat(kept)[:GRID_IMAGES]


def fewstep_generation(
    pdae: LoadedPDAE,
    latent: LoadedLatentDPM,
    judge: Any,
    real_x: Tensor,
    *,
    steps: Sequence[int] = DEFAULT_STEPS,
    n: int = 500,
    latent_steps: int = 100,
    seed: int = 0,
    k: int = 5,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate ``n`` images at each DDIM step count in ``steps``, plainly and with PDAE, from
    the same x_T, and score both against held-out images ``real_x`` in the judge's features:
    the figures of :func:`guidekit_classifier.quality.sample_quality` (``k`` neighbours).

    Returns ``{"n", "n_real", "latent_steps", "seed", "k", "rows": [{"steps", "ddim": {"fd",
    "precision", "recall", "density", "coverage"}, "pdae": {...}, "fd_ratio", "ddim_seconds",
    "pdae_seconds"}], "latent_seconds"}`` (``fd_ratio`` = PDAE FD / DDIM FD; seconds of the
    decoding) and, not JSON, ``"images"``: K → (DDIM samples, PDAE samples), the first 8.
    """
    from guidekit_classifier.quality import (  # the classifier plugin's metrics
        check_judge_shape,
        feature_quality,
        judge_features,
    )

    check_pairing(latent.dpm.checkpoint, pdae)
    pdae.require_unconditional("pdae fewstep")
    check_judge_shape(judge, pdae.dpm.image_shape)
    steps = parse_steps(",".join(map(str, steps)), pdae.dpm.schedule.num_steps)
    if isinstance(n, bool) or not isinstance(n, int) or n <= k:
        raise GuidekitError(f"--n must be an integer above --k ({k}), got {n!r}: precision "
                            "and recall need more samples than neighbours")
    if len(real_x) <= k:
        raise GuidekitError(f"{len(real_x)} held-out images are too few for --k {k}: use a "
                            "larger test split")
    real = judge_features(judge, real_x)
    t0 = time.perf_counter()
    z = sample_latents(latent, n, steps=latent_steps, seed=seed)
    latent_seconds = time.perf_counter() - t0
    gen = torch.Generator(pdae.device).manual_seed(seed + 1)  # as pdae sample draws x_T
    x_T = torch.randn((n, *pdae.dpm.image_shape), generator=gen, device=pdae.device)
    rows: dict[int, dict[str, Any]] = {s: {"steps": s} for s in steps}
    images: dict[int, dict[str, Tensor]] = {s: {} for s in steps}
    jobs = [(s, m) for s in steps for m in METHODS]
    for s, m in track(jobs, "few-step generation", disable=not progress):
        t = time.perf_counter()
        fake, images[s][m] = _decode_batches(pdae, m, s, z, x_T, judge)
        rows[s][f"{m}_seconds"] = round(time.perf_counter() - t, 2)
        rows[s][m] = feature_quality(real, fake, k)
    table = []
    for s, r in rows.items():
        ddim_fd = r["ddim"]["fd"]
        table.append({"steps": s, "ddim": r["ddim"], "pdae": r["pdae"],
                      "fd_ratio": r["pdae"]["fd"] / ddim_fd if ddim_fd > 0 else float("nan"),
                      "ddim_seconds": r["ddim_seconds"], "pdae_seconds": r["pdae_seconds"]})
    return {"n": n, "n_real": len(real_x), "latent_steps": latent_steps, "seed": seed,
            "k": k, "rows": table,
            "latent_seconds": round(latent_seconds, 2),
            "images": {s: (images[s]["ddim"], images[s]["pdae"]) for s in steps}}


def fewstep_table(result: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """The result as a titled table of formatted rows (``StepReport.tables``)."""
    title = (f"Few-step generation: {result['n']} samples per row vs {result['n_real']} "
             f"held-out images, judge features (FD ↓, precision / recall ↑); z by "
             f"DDIM-{result['latent_steps']} of the latent DPM")
    table = []
    for r in result["rows"]:
        d, p = r["ddim"], r["pdae"]
        table.append({
            "DDIM steps": str(r["steps"]),
            "DDIM FD": f"{d['fd']:.3f}", "PDAE FD": f"{p['fd']:.3f}",
            "PDAE / DDIM": f"{r['fd_ratio']:.3f}",
            "DDIM P / R": f"{d['precision']:.2f} / {d['recall']:.2f}",
            "PDAE P / R": f"{p['precision']:.2f} / {p['recall']:.2f}",
        })
    return {title: table}


def plot_fewstep(result: dict[str, Any], path: str | Path) -> Path:
    """FD against the DDIM step count, one line per method, log x axis."""
    plt = pyplot()

    steps = [r["steps"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [r["ddim"]["fd"] for r in result["rows"]], "o-",
            label="DDIM (pre-trained DPM alone)")
    ax.plot(steps, [r["pdae"]["fd"] for r in result["rows"]], "s-",
            label="PDAE (latent DPM z, DDIM + G_ψ shift)")
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.minorticks_off()
    ax.set(xlabel="DDIM steps", ylabel="FD (judge features)",
           title=f"Few-step generation, {result['n']} samples vs {result['n_real']} held-out")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def fewstep_grid(result: dict[str, Any], path: str | Path) -> Path:
    """Two rows per step count, labelled DDIM-K and PDAE-K; each column one x_T."""
    blocks, labels = [], []
    for s, (ddim, pdae) in result["images"].items():
        blocks += [ddim, pdae]
        labels += [f"DDIM-{s}", f"PDAE-{s}"]
    cols = len(blocks[0])
    return save_image_grid(torch.cat(blocks), path, nrow=cols, scale=GRID_SCALE,
                           row_labels=labels, title="Same x_T in each column")
