"""PDAE as an autoencoder: ``guidekit pdae encode | reconstruct | interpolate | manipulate``.

Every decode is deterministic DDIM (η = 0) on the frozen DPM with PDAE's mean shift
G_ψ(x_t, z, t) as a guidance term at scale 1. "Inferred x_T" is DDIM inversion of x_0 with the
same shift on, as in the paper; x̂_0 is not clipped there, so inversion and decoding are exact
inverses. Decodes from a random x_T clip x̂_0 to [−1, 1] as ``guidekit sample`` does: on the
quickstart DPM that saves some samples that otherwise saturate. The commands live in
:mod:`guidekit_pdae.cli`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from guidekit import GuidanceTerm, GuidekitError, ImageData, Sampler, load_dataset, save_image_grid
from guidekit.data import load_image_folder
from guidekit.engine import respacing
from guidekit.lookup import dataset_names

from .guidance import PDAEGuidance, save_latents
from .metrics import load_lpips, mse, ssim
from .training import KIND, LoadedPDAE, check_data

XT_CHOICES = ("inferred", "random", "both")
INTERP_MODES = ("z", "shift", "both")
GRID_COLUMNS = 16  # reconstruction grids show the first 16 images
GRID_SCALE = 4


# --------------------------------------------------------------------------- building blocks


def load_images(
    pdae: LoadedPDAE, data: str, split: str, image_size: int | None = None
) -> ImageData:
    """A split of a dataset, or every image of a folder, checked against the DPM's image
    shape. Folders have no size or colour of their own: they load as the DPM takes them."""
    c, s, _ = pdae.dpm.image_shape
    folder = Path(data).expanduser()
    if data not in dataset_names() and folder.is_dir():
        images = load_image_folder(folder, image_size or s, channels=c)
    else:
        images = load_dataset(data, split, image_size)
    check_data(pdae.dpm, images, pdae.config["pretrained"]["path"])
    return images


def ddim_sampler(pdae: LoadedPDAE, steps: int, clip: bool = False) -> Sampler:
    """DDIM over ``steps`` of the T training steps (laid out as the DPM's defaults say, else
    ``ddimK``); ``clip`` clamps x̂_0 (off for inversion and its decode, which must mirror each
    other)."""
    pdae.require_unconditional("DDIM inversion and decoding with PDAE")
    return pdae.dpm.sampler(steps=respacing("ddim", steps, pdae.dpm.defaults.spacing),
                            clip_x0=clip)


def shift_terms(
    pdae: LoadedPDAE, latents: Tensor | list[Tensor], weights: Tensor | None = None
) -> list[GuidanceTerm]:
    """PDAE's mean shift for ``latents`` as the one guidance term, scale 1."""
    return [GuidanceTerm(PDAEGuidance(pdae, latents, weights), 1.0, None, KIND)]


def infer_xT(
    pdae: LoadedPDAE, sampler: Sampler, x0: Tensor, z: Tensor | None, progress: bool = False
) -> Tensor:
    """DDIM inversion of x_0: with PDAE's shift for latents ``z``, or of the bare DPM (None)."""
    terms = [] if z is None else shift_terms(pdae, z)
    return sampler.invert(x0.to(pdae.device), guidance=terms, progress=progress)


def decode(
    sampler: Sampler, x_T: Tensor, terms: list[GuidanceTerm], progress: bool = False
) -> Tensor:
    """Deterministic DDIM x_T → x_0, clamped to [−1, 1]."""
    return sampler.ddim(x_T, guidance=terms, progress=progress).clamp(-1, 1)


def random_xT(pdae: LoadedPDAE, n: int, seed: int) -> Tensor:
    gen = torch.Generator(pdae.device).manual_seed(seed)
    return torch.randn((n, *pdae.dpm.image_shape), generator=gen, device=pdae.device)


def to_unit(x: Tensor) -> Tensor:
    """[−1, 1] → [0, 1], the scale every metric here reports on."""
    return ((x.detach().float().cpu() + 1) / 2).clamp(0, 1)


# --------------------------------------------------------------------------- encode


def encode_images(pdae: LoadedPDAE, images: ImageData, out: str | Path) -> dict[str, Any]:
    """z = E_φ(x_0) of every image, written as safetensors tagged with the PDAE's fingerprint."""
    z = pdae.encode(images.images).cpu()
    path = save_latents(z, out, pdae)
    return {"out": str(path), "n": len(z), "latent_dim": pdae.latent_dim,
            "fingerprint": pdae.fingerprint, "data": images.name,
            "z_mean_norm": round(float(z.norm(dim=1).mean()), 4)}


# --------------------------------------------------------------------------- reconstruct


