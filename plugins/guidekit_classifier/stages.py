"""What each stage of sampling does: ``guidekit eval stages`` and ``eval guidance --stages``.

- stages (the P2 paper's Figure 1): held-out x_0 is noised to x_t at a chosen SNR and
  sampled back to x_0 with DDPM several times. What survives says what the steps below that
  SNR decide: a judge's agreement with x_0's label (the content), the pixel distance to x_0
  and the spread between the draws (what is re-made).
- guidance by stage (PDAE's Figure 2): classifier guidance on in one SNR band at a time, the
  rest of sampling unguided; the judge's accuracy and confidence, diversity and FD per band.

The bands are the P2 paper's: coarse features below SNR 10⁻², content in [10⁻², 1),
imperceptible details from SNR 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from guidekit.data import save_image_grid
from guidekit.ddpm import DPM
from guidekit.engine import respacing
from guidekit.errors import GuidekitError
from guidekit.guidance import timestep_weight
from guidekit.plots import pyplot, save_figure
from guidekit.specs import StepReport

from .evaluate import check_judge, guided_samples
from .quality import check_judge_shape, diversity, feature_quality, judge_features
from .training import LoadedClassifier, check_compatible
from .training import predict as judge_probs

DEFAULT_SNRS = (10.0, 1.0, 0.1, 0.01, 0.001)
# (label, guidance schedule): off, each P2 stage alone, and on throughout
STAGE_BANDS = (
    ("off", None),
    ("SNR < 0.01", "snr::0.01"),
    ("0.01 <= SNR < 1", "snr:0.01:1"),
    ("SNR >= 1", "snr:1:"),
    ("all", "constant"),
)
GRID_SCALE = 4


def _snr_text(snr: float) -> str:
    return f"{snr:.3g}"


def stage_timestep(dpm: DPM, snr: float) -> int:
    """The training timestep whose SNR(t) = ᾱ_t / (1 − ᾱ_t) is nearest ``snr`` in log."""
    if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not math.isfinite(snr) \
            or snr <= 0:
        raise GuidekitError(f"an SNR must be a finite number > 0, got {snr!r}")
    table = dpm.schedule.float64["snr"]
    return int((table.log() - math.log(snr)).abs().argmin())


def check_snrs(snrs: Sequence[float]) -> list[float]:
    """The SNRs, each > 0 and finite, at least one, none repeated."""
    if not snrs:
        raise GuidekitError("give at least one SNR, e.g. --snrs 1,0.01")
    out = [float(s) for s in snrs]
    for s in out:
        if not math.isfinite(s) or s <= 0:
            raise GuidekitError(f"an SNR must be a finite number > 0, got {s:g}: e.g. "
                                "--snrs 10,1,0.1,0.01,0.001")
    if len(set(out)) != len(out):
        raise GuidekitError("--snrs repeats a value: give each SNR once")
    return out


@torch.no_grad()
def reconstruct_from(
    dpm: DPM, x0: Tensor, t: int, repeats: int, *, steps: int = 100, seed: int = 0,
    progress: bool = False,
) -> Tensor:
    """``repeats`` stochastic reconstructions of each x_0: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, then
    DDPM from t to 0 over at most ``steps`` of the steps 0..t (every one when t < steps).
    Returns (repeats, n, C, H, W) in [−1, 1]; ``seed`` draws all the noise, so the same seed
    gives the same draws."""
    if t < 0 or t >= dpm.schedule.num_steps:
        raise GuidekitError(f"t must be in 0..{dpm.schedule.num_steps - 1}, got {t}")
    device = next(iter(dpm.model.parameters())).device
    keep = sorted({round(t * i / max(steps - 1, 1)) for i in range(min(steps, t + 1))})
    engine = dpm.sampler(steps=keep)
    gen = torch.Generator(device).manual_seed(seed)
    x = x0.to(device).repeat(repeats, 1, 1, 1)
    ab = dpm.schedule.float64["alphas_cumprod"][t]
    noise = torch.randn(x.shape, generator=gen, device=device)
    x_t = (ab.sqrt() * x + (1 - ab).sqrt() * noise).float()
    out = engine.ddpm(x_t, generator=gen, device=device, progress=progress)
    return out.clamp(-1, 1).cpu().unflatten(0, (repeats, len(x0)))


def _rmse(a: Tensor, b: Tensor) -> Tensor:
    """Per-image RMSE in pixel values scaled to [0, 1]."""
    return ((a - b) / 2).double().flatten(-3).pow(2).mean(-1).sqrt()


def _spread(x: Tensor) -> float:
    """Mean RMSE between two draws of the same image, over image and draw pairs."""
    r = x.shape[0]
    if r < 2:
        return float("nan")
    pairs = [_rmse(x[i], x[j]) for i in range(r) for j in range(i + 1, r)]
    return float(torch.stack(pairs).mean())


def evaluate_stages(
    dpm: DPM,
    judge: LoadedClassifier,
    x0: Tensor,
    labels: Tensor,
    *,
    snrs: Sequence[float] = DEFAULT_SNRS,
    repeats: int = 4,
    steps: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Reconstruct held-out ``x0`` (with their ``labels``) from each SNR and measure it.

    Per SNR (highest first): ``t``, ``snr`` (the timestep's own), ``label_agreement`` (the
    judge's class of a reconstruction = x_0's label, over all draws), ``rmse`` (to x_0) and
    ``spread`` (between draws), pixel values in [0, 1]. Also ``judge_accuracy_x0``, the
    judge's accuracy on the x_0 themselves (the ceiling of agreement) and, not
    JSON-serialisable, ``"x0"`` and ``"images"`` (one (repeats, n, C, H, W) per SNR).
    """
    if getattr(getattr(dpm.model, "config", None), "num_classes", None):
        raise GuidekitError("eval stages measures an unconditional DPM: this one is "
                            "class-conditional, so give an unconditional --checkpoint")
    check_judge_shape(judge, dpm.image_shape)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise GuidekitError(f"--repeats must be an integer >= 2 (a spread needs two draws), "
                            f"got {repeats!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise GuidekitError(f"--steps must be an integer >= 1, got {steps!r}")
    if int(labels.max()) >= judge.num_classes:
        raise GuidekitError(f"the images have label {int(labels.max())} but the judge knows "
                            f"{judge.num_classes} classes: use the judge's data")
    levels = sorted((stage_timestep(dpm, s), s) for s in check_snrs(snrs))
    if len({t for t, _ in levels}) < len(levels):
        raise GuidekitError("two of --snrs fall on the same timestep of this schedule: give "
                            "SNRs further apart")
    x0 = x0.cpu()
    snr_table = dpm.schedule.float64["snr"]
    rows, images = [], []
    for t, asked in levels:
        t0 = time.perf_counter()
        x = reconstruct_from(dpm, x0, t, repeats, steps=steps, seed=seed, progress=progress)
        judged = judge_probs(judge, x.flatten(0, 1), 0).argmax(-1).unflatten(0, x.shape[:2])
        rows.append({
            "snr_asked": asked, "t": t, "snr": float(snr_table[t]),
            "label_agreement": float((judged == labels).double().mean()),
            "rmse": float(_rmse(x, x0).mean()),
            "spread": _spread(x),
            "seconds": round(time.perf_counter() - t0, 2),
        })
        images.append(x)
    x0_acc = float((judge_probs(judge, x0, 0).argmax(-1) == labels).double().mean())
    return {"n": len(x0), "repeats": repeats, "steps": steps, "seed": seed,
            "judge_accuracy_x0": x0_acc, "levels": rows, "x0": x0, "images": images}


def stage_of(snr: float) -> str:
    """The P2 paper's stage that SNR ``snr`` lies in: coarse features below 10⁻², content in
    [10⁻², 1), details from 1. Sampling from x_t at ``snr`` re-makes this stage and those
    above it."""
    if snr < 0.01:
        return "coarse"
    return "content" if snr < 1 else "details"


def stages_grid(result: dict[str, Any], path: str | Path, images: int = 4) -> Path:
    """Rows: x_0, then the reconstructions from each SNR (labelled); columns: the first
    ``images`` held-out images, ``repeats`` draws each."""
    m = min(images, result["n"])
    r = result["repeats"]
    x0 = result["x0"][:m]
    rows = [x0.repeat_interleave(r, 0)]
    rows += [x[:, :m].transpose(0, 1).flatten(0, 1) for x in result["images"]]
    row_labels = ["x_0"] + [f"SNR {_snr_text(lv['snr'])} (t={lv['t']})"
                            for lv in result["levels"]]
    col_labels = [f"#{i + 1} draw {j + 1}" for i in range(m) for j in range(r)]
    return save_image_grid(torch.cat(rows), path, nrow=m * r, scale=GRID_SCALE,
                           row_labels=row_labels, col_labels=col_labels,
                           title="Stochastic reconstruction: x_0 -> x_t -> DDPM -> x_0")


def plot_stages(result: dict[str, Any], path: str | Path) -> Path:
    """Label agreement (left axis) and RMSE / spread (right axis) against the SNR x_t was
    taken at, log scale, the P2 stage boundaries 10⁻² and 1 marked."""
    plt = pyplot()
    lv = result["levels"]
    snr = [r["snr"] for r in lv]
    fig, ax = plt.subplots(figsize=(6, 4.6), dpi=100)
    ax.plot(snr, [r["label_agreement"] for r in lv], "o-", color="C0",
            label="judged label = x_0's")
    ax.axhline(result["judge_accuracy_x0"], color="C0", ls=":", lw=1,
               label="judge accuracy on x_0")
    ax.set(xscale="log", xlabel="SNR of x_t (ᾱ_t / (1 − ᾱ_t), log scale)",
           ylabel="label agreement (fraction)", ylim=(0, 1.02),
           title=f"x_0 → x_t → DDPM → x_0, {result['n']} images x {result['repeats']} draws")
    for b in (0.01, 1.0):
        ax.axvline(b, color="grey", ls="--", lw=1)
    px = ax.twinx()
    px.plot(snr, [r["rmse"] for r in lv], "s-", color="C1", label="RMSE to x_0")
    px.plot(snr, [r["spread"] for r in lv], "^--", color="C2", label="RMSE between draws")
    px.set_ylabel("pixel RMSE (pixel values in [0, 1])")
    px.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + px.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
              fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def save_stages(result: dict[str, Any], out: Path, grid_images: int = 4) -> StepReport:
    """Write the grid (``grid_images`` images, every draw) and the plot into ``out``; the
    report of ``guidekit eval stages``."""
    grid = stages_grid(result, out / "stages.png", grid_images)
    plot = plot_stages(result, out / "stages_plot.png")
    summary = {k: v for k, v in result.items() if k not in ("x0", "images")}
    summary.update(grid=str(grid), plot=str(plot))
    rows = [{"SNR": _snr_text(r["snr"]), "t": r["t"], "x_t in stage": stage_of(r["snr"]),
             "agreement": f"{r['label_agreement']:.3f}", "rmse": f"{r['rmse']:.4f}",
             "spread": f"{r['spread']:.4f}"} for r in result["levels"]]
    return StepReport(
        f"grid: {grid}\nplot: {plot}",
        images=[grid, plot],
        tables={f"{result['n']} held-out images x {result['repeats']} DDPM draws": rows},
        metrics=summary,
        text=f"agreement: the judge's class of a reconstruction is x_0's label (its accuracy "
        f"on x_0 itself: {result['judge_accuracy_x0']:.3f}); rmse to x_0 and spread between "
        "draws in pixel values in [0, 1]",
    )


# --------------------------------------------------------------------------- guidance by stage


def evaluate_guidance_stages(
    dpm: DPM,
    clf: LoadedClassifier,
    judge: LoadedClassifier,
    scale: float,
    real: Tensor,
    *,
    bands: Sequence[tuple[str, str | None]] = STAGE_BANDS,
    sampler: str = "ddim",
    steps: int = 50,
    per_class: int = 10,
    seed: int = 0,
    k: int = 5,
    progress: bool = False,
) -> dict[str, Any]:
    """Classifier guidance at ``scale`` on in one SNR band at a time (a band's schedule None:
    off), every band from the same x_T and noise. Per band: ``steps_on`` (of the sampler's
    steps), the judge's ``accuracy`` and ``confidence`` for the target class, ``diversity``
    (mean same-class L2) and ``fd``, ``precision``, ``recall`` against ``real`` held-out
    images in the judge's features. Also, not JSON-serialisable, ``"classes"`` and
    ``"samples"`` (one batch per band)."""
    check_compatible(clf, dpm.config)
    check_judge(judge, clf, dpm)
    if per_class < 2:
        raise GuidekitError(f"--per-class must be >= 2 to measure diversity, got {per_class}")
    classes = torch.arange(clf.num_classes).repeat_interleave(per_class)
    if k >= min(len(classes), len(real)):
        raise GuidekitError(f"k = {k} needs more than {k} samples and held-out images: raise "
                            "--per-class")
    real_f = judge_features(judge, real)
    timesteps = dpm.schedule.respace(respacing(sampler, steps, dpm.defaults.spacing)).timesteps
    rows, samples = [], []
    for label, spec in bands:
        t0 = time.perf_counter()
        weight = None if spec is None else timestep_weight(dpm.schedule, spec)
        on = 0 if spec is None else (len(timesteps) if weight is None
                                     else int(weight.cpu()[timesteps.cpu()].sum()))
        x = guided_samples(dpm, clf, classes, 0.0 if spec is None else float(scale),
                           sampler=sampler, steps=steps, seed=seed, weight=weight,
                           progress=progress).cpu()
        probs = judge_probs(judge, x, 0)
        q = feature_quality(real_f, judge_features(judge, x), k)
        rows.append({
            "band": label, "schedule": spec or "off", "steps_on": on,
            "accuracy": float((probs.argmax(-1) == classes).float().mean()),
            "confidence": float(probs.gather(1, classes[:, None]).mean()),
            "diversity": diversity(x, classes),
            **{m: q[m] for m in ("fd", "precision", "recall")},
            "seconds": round(time.perf_counter() - t0, 2),
        })
        samples.append(x)
    return {"sampler": sampler, "steps": steps, "scale": float(scale),
            "per_class": per_class, "n_real": len(real), "k": k, "bands": rows,
            "classes": classes, "samples": samples}


BAND_METRICS = ("accuracy", "confidence", "diversity", "fd", "precision", "recall")


def plot_guidance_stages(result: dict[str, Any], path: str | Path) -> Path:
    """Bars of accuracy and confidence per band (left axis), FD per band (right axis)."""
    plt = pyplot()
    rows = result["bands"]
    pos = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.bar([p - 0.2 for p in pos], [r["accuracy"] for r in rows], 0.2, label="judged accuracy")
    ax.bar(list(pos), [r["confidence"] for r in rows], 0.2, label="judge confidence")
    ax.set(ylabel="accuracy / confidence (fraction)", ylim=(0, 1.02),
           xlabel="SNR band where classifier guidance is on",
           title=f"{result['sampler'].upper()}-{result['steps']}, scale "
           f"{result['scale']:g}: guidance in one stage")
    ax.set_xticks(list(pos), [r["band"] for r in rows], fontsize=8)
    fd = ax.twinx()
    fd.bar([p + 0.2 for p in pos], [r["fd"] for r in rows], 0.2, color="C3",
           label="FD (judge features)")
    fd.set_ylabel("Fréchet distance in judge features (lower is better)")
    handles = ax.get_legend_handles_labels()[0] + fd.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    return save_figure(fig, path)


def guidance_stages_grid(result: dict[str, Any], path: str | Path) -> Path:
    """One row per band (labelled), the first sample of every class across (labelled)."""
    classes = result["classes"]
    first = torch.tensor([int((classes == c).nonzero()[0]) for c in classes.unique()])
    x = torch.cat([s[first] for s in result["samples"]])
    return save_image_grid(x, path, nrow=len(first), scale=GRID_SCALE,
                           row_labels=[r["band"] for r in result["bands"]],
                           col_labels=[f"class {int(c)}" for c in classes.unique()],
                           title=f"Classifier guidance (scale {result['scale']:g}) in one "
                           "SNR band")


def save_guidance_stages(result: dict[str, Any], out: Path) -> StepReport:
    """Write the plot and grid into ``out``; the report of ``eval guidance --stages``."""
    plot = plot_guidance_stages(result, out / "stages.png")
    grid = guidance_stages_grid(result, out / "stages_grid.png")
    summary = {k: v for k, v in result.items() if k not in ("classes", "samples")}
    summary.update(plot=str(plot), grid=str(grid))
    rows = [{"band": r["band"], "steps on": r["steps_on"],
             **{m: f"{r[m]:.3f}" for m in BAND_METRICS}} for r in result["bands"]]
    label = f"{result['sampler'].upper()}-{result['steps']}"
    return StepReport(
        f"plot: {plot}\ngrid: {grid}",
        images=[plot, grid],
        tables={f"{label}, scale {result['scale']:g}, {result['per_class']} per class, "
                "guidance on in one band": rows},
        metrics=summary,
        text=f"FD, precision and recall against {result['n_real']} held-out images in the "
        f"judge's features, k = {result['k']}",
    )
