"""The PDAE steps of ``guidekit quickstart``: train PDAE on the quickstart's DDPM, then show
the gap it fills, what it reconstructs, edits and generates, and what a linear probe reads
off z. Each step calls the same functions as the ``guidekit pdae`` commands."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from guidekit import (
    QuickstartContext,
    QuickstartStep,
    StepReport,
    TrainConfig,
    load_dataset,
    save_image_grid,
)
from guidekit.specs import Claim

from .analysis import (
    default_gap_timesteps,
    default_onestep_timesteps,
    linear_probe,
    one_step_x0,
    onestep_grid,
    plot_gap,
    posterior_mean_gap,
)
from .autoencoding import (
    edit_held_out,
    interpolate,
    interpolation_grid,
    manipulation_grid,
    reconstruct,
    reconstruction_grid,
)
from .latent import load_latent_dpm, sample_pdae, train_pdae_latent
from .training import LoadedPDAE, load_pdae, train_pdae

QS_PDAE_TRAIN = dict(steps=2000, batch_size=32, lr=1e-3, ema_decay=0.995)
QS_LATENT_TRAIN = dict(steps=3000, batch_size=256, lr=1e-3, ema_decay=0.995)
QS_LATENT_HIDDEN = 256
QS_DDIM_STEPS = 50  # every decode of the autoencoding step; the CLI's default is 100
QS_RECONSTRUCT_N = 32
QS_EDIT = dict(label=0, scales=(0.0, 8.0, 16.0, 32.0), n=8)
QS_SAMPLES = 64
# Where the gap claim applies, as fractions of T. Below T/20 x_t already fixes x_0 and above
# 4T/5 (SNR < 2e-3) it holds almost nothing of it, so z can close almost none of the gap
# there: both curves meet, and which is lower is the two networks' noise, not the method.
QS_GAP_BAND = (0.05, 0.8)


def _round(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Floats to 4 significant digits for summary.json: gaps of 1e-7 keep their digits."""
    return [{k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in r.items()}
            for r in rows]


def _pdae(ctx: QuickstartContext) -> LoadedPDAE:
    return load_pdae(ctx.out / "pdae")


