"""Measure inpainting: held-out images filled guided and unguided from the same x_T.

Figures, per setting: the MSE of the known region against the reference (on the [0, 1] pixel
scale: how well the sample keeps what was given), the MSE of the filled region (how close the
fill comes to the truth, which is only one of many plausible fills), and a clean judge's
agreement with the reference's true label and with its own reading of the reference.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from guidekit import (
    DPM,
    DivergedError,
    GuidanceTerm,
    GuidekitError,
    StepReport,
    load_dataset,
    save_image_grid,
)
from guidekit.engine import respacing
from guidekit_classifier import LoadedClassifier, predict
from torch import Tensor

from .guidance import DEFAULT_NORM, DEFAULT_SIGMAS, NAME, NORMS, InpaintGuidance
from .inputs import load_mask, masked_view

METRICS = ("known_mse", "fill_mse", "label_agreement", "reference_agreement")


def region_mse(x: Tensor, y: Tensor, mask: Tensor) -> float | None:
    """Mean squared error over the pixels where ``mask`` is 1, images mapped to [0, 1]."""
    m = mask.expand_as(x)
    count = m.sum()
    if float(count) == 0:
        return None
    return float((((x - y) / 2) ** 2 * m).sum() / count)


def inpaint(
    dpm: DPM,
    image: Tensor,
    mask: Tensor,
    *,
    sigma: float | None = None,
    norm: str = DEFAULT_NORM,
    scale: float = 1.0,
    sampler: str = "ddim",
    steps: int | str | None = 50,
    seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """Fill ``image`` (N, C, H, W) in [−1, 1] outside ``mask`` (1 = known); scale 0 is the
    unguided sampler. Steps respace as ``guidekit sample`` does (``ddimK`` for DDIM, even for
    DDPM); ``None`` keeps all T steps. Every call with one seed starts from the same x_T.
    A run whose guidance goes non-finite (diverges) is a one-line GuidekitError."""
    device = next(iter(dpm.model.parameters())).device
    # Clamp the shifted x̂_0: the pull toward the reference is only bounded so under DDIM.
    engine = dpm.sampler(steps=respacing(sampler, steps, dpm.defaults.spacing), clip_x0=True,
                         clip_order="guide-then-clip")
    terms = [] if scale == 0 else [GuidanceTerm(
        InpaintGuidance(image.to(device), mask.to(device), sigma, norm), scale, name=NAME)]
    gen = torch.Generator(device).manual_seed(seed)
    x = engine.sample(sampler, shape=tuple(image.shape), guidance=terms, generator=gen,
                      device=device, progress=progress)
    return x.clamp(-1, 1).cpu()


def _scores(x: Tensor, refs: Tensor, mask: Tensor, judge: LoadedClassifier | None,
            labels: Tensor | None, ref_reading: Tensor | None) -> dict[str, Any]:
    """One row's figures; all None (and ``diverged``) when sampling overflowed to inf/NaN."""
    row: dict[str, Any] = dict.fromkeys(METRICS)
    row["diverged"] = not bool(torch.isfinite(x).all())
    if row["diverged"]:
        return row
    row["known_mse"] = region_mse(x, refs, mask)
    row["fill_mse"] = region_mse(x, refs, 1 - mask)
    if judge is not None:
        read = predict(judge, x).argmax(-1)
        if labels is not None:
            row["label_agreement"] = float((read == labels).float().mean())
        row["reference_agreement"] = float((read == ref_reading).float().mean())
    return row


