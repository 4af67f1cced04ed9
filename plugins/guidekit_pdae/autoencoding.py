"""PDAE as an autoencoder: ``guidekit pdae encode | reconstruct | interpolate | manipulate``.

Every decode is deterministic DDIM (η = 0) on the frozen DPM with PDAE's mean shift
G_ψ(x_t, z, t) as a guidance term at scale 1. "Inferred x_T" is DDIM inversion of x_0 with the
same shift on, as in the paper; x̂_0 is not clipped there, so inversion and decoding are exact
inverses. Decodes from a random x_T clip x̂_0 to [−1, 1] as ``guidekit sample`` does: on the
quickstart DPM that saves some samples that otherwise saturate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer
from rich.table import Table
from torch import Tensor

from guidekit.data import ImageData, load_dataset, load_image_folder, save_image_grid
from guidekit.engine import Sampler
from guidekit.errors import GuidekitError
from guidekit.guidance import GuidanceTerm
from guidekit.plugins import get_registry
from guidekit.trainer_options import report

from .guidance import PDAEGuidance, save_latents
from .metrics import load_lpips, mse, ssim
from .options import DATA_OPT, DEVICE_OPT, JSON_OPT, PDAE_OPT, PRETRAINED_OPT, SIZE_OPT
from .training import KIND, LoadedPDAE, check_data, load_pdae

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
    if data not in get_registry().names("dataset") and folder.is_dir():
        images = load_image_folder(folder, image_size or s, channels=c)
    else:
        images = load_dataset(data, split, image_size)
    check_data(pdae.dpm, images, pdae.config["pretrained"]["path"])
    return images


def ddim_sampler(pdae: LoadedPDAE, steps: int, clip: bool = False) -> Sampler:
    """DDIM over ``steps`` of the T training steps (``ddimK`` respacing); ``clip`` clamps x̂_0
    (off for inversion and its decode, which must mirror each other)."""
    if steps < 1:
        raise GuidekitError(f"--steps must be >= 1, got {steps}")
    return pdae.dpm.sampler(steps=f"ddim{steps}", clip_x0=clip)


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


def reconstruction_grid(x0: Tensor, images: dict[str, Tensor], path: str | Path) -> Path:
    """Rows: the originals, then each method's reconstructions (first 16 images)."""
    cols = min(GRID_COLUMNS, len(x0))
    rows = [x0[:cols].cpu()] + [x[:cols] for x in images.values()]
    return save_image_grid(torch.cat(rows), path, nrow=cols, scale=GRID_SCALE)


def reconstruction_table(result: dict[str, Any]) -> Table:
    table = Table("method", "latent dim", "SSIM ↑", "LPIPS ↓", "MSE ↓",
                  title=f"Reconstruction of {result['n']} held-out images, DDIM-"
                  f"{result['steps']} (SSIM, MSE on [0, 1])")
    for r in result["methods"]:
        lp = "-" if r["lpips"] is None else f"{r['lpips']:.3f}"
        table.add_row(r["method"], f"{r['latent_dim']:,}", f"{r['ssim']:.4f}", lp,
                      f"{r['mse']:.2e}")
    return table


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


def interpolation_grid(
    xa: Tensor, xb: Tensor, frames: dict[str, Tensor], path: str | Path
) -> Path:
    """One row per mode: image a, the frames, image b."""
    rows = [torch.cat([xa[None].cpu(), f, xb[None].cpu()]) for f in frames.values()]
    return save_image_grid(torch.cat(rows), path, nrow=len(rows[0]), scale=GRID_SCALE)


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


def manipulation_table(result: dict[str, Any]) -> Table:
    table = Table("scale", f"judged p(label {result['label']})", "fraction rising vs s=0",
                  title=f"Editing {result['n']} held-out non-{result['label']} images along "
                  f"the '{result['label']}' direction (linear probe accuracy: train "
                  f"{result['train_accuracy']:.3f}, test {result.get('test_accuracy', 0):.3f})")
    for r in result["scales"]:
        table.add_row(f"{r['scale']:g}", f"{r['p_label']:.3f}", f"{r['rose']:.3f}")
    return table


