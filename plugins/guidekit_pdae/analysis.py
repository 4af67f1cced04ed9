"""Does PDAE fill the posterior mean gap? ``guidekit pdae gap``, ``onestep`` and ``probe``.

- gap: per t, E‖μ − μ̃(x_t, x_0)‖² per pixel for the pre-trained mean
  μ_θ and for PDAE's μ_θ + β̃_t·G_ψ(x_t, E_φ(x_0), t), the mean its loss trains; beside them
  any other DPMs of the same schedule on the same x_t (a class-conditional one given each
  image's true label), for the paper's Observation 3: unconditional > class-conditional > PDAE.
- onestep (Figure 4): x̂_0 from x_t in one step, without and with the shift.
- probe: how much of x_0's labels or factors a linear model reads off z = E_φ(x_0), against
  raw pixels and an untrained encoder of the same shape.

All run on held-out (test) images, with a fixed seed for the noise. The commands live in
:mod:`guidekit_pdae.cli`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from guidekit import DPM, GuidekitError, ImageData, load_dataset, ops, save_image_grid
from guidekit.engine import Sampler
from guidekit.plots import pyplot, save_figure
from guidekit.trainer_options import parse_ints

from .networks import Encoder, EncoderConfig
from .training import LoadedPDAE, check_data

BATCH = 256


# --------------------------------------------------------------------------- inputs


def default_gap_timesteps(num_steps: int) -> list[int]:
    """1, T/100, T/40, T/20, then every T/10, and T−1: dense where the gap changes fastest."""
    T = num_steps
    picks = [1, T // 100, T // 40, T // 20, *(T * i // 10 for i in range(1, 10)), T - 1]
    return sorted({t for t in picks if 1 <= t <= T - 1})


def default_onestep_timesteps(num_steps: int) -> list[int]:
    """T/10, 3T/10, 5T/10, 7T/10, 9T/10 (100, 300, ..., 900 for T = 1000)."""
    return [num_steps * i // 10 for i in (1, 3, 5, 7, 9)]


def parse_timesteps(text: str | None, num_steps: int, minimum: int = 1) -> list[int]:
    """``"1,50,100"`` → [1, 50, 100], each in [minimum, T−1]; None gives the default (the
    gap's for minimum 1, onestep's for 0)."""
    if text is None:
        return (default_gap_timesteps if minimum else default_onestep_timesteps)(num_steps)
    ts = parse_ints(text, "--timesteps")
    if not ts:
        raise GuidekitError(f"--timesteps must list at least one timestep, got '{text}'")
    bad = [t for t in ts if not minimum <= t <= num_steps - 1]
    if bad:
        why = " (at t = 0 β̃ = 0, so PDAE's shift vanishes)" if 0 in bad and minimum == 1 else ""
        raise GuidekitError(f"--timesteps {bad} out of range: this DPM has T = {num_steps}, "
                            f"use {minimum}..{num_steps - 1}{why}")
    return sorted(set(ts))


def held_out(pdae: LoadedPDAE, data: str, split: str = "test",
             image_size: int | None = None, seed: int = 0) -> ImageData:
    """The dataset's ``split``, checked against the DPM's image shape."""
    images = load_dataset(data, split, image_size, seed)
    check_data(pdae.dpm, images, str(pdae.dpm.checkpoint.path))
    return images


def first_images(images: ImageData, n: int) -> Tensor:
    """The first ``n`` images (n >= 1, else a one-line error)."""
    if n < 1:
        raise GuidekitError(f"--n must be >= 1, got {n}")
    return images.images[:n]


def _noise(x0: Tensor, seed: int) -> Tensor:
    """The same ε for every t, from ``seed``: the curves then differ only by t."""
    return torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))


def _shifted(pdae: LoadedPDAE, x0: Tensor, z: Tensor, noise: Tensor, t: int,
             y: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_t, t as a (B,) tensor, ε_θ, G) for clean images x0 (labels y for a
    class-conditional DPM) at timestep t."""
    dev = pdae.device
    x0, z, noise = x0.to(dev), z.to(dev), noise.to(dev)
    k = torch.full((len(x0),), t, device=dev, dtype=torch.long)
    x_t = ops.q_sample(pdae.dpm.schedule.tables, x0, k, noise)
    eps, g = pdae.shift(x_t, k, z, None if y is None else y.to(dev))
    return x_t, k, eps.float(), g.float()


# --------------------------------------------------------------------------- gap


def dpm_num_classes(dpm: DPM) -> int | None:
    """The classes a DPM's model conditions on (None: unconditional)."""
    return getattr(getattr(dpm.model, "config", None), "num_classes", None)