def quickstart_pdae(ctx: QuickstartContext) -> StepReport:
    """Train E_φ and G_ψ on the frozen quickstart DDPM; the gap per t and one-step x̂_0."""
    t0 = time.perf_counter()
    train = load_dataset("digits", "train")
    steps = 4 if ctx.fast else QS_PDAE_TRAIN["steps"]
    summary = train_pdae(
        train, ctx.out / "pdae", pretrained=ctx.out / "ddpm",
        config=TrainConfig(**{**QS_PDAE_TRAIN, "steps": steps}, seed=ctx.seed,
                           save_every=steps, log_every=max(steps // 20, 1), bf16=ctx.bf16),
        progress=ctx.progress,
    )
    pdae = _pdae(ctx)
    test = load_dataset("digits", "test").images
    num_steps = pdae.dpm.schedule.num_steps
    gap_ts = default_gap_timesteps(num_steps)
    if ctx.fast:
        gap_ts = [1, num_steps // 2, num_steps - 1]
    gap = posterior_mean_gap(pdae, test[: 16 if ctx.fast else 256], gap_ts, seed=ctx.seed)
    folder = ctx.out / "pdae" / "analysis"
    plot = plot_gap(gap, folder / "gap.png", "posterior mean gap, held-out digits")
    x0 = test[:8]
    one = one_step_x0(pdae, x0, default_onestep_timesteps(num_steps), seed=ctx.seed)
    grid = onestep_grid(x0, one, folder / "onestep.png",
                        title="One-step x̂_0 from x_t, held-out digits")
    return StepReport(
        "PDAE: filling the posterior mean gap",
        claims=[_gap_claim(gap, num_steps), _onestep_claim(one["rows"])],
        images=[plot, grid],
        tables={"posterior mean gap per pixel (held-out digits)": _round(gap),
                "one-step x̂_0 MSE on [0, 1] (8 held-out digits)": _round(one["rows"])},
        metrics={
            **{k: summary[k] for k in ("steps", "final_loss", "images_per_second")},
            "seconds": round(time.perf_counter() - t0, 1),
        },
        text="E_φ and G_ψ trained on the frozen DDPM (its weights unchanged). The plot: "
        "E‖μ − μ̃(x_t, x_0)‖² per pixel of the pre-trained mean and of PDAE's shifted mean. "
        "The grid: the originals, then per t (T/10, 3T/10, ..., 9T/10) x_t, the pre-trained "
        "one-step x̂_0 and PDAE's.",
    )


def _gap_claim(gap: list[dict[str, Any]], num_steps: int) -> Claim:
    lo, hi = (round(f * num_steps) for f in QS_GAP_BAND)
    band = [r for r in gap if lo <= r["t"] <= hi]
    worst = max(band, key=lambda r: r["ratio"])
    best = min(band, key=lambda r: r["ratio"])
    ends = ", ".join(f"t = {r['t']} {r['ratio']:.3f}" for r in gap if r not in band)
    return Claim(
        f"PDAE fills the posterior mean gap: its gap is below the pre-trained DPM's at every "
        f"t from {lo} to {hi}",
        all(r["pdae"] < r["pretrained"] for r in band),
        f"PDAE / pre-trained gap: at most {worst['ratio']:.3f} (t = {worst['t']}), least "
        f"{best['ratio']:.3f} (t = {best['t']}); outside the band (not claimed): {ends}")


def _onestep_claim(rows: list[dict[str, Any]]) -> Claim:
    return Claim(
        "PDAE's one-step x̂_0 is nearer x_0 than the pre-trained DPM's at every t shown",
        all(r["pdae_mse"] < r["pretrained_mse"] for r in rows),
        ", ".join(f"t = {r['t']}: {r['pdae_mse']:.4f} vs {r['pretrained_mse']:.4f}"
                  for r in rows))


def quickstart_autoencoding(ctx: QuickstartContext) -> StepReport:
    """Reconstruct, interpolate and edit held-out digits; probe z linearly."""
    t0 = time.perf_counter()
    pdae = _pdae(ctx)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    steps = 5 if ctx.fast else QS_DDIM_STEPS
    folder = ctx.out / "pdae" / "autoencoding"
    x0 = test.images[: 4 if ctx.fast else QS_RECONSTRUCT_N]
    rec = reconstruct(pdae, x0, steps=steps, xT="both", seed=ctx.seed, progress=ctx.progress)
    images = [reconstruction_grid(x0, rec.pop("images"), folder / "reconstruct.png",
                                  title=f"Reconstruction of held-out digits, DDIM-{steps}")]
    frames = interpolate(pdae, test.images[0], test.images[1], frames=7, steps=steps,
                         progress=ctx.progress)
    images.append(interpolation_grid(test.images[0], test.images[1], frames,
                                     folder / "interpolate.png",
                                     title=f"Interpolating test digits 0 and 1, DDIM-{steps}"))
    tables = {f"reconstruction of {rec['n']} held-out digits, DDIM-{steps}":
              _round([{k: v for k, v in r.items() if k != "lpips"} for r in rec["methods"]])}
    metrics: dict[str, Any] = {}
    claims = [_reconstruction_claim(rec["methods"])]
    judge_dir = ctx.out / "judge"
    if (judge_dir / "config.json").is_file():  # the classifier plugin's quickstart judge
        edit = _edit(ctx, pdae, train, test, judge_dir, steps, folder / "manipulate.png")
        images.append(Path(edit.pop("grid")))
        tables[f"editing {edit['n']} non-{edit['label']} digits toward {edit['label']}"] = (
            _round(edit["scales"]))
        metrics["edit_direction_test_accuracy"] = edit["test_accuracy"]
        claims.append(_edit_claim(edit))
    probe = linear_probe(pdae, train, test, seed=ctx.seed)
    tables["linear probe, held-out accuracy"] = _round(probe["targets"])
    claims.append(_probe_claim(probe["targets"]))
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    return StepReport(
        "PDAE: reconstruction, interpolation, editing, probe",
        images=images, tables=tables, metrics=metrics, claims=claims,
        text="Reconstruction grid: the originals, then DDIM inversion of the bare DPM, PDAE "
        "with inferred x_T, PDAE from random x_T and the bare DPM from the same random x_T. "
        "Interpolation rows: lerp of z, then lerp of the two shifts (x_T by slerp). Editing "
        "grid: the original, then z + s·w for each scale, w a linear probe's direction of the "
        "label in normalised z; a clean judge scores p(label). The probe: logistic regression "
        "on z, on raw pixels and on an untrained encoder's z.",
    )


def _reconstruction_claim(methods: list[dict[str, Any]]) -> Claim:
    mse = {r["method"]: r["mse"] for r in methods}
    pairs = [(f"PDAE ({x})", f"DDIM ({x})") for x in ("inferred x_T", "random x_T")]
    return Claim(
        "PDAE reconstructs held-out digits better than DDIM alone: lower MSE with inferred "
        "x_T and with random x_T",
        all(mse[a] < mse[b] for a, b in pairs),
        "; ".join(f"{a} {mse[a]:.2e} vs {b} {mse[b]:.2e}" for a, b in pairs))


def _edit_claim(edit: dict[str, Any]) -> Claim:
    low, high = edit["scales"][0], edit["scales"][-1]
    return Claim(
        f"Moving z along the probe's direction turns digits into {edit['label']}: at the "
        f"largest scale p({edit['label']}) rose for every edited digit and averages >= 0.5",
        high["rose"] == 1.0 and high["p_label"] >= 0.5,
        f"scale {high['scale']:g}: mean p {high['p_label']:.3f}, rose for "
        f"{high['rose']:.0%} (scale {low['scale']:g}: {low['p_label']:.3f}); the direction's "
        f"held-out accuracy {edit['test_accuracy']:.3f}")


def _probe_claim(targets: list[dict[str, Any]]) -> Claim:
    label = next(r for r in targets if r["target"] == "label")
    return Claim(
        "z holds the digit linearly: a probe on PDAE's z beats one on an untrained "
        "encoder's z, and chance",
        label["pdae"] > label["random"] > label["chance"],
        f"held-out accuracy: PDAE {label['pdae']:.3f}, untrained encoder "
        f"{label['random']:.3f}, chance {label['chance']:.3f} (raw pixels "
        f"{label['pixels']:.3f}, not claimed)")


def _edit(ctx: QuickstartContext, pdae: LoadedPDAE, train, test, judge_dir: Path, steps: int,
          path: Path) -> dict[str, Any]:
    from guidekit_classifier.training import JUDGE_KIND, load_classifier

    judge = load_classifier(judge_dir, JUDGE_KIND)
    scales = (0.0, 16.0) if ctx.fast else QS_EDIT["scales"]
    res = edit_held_out(pdae, judge, train, test, QS_EDIT["label"], scales,
                        n=2 if ctx.fast else QS_EDIT["n"], steps=steps, seed=ctx.seed,
                        progress=ctx.progress)
    res["grid"] = str(manipulation_grid(res.pop("originals"), res.pop("images"), scales, path,
                                        title=f"Editing toward digit {QS_EDIT['label']}"))
    return res


def quickstart_sample(ctx: QuickstartContext) -> StepReport:
    """A latent DPM over z, then new digits: sampled z decoded with the PDAE guidance."""
    t0 = time.perf_counter()
    steps = 4 if ctx.fast else QS_LATENT_TRAIN["steps"]
    out = ctx.out / "pdae_latent"
    summary = train_pdae_latent(
        ctx.out / "pdae", load_dataset("digits", "train"), out, hidden=QS_LATENT_HIDDEN,
        config=TrainConfig(**{**QS_LATENT_TRAIN, "steps": steps}, seed=ctx.seed,
                           save_every=steps, log_every=max(steps // 20, 1), bf16=ctx.bf16),
        progress=ctx.progress,
    )
    pdae = _pdae(ctx)
    n, ddim = (4, 5) if ctx.fast else (QS_SAMPLES, 100)
    res = sample_pdae(pdae, load_latent_dpm(out, pdae), n, steps=ddim, latent_steps=ddim,
                      seed=ctx.seed, progress=ctx.progress)
    grid = save_image_grid(res["images"], out / "samples.png", scale=4,
                           title=f"PDAE samples: z by DDIM-{ddim}, decoded by DDIM-{ddim}")
    return StepReport(
        "PDAE: new digits from a latent DPM",
        images=[grid],
        metrics={"latent_steps": summary["steps"], "latent_final_loss": summary["final_loss"],
                 "latent_seconds": res["latent_seconds"],
                 "decode_seconds": res["decode_seconds"],
                 "seconds": round(time.perf_counter() - t0, 1)},
        text=f"z drawn by DDIM-{ddim} from an MLP DPM trained on the training digits' z, then "
        f"decoded by DDIM-{ddim} on the frozen DDPM with the PDAE guidance toward z.",
    )


def quickstart_steps() -> list[QuickstartStep]:
    return [
        QuickstartStep("pdae", quickstart_pdae, order=40,
                       help="Train PDAE on the DDPM; gap and one-step x̂_0."),
        QuickstartStep("pdae-autoencoding", quickstart_autoencoding, order=50,
                       help="Reconstruct, interpolate, edit; linear probe on z."),
        QuickstartStep("pdae-sample", quickstart_sample, order=60,
                       help="Latent DPM over z; sample new digits."),
    ]