def parse_scales(text: str) -> list[float]:
    """``"-2,-1,0,1,2"`` -> floats; anything else is a one-line error."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise GuidekitError(f"--scales must be comma-separated numbers like -2,-1,0,1,2, "
                            f"got '{text}'")
    return values


# --------------------------------------------------------------------------- commands


def _pick(data: ImageData, index: int, flag: str) -> Tensor:
    if not 0 <= index < len(data):
        raise GuidekitError(f"{flag} {index} is out of range: '{data.name}' has {len(data)} "
                            f"images in this split (0..{len(data) - 1})")
    return data.images[index]


STEPS_OPT = typer.Option(100, help="DDIM steps (ddimK respacing of the T training steps).")


def encode_command(
    pdae: Path = PDAE_OPT,
    pretrained: Path = PRETRAINED_OPT,
    data: str = DATA_OPT,
    split: str = typer.Option("test", help="train or test (a folder is used whole)."),
    out: Path = typer.Option(Path("latents.safetensors"), help="Latent file to write."),
    image_size: int = SIZE_OPT,
    device: str = DEVICE_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Encode every image of a split: z = E_φ(x_0), for `--guidance pdae --latents`."""
    model = load_pdae(pdae, pretrained, device)
    summary = encode_images(model, load_images(model, data, split, image_size), out)
    report(summary, json_out, f"wrote {summary['n']} latents ({summary['latent_dim']}-d) of "
           f"{data}/{split} -> {summary['out']}")