def check_comparable(pdae: LoadedPDAE, dpms: Mapping[str, DPM], labels: Tensor | None) -> None:
    """Every DPM compared with PDAE's must have its T, betas and image shape (the gap is
    measured on one x_t against one μ̃); a class-conditional one needs labels it knows."""
    ref = pdae.dpm
    betas = ref.schedule.float64["betas"]
    for name, dpm in dpms.items():
        where = f"--dpm {name} ({dpm.checkpoint.path})"
        other = dpm.schedule.float64["betas"]
        if dpm.schedule.num_steps != ref.schedule.num_steps or not torch.allclose(
                other, betas, rtol=1e-9, atol=0.0):
            raise GuidekitError(
                f"{where} has another noise schedule (T = {dpm.schedule.num_steps}) than the "
                f"PDAE's DPM (T = {ref.schedule.num_steps}): compare DPMs trained with the same "
                "--schedule and --timesteps")
        if dpm.image_shape != ref.image_shape:
            shape, want = ("x".join(map(str, s)) for s in (dpm.image_shape, ref.image_shape))
            raise GuidekitError(f"{where} works on {shape} images but the PDAE's DPM on {want}: "
                                "compare DPMs of the same image shape")
        k = dpm_num_classes(dpm)
        if k is None:
            continue
        if labels is None:
            raise GuidekitError(f"{where} is class-conditional: it needs the images' true "
                                "labels, so use a labelled dataset such as digits")
        if len(labels) and int(labels.max()) >= k:
            raise GuidekitError(f"{where} knows {k} classes but the images have label "
                                f"{int(labels.max())}: use data with the DPM's classes")


@torch.no_grad()
def posterior_mean_gap(
    pdae: LoadedPDAE, x0: Tensor, timesteps: list[int], *, seed: int = 0,
    y: Tensor | None = None, dpms: Mapping[str, DPM] | None = None,
    labels: Tensor | None = None,
) -> list[dict[str, Any]]:
    """Per t: the mean squared gap per pixel to μ̃(x_t, x_0) of the pre-trained mean μ_θ and
    of PDAE's μ_θ + β̃_t·G (the "small" Σ, which is the shift PDAE trains), and their ratio.
    ``y``: the images' labels, for a class-conditional DPM.

    ``dpms``: other DPMs by name, of the PDAE's schedule and image shape, measured on the very
    same x_t (one ε per image, from ``seed``); a class-conditional one gets ``labels`` (the
    images' true classes). Their rows then also hold ``"dpms"`` (name → gap) and ``"order"``
    (every model, largest gap first: the names, ``"pretrained"`` and ``"pdae"``).
    """
    dpms = dict(dpms or {})
    labels = y if labels is None else labels
    check_comparable(pdae, dpms, labels)
    tab = pdae.dpm.schedule.tables
    x0 = x0.to(pdae.device)
    z, noise = pdae.encode(x0), _noise(x0, seed).to(pdae.device)
    nets = {name: Sampler(d.model, d.schedule) for name, d in dpms.items()}
    conditional = {name: dpm_num_classes(d) is not None for name, d in dpms.items()}
    rows = []
    for t in timesteps:
        pre = post = 0.0
        extra = dict.fromkeys(dpms, 0.0)
        start = 0
        for xb, zb, nb in zip(x0.split(BATCH), z.split(BATCH), noise.split(BATCH),
                              strict=True):
            sl = slice(start, start + len(xb))
            start += len(xb)
            yb = None if y is None else y[sl]
            x_t, k, eps, g = _shifted(pdae, xb, zb, nb, t, yb)
            target = ops.posterior_mean(tab, xb, x_t, k)
            mean = ops.model_mean(tab, x_t, k, eps)
            var, _ = ops.variance(tab, k, x_t, "small")
            pre += float((mean - target).double().square().sum())
            post += float((mean + var * g - target).double().square().sum())
            for name, net in nets.items():
                lb = labels[sl].to(pdae.device) if conditional[name] else None  # type: ignore[index]
                other, _, _ = net.predict(x_t, k, lb)
                gap = ops.model_mean(tab, x_t, k, other.float()) - target
                extra[name] += float(gap.double().square().sum())
        pre, post = pre / x0.numel(), post / x0.numel()
        row: dict[str, Any] = {"t": t, "pretrained": pre, "pdae": post,
                               "ratio": post / pre if pre > 0 else float("nan")}
        if dpms:
            row["dpms"] = {name: v / x0.numel() for name, v in extra.items()}
            every = {**row["dpms"], "pretrained": pre, "pdae": post}
            row["order"] = sorted(every, key=lambda name: -every[name])
        rows.append(row)
    return rows