def reconstruct(
    pdae: LoadedPDAE,
    x0: Tensor,
    *,
    steps: int = 100,
    xT: str = "both",
    seed: int = 0,
    lpips_files: tuple[str | Path, str | Path] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Reconstruct held-out images ``x0`` (N, C, H, W) in [−1, 1] by each method of ``xT``.

    inferred: x_T from DDIM inversion with PDAE's shift for z = E_φ(x_0), decoded with the same
    shift, against DDIM inversion + decoding of the bare DPM. random: x_T ~ N(0, I) (seeded),
    decoded (x̂_0 clipped) with the shift, against the same x_T decoded unguided. Returns
    ``{"steps", "n", "xT", "seed", "methods": [{"method", "latent_dim", "ssim", "lpips",
    "mse"}]}`` (SSIM and MSE on images in [0, 1]; LPIPS None without ``lpips_files``) and, not
    JSON, ``"images"``: method → reconstructions.
    """
    if xT not in XT_CHOICES:
        raise GuidekitError(f"unknown --xT '{xT}': choose inferred, random or both")
    lpips = load_lpips(*lpips_files) if lpips_files is not None else None
    sampler = ddim_sampler(pdae, steps)
    x0 = x0.to(pdae.device)
    c, h, w = x0.shape[1:]
    pixels, dim = c * h * w, pdae.latent_dim
    z = pdae.encode(x0)
    out: dict[str, Tensor] = {}
    if xT in ("inferred", "both"):
        out["DDIM (inferred x_T)"] = decode(sampler, infer_xT(pdae, sampler, x0, None, progress),
                                            [], progress)
        terms = shift_terms(pdae, z)
        out["PDAE (inferred x_T)"] = decode(sampler, infer_xT(pdae, sampler, x0, z, progress),
                                            terms, progress)
    if xT in ("random", "both"):
        noise, clipped = random_xT(pdae, len(x0), seed), ddim_sampler(pdae, steps, clip=True)
        out["PDAE (random x_T)"] = decode(clipped, noise, shift_terms(pdae, z), progress)
        out["DDIM (random x_T)"] = decode(clipped, noise, [], progress)
    # what each method keeps of the image: x_T (C·H·W numbers), z, both, or nothing
    dims = {"DDIM (inferred x_T)": pixels, "PDAE (inferred x_T)": dim + pixels,
            "PDAE (random x_T)": dim, "DDIM (random x_T)": 0}
    ref = to_unit(x0)
    rows = []
    for name, x in out.items():
        rec = to_unit(x)
        rows.append({
            "method": name, "latent_dim": dims[name],
            "ssim": float(ssim(ref, rec).mean()),
            "lpips": None if lpips is None else float(lpips(ref, rec).mean()),
            "mse": float(mse(ref, rec).mean()),
        })
    return {"steps": steps, "n": len(x0), "xT": xT, "seed": seed, "methods": rows,
            "images": {k: v.cpu() for k, v in out.items()}}


def reconstruction_grid(x0: Tensor, images: dict[str, Tensor], path: str | Path,
                        title: str | None = None) -> Path:
    """Rows: the originals, then each method's reconstructions (first 16 images), each row
    labelled in the PNG with its method."""
    cols = min(GRID_COLUMNS, len(x0))
    rows = [x0[:cols].cpu()] + [x[:cols] for x in images.values()]
    return save_image_grid(torch.cat(rows), path, nrow=cols, scale=GRID_SCALE,
                           row_labels=["original", *images], title=title)


def reconstruction_table(result: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """The result as a titled table of formatted rows (``StepReport.tables``)."""
    title = (f"Reconstruction of {result['n']} held-out images, DDIM-{result['steps']} "
             "(SSIM, MSE on [0, 1])")
    rows = [{"method": r["method"], "latent dim": f"{r['latent_dim']:,}",
             "SSIM ↑": f"{r['ssim']:.4f}",
             "LPIPS ↓": "-" if r["lpips"] is None else f"{r['lpips']:.3f}",
             "MSE ↓": f"{r['mse']:.2e}"} for r in result["methods"]]
    return {title: rows}


# --------------------------------------------------------------------------- interpolate


def slerp(a: Tensor, b: Tensor, lam: Tensor) -> Tensor:
    """Spherical interpolation of two tensors of one shape at each λ, (F, *a.shape);
    linear where they are (anti)parallel."""
    fa, fb = a.flatten().double(), b.flatten().double()
    cos = (fa @ fb / (fa.norm() * fb.norm()).clamp(min=1e-12)).clamp(-1, 1)
    theta = torch.arccos(cos)
    lam = lam.double().to(a.device)[:, None]
    if float(theta.sin().abs()) < 1e-6:
        out = (1 - lam) * fa + lam * fb
    else:
        out = (torch.sin((1 - lam) * theta) * fa + torch.sin(lam * theta) * fb) / theta.sin()
    return out.to(a.dtype).view(len(lam), *a.shape)


def interpolate(
    pdae: LoadedPDAE,
    xa: Tensor,
    xb: Tensor,
    *,
    modes: Sequence[str] = ("z", "shift"),
    frames: int = 7,
    steps: int = 100,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Decode ``frames`` points between two images (C, H, W) in [−1, 1], λ from 0 to 1.

    x_T(λ) = slerp of the two inferred x_T (each inverted with its own shift); the shift is
    G_ψ(x_t, lerp(z_a, z_b; λ), t) (``z``) or lerp(G_ψ(x_t, z_a, t), G_ψ(x_t, z_b, t); λ)
    (``shift``). Returns mode → (frames, C, H, W).
    """
    if frames < 2:
        raise GuidekitError(f"--frames must be >= 2, got {frames}")
    for m in modes:
        if m not in ("z", "shift"):
            raise GuidekitError(f"unknown --mode '{m}': choose z, shift or both")
    sampler = ddim_sampler(pdae, steps)
    x0 = torch.stack([xa, xb]).to(pdae.device)
    z = pdae.encode(x0)
    x_T = infer_xT(pdae, sampler, x0, z, progress)
    lam = torch.linspace(0, 1, frames, device=pdae.device)
    x_Tl = slerp(x_T[0], x_T[1], lam)
    out = {}
    for mode in modes:
        if mode == "z":
            terms = shift_terms(pdae, torch.lerp(z[:1], z[1:], lam[:, None]))
        else:
            both = [z[:1].expand(frames, -1), z[1:].expand(frames, -1)]
            terms = shift_terms(pdae, both, torch.stack([1 - lam, lam], dim=1))
        out[mode] = decode(sampler, x_Tl, terms, progress).cpu()
    return out


INTERP_ROW_LABELS = {"z": "lerp z", "shift": "lerp G_ψ"}


def interpolation_grid(
    xa: Tensor, xb: Tensor, frames: dict[str, Tensor], path: str | Path,
    title: str | None = None,
) -> Path:
    """One row per mode (labelled lerp z / lerp G_ψ): image a, the frames, image b; the
    columns are labelled a, λ = 0 … 1, b."""
    rows = [torch.cat([xa[None].cpu(), f, xb[None].cpu()]) for f in frames.values()]
    count = len(rows[0]) - 2
    lams = [f"λ={i / (count - 1):.2g}" for i in range(count)] if count > 1 else ["λ=0"]
    return save_image_grid(torch.cat(rows), path, nrow=len(rows[0]), scale=GRID_SCALE,
                           row_labels=[INTERP_ROW_LABELS.get(m, m) for m in frames],
                           col_labels=["a", *lams, "b"], title=title)


# --------------------------------------------------------------------------- manipulate


@dataclass
class Direction:
    """A unit direction w in normalised latent space ((z − mean)/std) for ``label``."""

    label: int
    mean: Tensor  # (D,)
    std: Tensor  # (D,)
    w: Tensor  # (D,), unit norm
    coef: Tensor  # (D,), the probe's weights (w before normalising)
    intercept: float
    train_accuracy: float

    def edit(self, z: Tensor, scale: float) -> Tensor:
        """z' = z + s·w in normalised space, mapped back to raw z: z + s·std·w."""
        return z + scale * (self.std * self.w).to(z.device, z.dtype)

    def accuracy(self, z: Tensor, labels: Tensor) -> float:
        """Accuracy of the probe's decision "label == N" on latents ``z`` with ``labels``."""
        zn = (z.detach().cpu().float() - self.mean) / self.std
        guess = zn @ self.coef + self.intercept > 0
        return float((guess == (labels.cpu() == self.label)).float().mean())


def fit_direction(z: Tensor, labels: Tensor, label: int, seed: int = 0) -> Direction:
    """Logistic regression "label == N" on normalised z; w = its unit-norm weight vector."""
    from sklearn.linear_model import LogisticRegression

    y = (labels == label).cpu().numpy()
    if not y.any() or y.all():
        raise GuidekitError(f"the training split has {'no' if not y.any() else 'only'} "
                            f"images of label {label}: pick a label it has beside others")
    z = z.detach().double().cpu()
    mean, std = z.mean(0), z.std(0).clamp(min=1e-8)
    zn = ((z - mean) / std).numpy()
    # balanced: label N is about 1 in 10, and the direction should separate, not count
    probe = LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed)
    probe.fit(zn, y)
    coef = torch.from_numpy(np.asarray(probe.coef_[0], dtype=np.float32))
    return Direction(label, mean.float(), std.float(), coef / coef.norm(), coef,
                     float(probe.intercept_[0]), float(probe.score(zn, y)))