def evaluate_inpainting(
    dpm: DPM,
    judge: LoadedClassifier | None = None,
    *,
    n: int = 100,
    start: int = 0,
    mask: str | Path = "left",
    sigmas: Sequence[float] | None = None,
    norm: str = DEFAULT_NORM,
    scale: float = 1.0,
    sampler: str = "ddim",
    steps: int | None = 50,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Inpaint test images ``start .. start+n−1`` of the DPM's dataset unguided and at each σ
    (default: the norm's default σ).

    Returns ``{"sampler", "steps", "n", "mask", "norm", "scale", "judge_reference_accuracy",
    "rows": [{"guidance", "sigma", "known_mse", "fill_mse", "label_agreement",
    "reference_agreement", "diverged", "seconds"}, ...]}`` (first row unguided; agreements
    are None without a judge, every figure is None where the sampler diverged) plus, not
    JSON-serialisable, ``"references"``, ``"mask_tensor"`` and ``"samples"`` (one
    (n, C, H, W) per row).
    """
    if n < 1:
        raise GuidekitError(f"--n must be >= 1, got {n}")
    if norm not in NORMS:
        raise GuidekitError(f"unknown --inpaint-norm '{norm}': choose {' or '.join(NORMS)}")
    sigmas = [DEFAULT_SIGMAS[norm]] if sigmas is None else list(sigmas)
    if not sigmas or not all(s > 0 for s in sigmas):
        raise GuidekitError(f"--inpaint-sigma must be one or more numbers > 0, got {sigmas}")
    if judge is not None and judge.image_shape != dpm.image_shape:
        shapes = ["x".join(map(str, s)) for s in (judge.image_shape, dpm.image_shape)]
        raise GuidekitError(f"the judge takes {shapes[0]} images but the DPM makes {shapes[1]}: "
                            "train a judge on the DPM's data (`guidekit train judge`)")
    data_cfg = dpm.config["data"]
    test = load_dataset(data_cfg["name"], "test", data_cfg["image_size"])
    if not 0 <= start < len(test):
        raise GuidekitError(f"--start must be in 0..{len(test) - 1}, got {start}")
    refs = test.images[start : start + n]
    labels = None if test.labels is None else test.labels[start : start + n]
    m = load_mask(mask, dpm.image_shape[-1])
    ref_reading = None if judge is None else predict(judge, refs).argmax(-1)
    rows, samples = [], []
    for sigma in [None, *sigmas]:  # None: the unguided baseline, from the same x_T
        t0 = time.perf_counter()
        try:
            x = inpaint(dpm, refs, m, sigma=sigma, norm=norm,
                        scale=0.0 if sigma is None else scale, sampler=sampler, steps=steps,
                        seed=seed, progress=progress)
        except DivergedError:
            if sigma is None:
                raise
            # Every input was checked by the unguided row; what the engine refuses now is a
            # guidance that went non-finite: this setting diverged (a row with no figures).
            x = torch.full_like(refs, float("nan"))
        rows.append({"guidance": "none" if sigma is None else NAME, "sigma": sigma,
                     **_scores(x, refs, m, judge, labels, ref_reading),
                     "seconds": round(time.perf_counter() - t0, 2)})
        samples.append(x)
    judge_acc = None
    if judge is not None and labels is not None:
        judge_acc = float((ref_reading == labels).float().mean())
    return {
        "sampler": sampler, "steps": steps, "n": len(refs), "mask": str(mask), "norm": norm,
        "scale": scale, "judge_reference_accuracy": judge_acc, "rows": rows,
        "references": refs, "mask_tensor": m, "samples": samples,
    }


def jsonable(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` without its tensors."""
    return {k: v for k, v in result.items()
            if k not in ("references", "mask_tensor", "samples")}


def comparison_grid(result: dict[str, Any], path: str | Path, show: int = 12) -> Path:
    """A PNG whose rows are: references, masked inputs (unknown = grey), unguided, and one row
    per σ; the first ``show`` images as columns."""
    refs = result["references"][:show]
    rows = [refs, masked_view(refs, result["mask_tensor"])]
    rows += [x[:show] for x in result["samples"]]
    labels = ["reference", "masked input"] + [
        "unguided" if r["sigma"] is None else f"{r['guidance']} sigma={r['sigma']:g}"
        for r in result["rows"]]
    return save_image_grid(torch.cat(rows), path, nrow=len(refs),
                           scale=max(1, 64 // refs.shape[-1]), row_labels=labels,
                           title=f"Inpainting, guidance scale {result['scale']:g}")


# short column names, so the table fits a terminal: known/filled region MSE, judge agreement
HEADERS = ("known MSE", "fill MSE", "judge=label", "judge=ref")


def evaluation_report(result: dict[str, Any], out_dir: str | Path) -> StepReport:
    """Write the comparison grid into ``out_dir`` and report ``result``: its JSON figures
    (with the grid's path) as ``metrics``, its rows as a table ('-' where a figure needs a
    judge)."""
    grid = comparison_grid(result, Path(out_dir) / f"inpaint_{result['sampler']}.png")
    summary = {**jsonable(result), "grid": str(grid)}
    title = (f"{result['sampler'].upper()}-{result['steps']}, {result['n']} test images, mask "
             f"{result['mask']}, norm {result['norm']}, scale {result['scale']:g}")
    rows = []
    for r in result["rows"]:
        cells = ["diverged" if r["diverged"] else "-" if r[k] is None else f"{r[k]:.4f}"
                 for k in METRICS]
        rows.append({"guidance": r["guidance"],
                     "σ": "-" if r["sigma"] is None else f"{r['sigma']:g}",
                     **dict(zip(HEADERS, cells, strict=True)),
                     "seconds": f"{r['seconds']:.1f}"})
    acc = summary["judge_reference_accuracy"]
    text = "" if acc is None else f"judge accuracy on the references: {acc:.4f}"
    return StepReport(f"grid (rows: reference, masked, unguided, guided per σ): {grid}",
                      images=[grid], tables={title: rows}, metrics=summary, text=text)


__all__ = [
    "HEADERS",
    "METRICS",
    "comparison_grid",
    "evaluate_inpainting",
    "evaluation_report",
    "inpaint",
    "jsonable",
    "region_mse",
]