def plot_gap(rows: list[dict[str, Any]], path: str | Path, title: str,
             labels: Mapping[str, str] | None = None) -> Path:
    """Every model's gap against t on a log y axis: the pre-trained DPM, PDAE, and each DPM
    in a row's ``"dpms"`` (``labels``: legend text by name, else the name)."""
    plt = pyplot()

    t = [r["t"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    markers = iter("^vD<>phx*+" * 10)
    for name in rows[0].get("dpms", {}) if rows else ():
        ax.semilogy(t, [r["dpms"][name] for r in rows], f"{next(markers)}--",
                    label=(labels or {}).get(name, name))
    ax.semilogy(t, [r["pretrained"] for r in rows], "o-", label="PDAE's pre-trained DPM: μ_θ")
    ax.semilogy(t, [r["pdae"] for r in rows], "s-", label="PDAE: μ_θ + Σ_t·G_ψ")
    ax.set(xlabel="timestep t (of T training steps)",
           ylabel="E‖μ − μ̃(x_t, x_0)‖² per pixel (images in [−1, 1])", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path)


def gap_table(rows: list[dict[str, Any]], n: int,
              names: Mapping[str, str] | None = None) -> dict[str, list[dict[str, str]]]:
    """The gap per t as a titled table of formatted rows (``StepReport.tables``); with other
    DPMs, one column each (``names``: column text by name). The rows' ``"order"`` stays in
    the JSON: as a column it wraps past a terminal's width."""
    title = f"Posterior mean gap E‖μ − μ̃(x_t, x_0)‖² per pixel, {n} test images"
    names = dict(names or {})
    table = []
    for r in rows:
        row = {"t": str(r["t"])}
        for name, v in r.get("dpms", {}).items():
            row[names.get(name, name)] = f"{v:.3e}"
        row.update({"pre-trained": f"{r['pretrained']:.3e}", "PDAE": f"{r['pdae']:.3e}",
                    "PDAE / pre-trained": f"{r['ratio']:.3f}"})
        table.append(row)
    return {title: table}


# --------------------------------------------------------------------------- one step


@torch.no_grad()
def one_step_x0(
    pdae: LoadedPDAE, x0: Tensor, timesteps: list[int], *, seed: int = 0,
    y: Tensor | None = None,
) -> dict[str, Any]:
    """x̂_0 from x_t in one step: pre-trained from ε_θ, PDAE from ε̂ = guided_eps(ε_θ, G).

    Returns ``{"rows": [{"t", "pretrained_mse", "pdae_mse"}], "x_t", "pretrained", "pdae"}``
    (the last three: one (N, C, H, W) tensor per t, clamped to [−1, 1]). The MSE is per pixel
    on the [0, 1] scale (x+1)/2, of the clamped x̂_0.
    """
    tab = pdae.dpm.schedule.tables
    x0 = x0.to(pdae.device)
    z, noise = pdae.encode(x0), _noise(x0, seed)
    rows: list[dict[str, float]] = []
    out: dict[str, list[Tensor]] = {"x_t": [], "pretrained": [], "pdae": []}
    for t in timesteps:
        x_t, k, eps, g = _shifted(pdae, x0, z, noise, t, y)
        pre = ops.predict_x0(tab, x_t, k, eps).clamp(-1, 1)
        post = ops.predict_x0(tab, x_t, k, ops.guided_eps(tab, x_t, k, eps, g)).clamp(-1, 1)
        rows.append({"t": t, "pretrained_mse": _mse01(pre, x0), "pdae_mse": _mse01(post, x0)})
        for key, x in (("x_t", x_t.clamp(-1, 1)), ("pretrained", pre), ("pdae", post)):
            out[key].append(x.cpu())
    return {"rows": rows, **out}


def _mse01(x: Tensor, x0: Tensor) -> float:
    """Per-pixel MSE on the [0, 1] scale: ((x+1)/2 − (x0+1)/2)² = (x − x0)²/4."""
    return float(((x - x0).double() / 2).square().mean())


def onestep_grid(x0: Tensor, result: dict[str, Any], path: str | Path,
                 title: str | None = None) -> Path:
    """Row 0 the originals; then for each t three rows: x_t, pre-trained x̂_0, PDAE x̂_0,
    each row labelled in the PNG (``x_0``, ``t=…: x_t``, ...)."""
    blocks, labels = [x0.cpu().clamp(-1, 1)], ["x_0 (original)"]
    for row, x_t, pre, post in zip(result["rows"], result["x_t"], result["pretrained"],
                                   result["pdae"], strict=True):
        blocks += [x_t, pre, post]
        t = row["t"]
        labels += [f"t={t}: x_t", f"t={t}: pre-trained x̂_0", f"t={t}: PDAE x̂_0"]
    return save_image_grid(torch.cat(blocks), path, nrow=len(x0), scale=4, row_labels=labels,
                           title=title)


def onestep_table(rows: list[dict[str, float]], n: int) -> dict[str, list[dict[str, str]]]:
    """The one-step MSEs as a titled table of formatted rows (``StepReport.tables``)."""
    title = (f"One-step x̂_0 from x_t, {n} test images "
             "(per-pixel MSE on the [0, 1] scale, x̂_0 clamped)")
    table = []
    for r in rows:
        ratio = r["pdae_mse"] / r["pretrained_mse"] if r["pretrained_mse"] > 0 else float("nan")
        table.append({"t": str(r["t"]), "pre-trained MSE": f"{r['pretrained_mse']:.4f}",
                      "PDAE MSE": f"{r['pdae_mse']:.4f}", "PDAE / pre-trained": f"{ratio:.3f}"})
    return {title: table}


# --------------------------------------------------------------------------- probe


def probe_targets(data: ImageData) -> dict[str, tuple[np.ndarray, str]]:
    """What to predict: every factor (with its kind) if the data has factors, else the label."""
    if data.factors:
        return {k: (v.numpy(), data.factor_kinds.get(k, "categorical"))
                for k, v in data.factors.items()}
    if data.labels is not None:
        return {"label": (data.labels.numpy(), "categorical")}
    raise GuidekitError(f"dataset '{data.name}' has neither labels nor factors to probe: "
                        "use a labelled dataset such as digits or shapes")


@torch.no_grad()
def probe_features(pdae: LoadedPDAE, images: Tensor, seed: int = 0) -> dict[str, np.ndarray]:
    """z = E_φ(x_0), raw pixels, and z of an untrained encoder of E_φ's config (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random = Encoder(EncoderConfig.from_dict(pdae.config["encoder"])).eval()
    random = random.to(pdae.device)
    return {
        "pdae": pdae.encode(images).cpu().numpy(),
        "pixels": images.flatten(1).numpy(),
        "random": torch.cat([random(b.to(pdae.device)).cpu()
                             for b in images.split(BATCH)]).numpy(),
    }


def linear_probe(
    pdae: LoadedPDAE, train: ImageData, test: ImageData, *, seed: int = 0
) -> dict[str, Any]:
    """Held-out accuracy (categorical) or R² (continuous, ridge) of linear models on
    standardised features, fit on ``train`` and scored on ``test``, for each target.

    Returns ``{"n_train", "n_test", "latent_dim", "targets": [{"target", "kind", "metric",
    "chance", "pdae", "pixels", "random"}]}``; chance is the majority class's share (0 for R²).
    """
    train_targets, test_targets = probe_targets(train), probe_targets(test)
    f_train, f_test = probe_features(pdae, train.images, seed), probe_features(
        pdae, test.images, seed)
    rows = []
    for name, (y, kind) in train_targets.items():
        y_test = test_targets[name][0]
        if kind == "categorical" and len(np.unique(y)) < 2:
            raise GuidekitError(f"the training split has one value of '{name}' only: "
                                "probe on more images")
        row: dict[str, Any] = {
            "target": name, "kind": kind,
            "metric": "accuracy" if kind == "categorical" else "r2",
            "chance": _majority(y, y_test) if kind == "categorical" else 0.0,
        }
        for feats in f_train:
            row[feats] = _fit_score(f_train[feats], y, f_test[feats], y_test, kind)
        rows.append(row)
    return {"n_train": len(train), "n_test": len(test), "latent_dim": pdae.latent_dim,
            "targets": rows}


def _fit_score(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
               kind: str) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = LogisticRegression(max_iter=2000) if kind == "categorical" else Ridge(alpha=1.0)
    model = make_pipeline(StandardScaler(), head)
    with warnings.catch_warnings():  # held-out score is what counts, converged or not
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return float(model.score(x_test, y_test))


def _majority(y: np.ndarray, y_test: np.ndarray) -> float:
    values, counts = np.unique(y, return_counts=True)
    return float((y_test == values[counts.argmax()]).mean())


def probe_table(result: dict[str, Any], data: str) -> dict[str, list[dict[str, str]]]:
    """The probe's scores as a titled table of formatted rows (``StepReport.tables``)."""
    title = (f"Linear probe on '{data}': fit on {result['n_train']} train images, scored on "
             f"{result['n_test']} test images (z: {result['latent_dim']} dims)")
    columns = {"pdae": "PDAE z", "pixels": "raw pixels", "random": "random encoder",
               "chance": "chance"}
    return {title: [{"target": r["target"], "metric": r["metric"],
                     **{name: f"{r[k]:.3f}" for k, name in columns.items()}}
                    for r in result["targets"]]}