def manipulate(
    pdae: LoadedPDAE,
    judge: Any,
    x0: Tensor,
    direction: Direction,
    scales: Sequence[float],
    *,
    steps: int = 100,
    progress: bool = False,
) -> dict[str, Any]:
    """Edit images ``x0`` along ``direction`` at each scale and judge the edits.

    Each image is inverted once with its own z; every edit decodes that x_T with the shift of
    z + s·std·w. Returns ``{"label", "n", "steps", "train_accuracy", "scales": [{"scale",
    "p_label", "rose"}]}`` (``rose``: the fraction of images whose judged p(label) beats the
    unedited reconstruction's, s = 0) and, not JSON, ``"images"``: (N, S, C, H, W).
    """
    from guidekit_classifier.training import predict

    if not scales:
        raise GuidekitError("give at least one --scales value")
    sampler = ddim_sampler(pdae, steps)
    x0 = x0.to(pdae.device)
    z = pdae.encode(x0)
    x_T = infer_xT(pdae, sampler, x0, z, progress)
    need = sorted(set(map(float, scales)) | {0.0})
    edits = {s: decode(sampler, x_T, shift_terms(pdae, direction.edit(z, s)), progress).cpu()
             for s in need}
    p = {s: predict(judge, x, 0)[:, direction.label] for s, x in edits.items()}
    rows = [{"scale": float(s), "p_label": float(p[s].mean()),
             "rose": float((p[s] > p[0.0]).float().mean())} for s in map(float, scales)]
    return {
        "label": direction.label, "n": len(x0), "steps": steps,
        "train_accuracy": round(direction.train_accuracy, 4),
        "p_label_original": float(predict(judge, x0.cpu(), 0)[:, direction.label].mean()),
        "scales": rows,
        "images": torch.stack([edits[float(s)] for s in scales], dim=1),
    }


