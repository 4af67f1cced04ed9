"""Sample quality against held-out data in a judge's feature space.

The features are the judge's pooled penultimate vector (the input of its last linear layer),
as MNIST-scale FID work uses a small classifier instead of Inception. Four figures compare a
set of generated images with real ones in that space:

- **FD**, the Fréchet distance between Gaussians fitted to both feature sets (FID's formula,
  not its network: a judge-feature FD is not comparable to an Inception FID);
- **precision / recall** (Kynkäänniemi et al. 2019): the fraction of fake samples inside the
  real manifold, and of real samples inside the fake one, each manifold a union of k-NN balls;
- **density / coverage** (Naeem et al. 2020): how many real k-NN balls hold each fake sample
  on average (divided by k), and the fraction of real balls holding at least one fake sample.

Real FID through torch-fidelity's Inception is :mod:`guidekit_classifier.fid`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from guidekit.data import ImageData, save_image_grid
from guidekit.ddpm import DPM
from guidekit.errors import GuidekitError
from guidekit.guidance import class_labels
from guidekit.lookup import dataset_names, load_dataset
from guidekit.options import check_seed
from guidekit.sampling import GuidanceRequest, sample
from guidekit.specs import StepReport

from .training import LoadedClassifier, predict

__all__ = [
    "check_judge_shape",
    "density_coverage",
    "diversity",
    "evaluate_samples",
    "feature_quality",
    "frechet_distance",
    "held_out_images",
    "judge_features",
    "labelled_held_out",
    "precision_recall",
    "reference_images",
    "sample_quality",
    "save_samples",
]

# Rows of a pairwise-distance block: 1024 x 8192 float64 distances are 64 MiB.
_CHUNK = 1024


# --------------------------------------------------------------------------- features


def _feature_layer(judge: LoadedClassifier) -> tuple[nn.Module, bool]:
    """The judge's last projection (whose input is the feature vector) and whether that
    input is a token sequence (the attention pool's: the pooled token is position 0)."""
    head = judge.model.head
    last = head[-1]
    if isinstance(last, nn.Linear):  # adaptive pool, or the spatial pools' MLP
        return last, False
    proj = getattr(last, "c_proj", None)  # the attention pool: c_proj maps tokens to logits
    if isinstance(proj, nn.Conv1d):
        return proj, True
    raise GuidekitError(f"the judge ({judge.path}) has a '{judge.model.config.pool}' head with "
                        "no final linear layer to take features before: train a judge with "
                        "the default pool")


@torch.no_grad()
def judge_features(judge: LoadedClassifier, x: Tensor, batch_size: int = 256) -> Tensor:
    """The judge's penultimate features (N, D) of images ``x`` in [−1, 1] at t = 0: the
    pooled vector its last linear layer maps to logits (D = the last level's channels for the
    default adaptive pool). float64 on the CPU; batched, no gradients; one network pass."""
    if x.ndim != 4 or tuple(x.shape[1:]) != judge.image_shape:
        shape = "x".join(map(str, judge.image_shape))
        raise GuidekitError(f"the judge ({judge.path}) takes images of shape N x {shape}, "
                            f"got {tuple(x.shape)}: give images of the judge's data")
    if batch_size < 1:
        raise GuidekitError(f"batch_size must be >= 1, got {batch_size}")
    layer, tokens = _feature_layer(judge)
    device = next(judge.model.parameters()).device
    caught: list[Tensor] = []

    def catch(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        h = args[0]
        caught.append((h[:, :, 0] if tokens else h).double().cpu())

    handle = layer.register_forward_pre_hook(catch)
    try:
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device, torch.float32)
            judge.model(xb, torch.zeros(xb.shape[0], dtype=torch.long, device=device))
    finally:
        handle.remove()
    if not caught:
        return torch.empty(0, layer.in_features if isinstance(layer, nn.Linear)
                           else layer.in_channels, dtype=torch.float64)
    return torch.cat(caught)


# --------------------------------------------------------------------------- Fréchet distance


def _check_pair(real: Tensor, fake: Tensor, least: int, what: str) -> tuple[Tensor, Tensor]:
    """Both feature sets as float64 (N, D) with the same D and at least ``least`` rows."""
    for name, f in (("real", real), ("fake", fake)):
        if f.ndim != 2:
            raise GuidekitError(f"{what}: the {name} features must be (N, D), got shape "
                                f"{tuple(f.shape)}")
        if f.shape[0] < least:
            raise GuidekitError(f"{what} needs at least {least} {name} samples, got "
                                f"{f.shape[0]}: give more images")
    if real.shape[1] != fake.shape[1]:
        raise GuidekitError(f"{what}: real features have {real.shape[1]} dimensions but fake "
                            f"ones {fake.shape[1]}: take both from the same network")
    real, fake = real.detach().double().cpu(), fake.detach().double().cpu()
    if not (torch.isfinite(real).all() and torch.isfinite(fake).all()):
        raise GuidekitError(f"{what}: the features hold NaN or inf: check the images")
    return real, fake


def _stats(f: Tensor) -> tuple[Tensor, Tensor]:
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _clean(w: Tensor) -> Tensor:
    """Eigenvalues of a PSD matrix with round-off (|λ| below D·ε·λ_max) set to 0: their
    square roots (~√ε) would otherwise add up to a visible error for singular matrices."""
    tol = w.shape[0] * torch.finfo(w.dtype).eps * w.abs().max().clamp(min=1e-300)
    return torch.where(w > tol, w, torch.zeros_like(w))


def _psd_sqrt(m: Tensor) -> Tensor:
    """The symmetric square root of a symmetric PSD matrix."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * _clean(w).sqrt()) @ v.T


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``real`` and ``fake``
    (N, D): ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^{1/2}), covariances unbiased (N − 1).

    Tr (Σ1Σ2)^{1/2} is taken as Σ √λ over the eigenvalues of the symmetric PSD matrix
    Σ1^{1/2} Σ2 Σ1^{1/2} (similar to Σ1Σ2), round-off eigenvalues (below D·ε·λ_max, negative
    ones included) set to 0, all in float64: stable for singular covariances (fewer samples
    than dimensions).
    """
    real, fake = _check_pair(real, fake, 2, "the Fréchet distance")
    mu1, s1 = _stats(real)
    mu2, s2 = _stats(fake)
    root1 = _psd_sqrt(s1)
    m = root1 @ s2 @ root1
    tr_sqrt = _clean(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    fd = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt
    return max(float(fd), 0.0)  # ≥ 0 in exact arithmetic; round-off may dip below


# --------------------------------------------------------------------------- k-NN manifolds


def _blocks(a: Tensor, b: Tensor) -> Iterator[tuple[int, Tensor]]:
    """(row offset, Euclidean distances of a block of ``a``'s rows to all of ``b``)."""
    for i in range(0, a.shape[0], _CHUNK):
        yield i, torch.cdist(a[i : i + _CHUNK], b)


def _knn_radii(f: Tensor, k: int) -> Tensor:
    """Distance of each row of ``f`` to its k-th nearest other row."""
    radii = []
    for i, d in _blocks(f, f):
        rows = torch.arange(d.shape[0])
        d[rows, rows + i] = 0.0  # itself, exactly: the k-th neighbour is the (k+1)-th value
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


# Closed balls, with slack for round-off: the distance of a centre's k-th neighbour, taken
# again from the other side, may differ in the last bits and must still count as inside.
_SLACK = 1e-9


def _within(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """(P, C) bool: point p lies in the closed ball of centre c."""
    edge = (radii * (1 + _SLACK))[None, :]
    return torch.cat([d <= edge for _, d in _blocks(points, centres)])


def _check_k(k: int, real: Tensor, fake: Tensor, what: str, both: bool) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GuidekitError(f"{what}: k must be an integer >= 1, got {k!r}")
    sets = (("real", real), ("fake", fake)) if both else (("real", real),)
    for name, f in sets:
        if k >= f.shape[0]:
            raise GuidekitError(f"{what}: k = {k} needs more than k {name} samples, got "
                                f"{f.shape[0]}: lower --k or give more images")


def _in_real_balls(real: Tensor, fake: Tensor, k: int) -> Tensor:
    """(M, N) bool: fake sample j lies in real sample i's k-NN ball."""
    return _within(fake, real, _knn_radii(real, k))


def _precision_recall(inside: Tensor, real: Tensor, fake: Tensor, k: int) -> dict[str, float]:
    recall = _within(real, fake, _knn_radii(fake, k)).any(1).double().mean()
    return {"precision": float(inside.any(1).double().mean()), "recall": float(recall)}


def _density_coverage(inside: Tensor, k: int) -> dict[str, float]:
    density = inside.double().sum() / (k * inside.shape[0])
    return {"density": float(density), "coverage": float(inside.any(0).double().mean())}


def precision_recall(real: Tensor, fake: Tensor, k: int = 5) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of feature sets (N, D).

    Each set's manifold is the union of balls around its samples, radius = the distance to
    the k-th nearest neighbour in the same set. ``precision``: fraction of fake samples inside
    the real manifold (are samples realistic?); ``recall``: fraction of real samples inside
    the fake manifold (is the data's variety covered?). Both in [0, 1].
    """
    real, fake = _check_pair(real, fake, 2, "precision/recall")
    _check_k(k, real, fake, "precision/recall", both=True)
    return _precision_recall(_in_real_balls(real, fake, k), real, fake, k)


def density_coverage(real: Tensor, fake: Tensor, k: int = 5) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020) of feature sets (N, D), from k-NN balls
    around the real samples only (so outlier fakes cannot inflate them).

    ``density`` = (1 / kM) Σ_j Σ_i 1[fake_j ∈ B(real_i, r_k(real_i))] over M fakes: about 1
    when fakes are distributed like the reals, above 1 when they crowd dense regions;
    ``coverage`` = fraction of real balls holding at least one fake sample, in [0, 1].
    """
    real, fake = _check_pair(real, fake, 2, "density/coverage")
    _check_k(k, real, fake, "density/coverage", both=False)
    return _density_coverage(_in_real_balls(real, fake, k), k)


# --------------------------------------------------------------------------- images


def feature_quality(real: Tensor, fake: Tensor, k: int = 5) -> dict[str, float]:
    """``{"fd", "precision", "recall", "density", "coverage"}`` of feature sets (N, D); the
    real k-NN balls and which fakes they hold are found once for all four k-NN figures."""
    real, fake = _check_pair(real, fake, 2, "sample quality")
    _check_k(k, real, fake, "sample quality", both=True)
    inside = _in_real_balls(real, fake, k)
    return {"fd": frechet_distance(real, fake), **_precision_recall(inside, real, fake, k),
            **_density_coverage(inside, k)}


def diversity(x: Tensor, classes: Tensor) -> float:
    """Mean pairwise L2 distance between samples of the same class, averaged over classes."""
    flat = x.flatten(1).double()
    per_class = [torch.pdist(flat[classes == c]).mean() for c in classes.unique()
                 if int((classes == c).sum()) > 1]
    if not per_class:
        raise GuidekitError("diversity needs two samples of one class: draw more per class")
    return float(torch.stack(per_class).mean())


def sample_quality(
    judge: LoadedClassifier, real_x: Tensor, fake_x: Tensor, k: int = 5
) -> dict[str, float]:
    """:func:`feature_quality` of generated images ``fake_x`` against real ones ``real_x``
    (both in [−1, 1]) in the judge's feature space (:func:`judge_features`)."""
    return feature_quality(judge_features(judge, real_x), judge_features(judge, fake_x), k)


def check_judge_shape(judge: LoadedClassifier, image_shape: Sequence[int]) -> None:
    """A one-line error unless the judge takes images of ``image_shape`` (C, H, W), the
    DPM's."""
    if tuple(judge.image_shape) != tuple(image_shape):
        have, want = ("x".join(map(str, s)) for s in (judge.image_shape, image_shape))
        raise GuidekitError(f"the judge ({judge.path}) takes {have} images but the DPM makes "
                            f"{want}: train a judge on the DPM's data (guidekit train judge)")


def _subset(images: Tensor, n: int, data: str, seed: int) -> Tensor:
    """``n`` of ``images``, a random subset drawn with ``seed``, in their dataset order."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise GuidekitError(f"the number of held-out images must be an integer >= 1, got {n!r}")
    if images.shape[0] < n:
        raise GuidekitError(f"'{data}' has {images.shape[0]} held-out images, fewer than the "
                            f"{n} asked for: lower --n-real (or --n)")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[order[:n].sort().values]


def reference_images(
    data: str, n: int, image_size: int | None = None, seed: int = 0
) -> Tensor:
    """``n`` held-out images (the test split) of dataset ``data`` in [−1, 1], a random
    subset drawn with ``seed`` (every image when ``n`` is the split's size); a one-line error
    when the split has fewer than ``n``. A folder has no split: its images are used."""
    check_seed(seed)
    return _subset(load_dataset(data, "test", image_size, seed).images, n, str(data), seed)


# --------------------------------------------------------------------------- a DPM's samples


def _data_name(dpm: DPM, data: str | None) -> str:
    """``data``, else the DPM's own dataset when it is a registered one."""
    if data is not None:
        return data
    name = dpm.config.get("data", {}).get("name")
    if isinstance(name, str) and name in dataset_names():
        return name
    raise GuidekitError(f"the DPM was trained on {name!r}, which is not a built-in dataset: "
                        "give the held-out images with --data NAME_OR_FOLDER")


def _held_out(dpm: DPM, name: str, seed: int = 0) -> ImageData:
    """The test split of ``name`` at the DPM's image size; a one-line error unless its images
    are the DPM's shape."""
    data = load_dataset(name, "test", dpm.image_shape[1], seed)
    if tuple(data.images.shape[1:]) != dpm.image_shape:
        raise GuidekitError(f"'{name}' has {'x'.join(map(str, data.images.shape[1:]))} images "
                            f"but the DPM makes {'x'.join(map(str, dpm.image_shape))}: give "
                            "--data of the DPM's kind")
    return data


def held_out_images(dpm: DPM, data: str | None, n: int | None = None, seed: int = 0) -> Tensor:
    """``n`` held-out images (default: all) of ``data`` (default: the DPM's own dataset) at
    the DPM's shape, a random subset drawn with ``seed``."""
    name = _data_name(dpm, data)
    images = _held_out(dpm, name, check_seed(seed)).images
    return images if n is None else _subset(images, n, name, seed)


def labelled_held_out(dpm: DPM, data: str | None, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` held-out images of ``data`` (default: the DPM's dataset) with their
    labels; a one-line error when the dataset has no labels or fewer images."""
    name = _data_name(dpm, data)
    ds = _held_out(dpm, name)
    if ds.labels is None:
        raise GuidekitError(f"'{name}' has no labels for the judge to agree with: use a "
                            "labelled dataset such as digits")
    if len(ds.labels) < n:
        raise GuidekitError(f"'{name}' has {len(ds.labels)} held-out images, fewer than --n "
                            f"{n}: lower --n")
    return ds.images[:n], ds.labels[:n]


def _targets(
    dpm: DPM, judge: LoadedClassifier, n: int, classes: Sequence[int], per_row: bool
) -> tuple[Tensor | None, str]:
    """The class each sample is steered toward, when the judge knows those classes (else
    None), and why not."""
    if not classes and not per_row:
        return None, "no target classes (--class / --class-per-row)"
    k = getattr(getattr(dpm.model, "config", None), "num_classes", None) or judge.num_classes
    if k != judge.num_classes or any(c >= judge.num_classes for c in classes):
        return None, f"the judge knows {judge.num_classes} classes, not the targets'"
    return class_labels(n, k, classes, per_row, "the judge"), ""


def evaluate_samples(
    dpm: DPM,
    judge: LoadedClassifier,
    n: int,
    *,
    data: str | None = None,
    n_real: int | None = None,
    k: int = 5,
    sampler: str = "ddim",
    steps: int | str | None = 50,
    eta: float = 0.0,
    spacing: str | None = None,
    clip_x0: bool | None = None,
    clip_order: str = "clip-then-guide",
    variance: str | None = None,
    guidance: Sequence[GuidanceRequest] = (),
    classes: Sequence[int] = (),
    class_per_row: bool = False,
    seed: int = 0,
    fid_weights: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Sample ``n`` images from ``dpm`` (as :func:`guidekit.sample`, same arguments) and
    score them against ``n_real`` held-out images of ``data`` (default: min(n, the test
    split's size) of the DPM's own dataset) with :func:`sample_quality` in ``judge``'s
    features. The held-out subset and the samples both come from ``seed``: same seed, same
    numbers.

    Returns the figures ``{"fd", "precision", "recall", "density", "coverage"}``, with
    ``"judged_accuracy"`` (the judge's class = the target) and ``"diversity"`` (mean L2
    between samples of one target class) when samples have target classes the judge knows,
    ``"inception_fid"`` with ``fid_weights`` (:mod:`guidekit_classifier.fid`),
    the settings (``"n"``, ``"n_real"``, ``"data"``, ``"k"``, ``"feature_dim"``, ...) and, not
    JSON-serialisable, ``"samples"`` (n, C, H, W) in [−1, 1].
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise GuidekitError(f"--n must be an integer >= 2 (a covariance needs two samples), "
                            f"got {n!r}")
    seed = check_seed(seed)
    check_judge_shape(judge, dpm.image_shape)
    name = _data_name(dpm, data)
    held_out = _held_out(dpm, name, seed).images
    if n_real is None:
        n_real = min(n, held_out.shape[0])
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GuidekitError(f"--k must be an integer >= 1, got {k!r}")
    if k >= min(n, n_real):
        raise GuidekitError(f"--k {k} must be below the number of samples ({n}) and of "
                            f"held-out images ({n_real}): lower --k or raise --n")
    real = _subset(held_out, n_real, name, seed)
    targets, why = _targets(dpm, judge, n, classes, class_per_row)
    inception = None
    if fid_weights is not None:
        from .fid import load_inception

        inception = load_inception(fid_weights, next(judge.model.parameters()).device)
    t0 = time.perf_counter()
    fake = sample(dpm, n, sampler=sampler, steps=steps, eta=eta, guidance=guidance, seed=seed,
                  clip_x0=clip_x0, clip_order=clip_order, variance=variance, spacing=spacing,
                  classes=classes, class_per_row=class_per_row, progress=progress).cpu()
    seconds = time.perf_counter() - t0
    real_f, fake_f = judge_features(judge, real), judge_features(judge, fake)
    result: dict[str, Any] = feature_quality(real_f, fake_f, k)
    if targets is not None:
        judged = predict(judge, fake, 0).argmax(-1)
        result["judged_accuracy"] = float((judged == targets).double().mean())
        if int(targets.bincount().max()) > 1:
            result["diversity"] = diversity(fake, targets)
    if inception is not None:
        from .fid import inception_fid

        result["inception_fid"] = inception_fid(real, fake, inception)
    return {
        **result,
        "n": n, "n_real": n_real, "data": name, "k": k, "feature_dim": real_f.shape[1],
        "sampler": sampler, "steps": steps, "eta": eta, "seed": seed,
        "guidance": [{"name": r.name, "scale": r.scale, "schedule": r.schedule}
                     for r in guidance],
        "accuracy_note": why, "sampling_seconds": round(seconds, 2), "samples": fake,
    }


SAMPLE_METRICS = ("fd", "precision", "recall", "density", "coverage", "judged_accuracy",
                  "diversity", "inception_fid")


def save_samples(result: dict[str, Any], out: Path, nrow: int | None = None,
                 row_labels: Sequence[str] | None = None) -> StepReport:
    """Write :func:`evaluate_samples`' samples as ``out/samples.png`` (``nrow`` per row, rows
    labelled by ``row_labels``); the report of ``guidekit eval samples``: its figures
    (``metrics``, what ``--json`` prints, the samples left out), the table and where the grid
    went."""
    x = result.pop("samples")
    out.mkdir(parents=True, exist_ok=True)
    grid = save_image_grid(x, out / "samples.png", nrow=nrow, scale=max(1, 64 // x.shape[-1]),
                           row_labels=row_labels)
    metrics = {**result, "grid": str(grid)}
    rows = [{"metric": m, "value": f"{result[m]:.4f}"} for m in SAMPLE_METRICS if m in result]
    note = (f"judged accuracy: not reported ({result['accuracy_note']})"
            if result["accuracy_note"] else "")
    label = f"{str(result['sampler']).upper()}-{result['steps']}"
    return StepReport(
        f"grid: {grid}",
        images=[grid],
        tables={f"{label}, judge features": rows},
        metrics=metrics,
        text=f"{result['n']} samples vs {result['n_real']} held-out '{result['data']}' images; "
        f"fd, precision, recall, density, coverage in the judge's {result['feature_dim']}-D "
        f"penultimate features, k = {result['k']} (not comparable to Inception FID)"
        + (f"\n{note}" if note else ""),
    )