def reconstruct_command(
    pdae: Path = PDAE_OPT,
    pretrained: Path = PRETRAINED_OPT,
    data: str = DATA_OPT,
    split: str = typer.Option("test", help="Held-out split to reconstruct."),
    n: int = typer.Option(64, help="Number of images (the first N of the split)."),
    steps: int = STEPS_OPT,
    xT: str = typer.Option("both", "--xT", help="inferred (DDIM inversion), random "
                           "(x_T ~ N(0, I)) or both."),
    seed: int = typer.Option(0, help="Seed of the random x_T."),
    out_dir: Path = typer.Option(Path("runs/pdae_reconstruct"), help="Where grid.png goes."),
    lpips_alexnet: Path = typer.Option(None, help="torchvision's alexnet-owt-7be5be79.pth "
                                       "(for LPIPS)."),
    lpips_linear: Path = typer.Option(None, help="LPIPS v0.1's alex.pth (for LPIPS)."),
    image_size: int = SIZE_OPT,
    device: str = DEVICE_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Autoencode held-out images; SSIM, MSE (images in [0, 1]) and LPIPS per method, and a
    grid: originals, then one row per method."""
    if n < 1:
        raise GuidekitError(f"--n must be >= 1, got {n}")
    if xT not in XT_CHOICES:
        raise GuidekitError(f"unknown --xT '{xT}': choose inferred, random or both")
    files = None
    if lpips_alexnet is not None or lpips_linear is not None:
        load_lpips(lpips_alexnet, lpips_linear)  # a missing one fails before any sampling
        files = (lpips_alexnet, lpips_linear)
    model = load_pdae(pdae, pretrained, device)
    x0 = load_images(model, data, split, image_size).images[:n]
    result = reconstruct(model, x0, steps=steps, xT=xT, seed=seed, lpips_files=files,
                         progress=not json_out)
    grid = reconstruction_grid(x0, result.pop("images"), out_dir / "grid.png")
    result["grid"] = str(grid)
    rows = ", ".join(["originals", *(r["method"] for r in result["methods"])])
    report(result, json_out, reconstruction_table(result), f"grid (rows: {rows}): {grid}")


def interpolate_command(
    pdae: Path = PDAE_OPT,
    pretrained: Path = PRETRAINED_OPT,
    data: str = DATA_OPT,
    split: str = typer.Option("test", help="Split the two images come from."),
    a: int = typer.Option(0, help="Index of the first image."),
    b: int = typer.Option(1, help="Index of the second image."),
    mode: str = typer.Option("both", help="z (lerp z), shift (lerp G_ψ) or both."),
    frames: int = typer.Option(7, help="Interpolation points, ends included."),
    steps: int = STEPS_OPT,
    out: Path = typer.Option(Path("runs/pdae_interpolate.png"), help="PNG grid to write."),
    image_size: int = SIZE_OPT,
    device: str = DEVICE_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Interpolate between two images: slerp of inferred x_T, lerp of z or of the shift.
    Grid: one row per mode, image a, the frames, image b."""
    if mode not in INTERP_MODES:
        raise GuidekitError(f"unknown --mode '{mode}': choose z, shift or both")
    modes = ("z", "shift") if mode == "both" else (mode,)
    model = load_pdae(pdae, pretrained, device)
    images = load_images(model, data, split, image_size)
    xa, xb = _pick(images, a, "--a"), _pick(images, b, "--b")
    result = interpolate(model, xa, xb, modes=modes, frames=frames, steps=steps,
                         progress=not json_out)
    grid = interpolation_grid(xa, xb, result, out)
    summary = {"grid": str(grid), "a": a, "b": b, "modes": list(modes), "frames": frames,
               "steps": steps}
    report(summary, json_out, f"grid (rows: {', '.join(modes)}; image a, {frames} frames, "
           f"image b): {grid}")


def manipulate_command(
    pdae: Path = PDAE_OPT,
    pretrained: Path = PRETRAINED_OPT,
    data: str = DATA_OPT,
    label: int = typer.Option(..., help="The attribute: images of this label."),
    scales: str = typer.Option("-2,-1,0,1,2", help="Edit scales s (z' = z + s·w, w unit in "
                               "normalised z)."),
    judge: Path = typer.Option(..., help="A clean judge (guidekit train judge)."),
    n: int = typer.Option(16, help="Held-out images (label != N) to edit."),
    steps: int = STEPS_OPT,
    seed: int = typer.Option(0, help="Seed of the logistic regression."),
    out_dir: Path = typer.Option(Path("runs/pdae_manipulate"), help="Where grid.png goes."),
    image_size: int = SIZE_OPT,
    device: str = DEVICE_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Attribute manipulation: a linear probe on z finds the direction of a label; edit
    held-out images along it and let a judge say whether they moved toward it. Grid: one row
    per image, the original, then one column per scale."""
    from guidekit_classifier.training import JUDGE_KIND, load_classifier

    scale_list = parse_scales(scales)
    if n < 1:
        raise GuidekitError(f"--n must be >= 1, got {n}")
    model = load_pdae(pdae, pretrained, device)
    train = load_images(model, data, "train", image_size)
    test = load_images(model, data, "test", image_size)
    jdg = load_classifier(judge, JUDGE_KIND, device)
    result = edit_held_out(model, jdg, train, test, label, scale_list, n=n, steps=steps,
                           seed=seed, progress=not json_out)
    edits = result.pop("images")
    grid_images = torch.cat([result.pop("originals")[:, None], edits], dim=1).flatten(0, 1)
    grid = save_image_grid(grid_images, out_dir / "grid.png", nrow=len(scale_list) + 1,
                           scale=GRID_SCALE)
    result["grid"] = str(grid)
    report(result, json_out, manipulation_table(result),
           f"grid (rows: images; columns: original, s = {scales}): {grid}")


def register(app: typer.Typer) -> None:
    app.command("encode")(encode_command)
    app.command("reconstruct")(reconstruct_command)
    app.command("interpolate")(interpolate_command)
    app.command("manipulate")(manipulate_command)