def edit_held_out(
    pdae: LoadedPDAE,
    judge: Any,
    train: ImageData,
    test: ImageData,
    label: int,
    scales: Sequence[float],
    *,
    n: int = 16,
    steps: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit the direction of ``label`` on the training split's latents, then :func:`manipulate`
    the first ``n`` test images of another label. Adds the probe's held-out accuracy and, not
    JSON, ``"originals"``."""
    if train.labels is None or test.labels is None:
        raise GuidekitError(f"dataset '{train.name}' has no labels: manipulate needs a "
                            "labelled dataset such as digits")
    if not 0 <= label < train.num_classes:
        raise GuidekitError(f"--label {label} is not a class of '{train.name}' "
                            f"(0..{train.num_classes - 1})")
    if judge.image_shape != pdae.dpm.image_shape or label >= judge.num_classes:
        shape = "x".join(map(str, judge.image_shape))
        raise GuidekitError(f"the judge at {judge.path} takes {shape} images of "
                            f"{judge.num_classes} classes: train one on '{train.name}'")
    direction = fit_direction(pdae.encode(train.images), train.labels, label, seed)
    x0 = test.images[test.labels != label][:n]
    if not len(x0):
        raise GuidekitError(f"the test split has no images of a label other than {label}")
    result = manipulate(pdae, judge, x0, direction, scales, steps=steps, progress=progress)
    result["test_accuracy"] = round(direction.accuracy(pdae.encode(test.images),
                                                       test.labels), 4)
    result["originals"] = x0.cpu()
    return result


def manipulation_grid(originals: Tensor, edits: Tensor, scales: Sequence[float],
                      path: str | Path, title: str | None = None) -> Path:
    """One row per image: the original, then its edit at each scale (``edits``: (N, S, C, H,
    W)); the columns are labelled original, s = …."""
    images = torch.cat([originals.cpu()[:, None], edits.cpu()], dim=1).flatten(0, 1)
    return save_image_grid(images, path, nrow=len(scales) + 1, scale=GRID_SCALE,
                           col_labels=["original", *(f"s={float(s):g}" for s in scales)],
                           title=title)


def manipulation_table(result: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """The result as a titled table of formatted rows (``StepReport.tables``)."""
    title = (f"Editing {result['n']} held-out non-{result['label']} images along the "
             f"'{result['label']}' direction (linear probe accuracy: train "
             f"{result['train_accuracy']:.3f}, test {result.get('test_accuracy', 0):.3f})")
    judged = f"judged p(label {result['label']})"
    rows = [{"scale": f"{r['scale']:g}", judged: f"{r['p_label']:.3f}",
             "fraction rising vs s=0": f"{r['rose']:.3f}"} for r in result["scales"]]
    return {title: rows}


def pick_image(data: ImageData, index: int, flag: str) -> Tensor:
    """Image ``index`` of ``data``; out of range is a one-line error naming ``flag``."""
    if not 0 <= index < len(data):
        raise GuidekitError(f"{flag} {index} is out of range: '{data.name}' has {len(data)} "
                            f"images in this split (0..{len(data) - 1})")
    return data.images[index]
