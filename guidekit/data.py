"""Datasets (digits, procedural shapes, image folders), batching, and image writing.

Every dataset is held in memory as an :class:`ImageData`: images in [-1, 1], channels-first
float32. The built-in datasets need no download: ``digits`` ships inside scikit-learn and
``shapes`` is rendered on the fly.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from guidekit.checkpoint import atomic_path
from guidekit.errors import GuidekitError
from guidekit.grid_labels import check_labels, draw_labels
from guidekit.memory import check_fits
from guidekit.options import check_seed

__all__ = [
    "BUILTIN_DATASETS",
    "COLOURS",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_SIZE",
    "SHAPES",
    "SPLITS",
    "ImageData",
    "check_image_size",
    "check_output_dir",
    "check_png_path",
    "load_digits",
    "load_image_folder",
    "make_shapes",
    "save_image_grid",
    "save_images",
]

SPLITS = ("train", "test")
# The largest image side guidekit reads or builds a model for (ADM's largest is 512).
MAX_IMAGE_SIZE = 4096
# Dataset memory: the float32 images plus one working copy (the resize or the uint8 stack).
_DATA_COPIES = 2
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

DIGITS_TEST_SIZE = 297  # 1797 images in total: 1500 train / 297 test

SHAPES = ("square", "circle", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
_COLOUR_RGB = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.float32
)
SHAPES_DEFAULT_N = {"train": 4096, "test": 1024}
# ``scale`` is half the side of the equal-area square (so area = (2 * scale)^2 for every
# shape). The position range keeps even the largest triangle (apex 1.755 * scale above its
# centre) inside the image, so factors are independent and the centroid equals (x, y).
SHAPES_SCALE_RANGE = (0.08, 0.17)
SHAPES_POS_RANGE = (0.3, 0.7)
_CIRCLE_R = 2.0 / math.sqrt(math.pi)  # radius / scale for equal area
_TRIANGLE_R = 2.0 / math.sqrt(3.0 * math.sqrt(3.0) / 4.0)  # circumradius / scale


@dataclass
class ImageData:
    """An in-memory image dataset: images in [-1, 1], channels-first float32."""

    name: str
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1]
    labels: torch.Tensor | None  # (N,) int64 class labels, or None for unlabelled folders
    num_classes: int  # 0 when unlabelled
    factors: dict[str, torch.Tensor] = field(default_factory=dict)  # each (N,)
    factor_kinds: dict[str, str] = field(default_factory=dict)  # "categorical" | "continuous"

    def __post_init__(self) -> None:
        # Plugins build ImageData too, so catch malformed ones here rather than mid-training.
        if self.images.ndim != 4:
            raise GuidekitError(
                f"dataset '{self.name}' has images of shape {tuple(self.images.shape)}; "
                "build ImageData with images shaped (N, C, H, W)"
            )
        n = self.images.shape[0]
        if self.labels is not None and tuple(self.labels.shape) != (n,):
            raise GuidekitError(
                f"dataset '{self.name}' has labels of shape {tuple(self.labels.shape)} for "
                f"{n} images; give one label per image or labels=None"
            )
        for key, value in self.factors.items():
            if tuple(value.shape) != (n,):
                raise GuidekitError(
                    f"dataset '{self.name}' factor '{key}' has shape {tuple(value.shape)} for "
                    f"{n} images; give one value per image"
                )

    @property
    def image_size(self) -> int:
        """Image height (images are square)."""
        return int(self.images.shape[2])

    @property
    def channels(self) -> int:
        """Number of channels (1 or 3)."""
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])


# --------------------------------------------------------------------------- validation


def check_split(split: str) -> None:
    """A one-line error unless ``split`` is ``train`` or ``test``."""
    if split not in SPLITS:
        raise GuidekitError(f"unknown split '{split}': use 'train' or 'test'")


def _check_positive_int(value: object, what: str, minimum: int = 1) -> int:
    # bool is an int subclass; True as an image size is always a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise GuidekitError(f"{what} must be an integer >= {minimum}, got {value!r}; fix it")
    return int(value)


def check_image_size(value: object, what: str = "image_size", minimum: int = 1) -> int:
    """``value`` as an int when ``minimum`` <= value <= :data:`MAX_IMAGE_SIZE`, else a
    one-line error."""
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
            or not minimum <= value <= MAX_IMAGE_SIZE):
        raise GuidekitError(f"{what} (--image-size) must be an integer from {minimum} to "
                            f"{MAX_IMAGE_SIZE}, got {value!r}: pick a size in that range")
    return int(value)


def _check_fits(count: int, channels: int, size: int, what: str) -> None:
    check_fits(count * channels * size * size * 4 * _DATA_COPIES, "cpu",
               f"{what} ({count} images of {channels}x{size}x{size})", "lower --image-size")


# --------------------------------------------------------------------------- digits


@functools.cache
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # values 0..16 -> [0, 1]
    targets = np.asarray(bunch.target, dtype=np.int64)
    images.flags.writeable = False  # cached: callers get fresh tensors, never this array
    targets.flags.writeable = False
    return images, targets


def load_digits(split: str = "train", image_size: int = 16) -> ImageData:
    """scikit-learn's 8x8 digits, upsampled bilinearly; 1500 train / 297 test, 10 classes."""
    check_split(split)
    size = check_image_size(image_size, "digits image_size", minimum=8)
    images, targets = _digits_raw()
    # Fixed permutation, independent of any user seed, so the test split never changes.
    order = np.random.default_rng(0).permutation(len(images))
    n_train = len(images) - DIGITS_TEST_SIZE
    idx = order[:n_train] if split == "train" else order[n_train:]
    _check_fits(len(idx), 1, size, f"digits {split}")
    x = torch.from_numpy(images[idx].copy()).unsqueeze(1)  # (N, 1, 8, 8)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp_(-1.0, 1.0).contiguous()
    labels = torch.from_numpy(targets[idx].copy())
    return ImageData(name="digits", images=x, labels=labels, num_classes=10)


# --------------------------------------------------------------------------- shapes


def _shapes_rng(seed: int, split: str) -> np.random.Generator:
    # SeedSequence mixes (seed, split) so train and test are distinct, non-overlapping streams.
    return np.random.default_rng([seed, SPLITS.index(split)])


def _render_shapes(
    shape: np.ndarray,
    colour: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    scale: np.ndarray,
    size: int,
) -> np.ndarray:
    """Render (N, 3, size, size) float32 images in [0, 1] on black, vectorised over images.

    Edges are anti-aliased analytically: pixel coverage = clip(0.5 - signed distance in
    pixels, 0, 1), which is smooth and far cheaper than supersampling.
    """
    n = len(shape)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres in [0, 1]
    # Bound the (chunk, size, size) temporaries to ~16 MB each, whatever the image size.
    chunk = max(1, (1 << 22) // (size * size))
    # Outward edge normals of an apex-up equilateral triangle (image y points down).
    angles = np.deg2rad([90.0, 210.0, 330.0])
    normals = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        dx = coords[None, None, :] - x[sl, None, None]  # (b, 1, S)
        dy = coords[None, :, None] - y[sl, None, None]  # (b, S, 1)
        s = scale[sl, None, None]
        kind = shape[sl, None, None]
        square = np.maximum(np.abs(dx), np.abs(dy)) - s
        circle = np.sqrt(dx * dx + dy * dy) - _CIRCLE_R * s
        # Max of the three edge half-plane distances; inradius is half the circumradius.
        triangle = np.maximum.reduce([nx * dx + ny * dy for nx, ny in normals])
        triangle = triangle - 0.5 * _TRIANGLE_R * s
        sdf = np.where(kind == 0, square, np.where(kind == 1, circle, triangle))
        coverage = np.clip(0.5 - sdf * size, 0.0, 1.0).astype(np.float32)  # (b, S, S)
        rgb = _COLOUR_RGB[colour[sl]]  # (b, 3)
        out[sl] = coverage[:, None] * rgb[:, :, None, None]
    return out


def make_shapes(
    split: str = "train", n: int | None = None, seed: int = 0, image_size: int = 32
) -> ImageData:
    """Procedural RGB shapes on black with known factors; labels are the shape (3 classes).

    Factors: ``shape`` (0 square, 1 circle, 2 triangle) and ``colour`` (index into
    :data:`COLOURS`) are categorical int64; ``x``, ``y`` (centre, fraction of the width /
    height, y = 0 at the top) and ``scale`` (half the side of the equal-area square, as a
    fraction of the image side) are continuous float32. Factors depend only on
    (seed, split, n), not on image_size.
    """
    check_split(split)
    size = check_image_size(image_size, "shapes image_size")
    count = SHAPES_DEFAULT_N[split] if n is None else _check_positive_int(n, "shapes n")
    seed = check_seed(seed)
    _check_fits(count, 3, size, f"shapes {split}")
    rng = _shapes_rng(seed, split)
    shape = rng.integers(0, len(SHAPES), size=count)
    colour = rng.integers(0, len(COLOURS), size=count)
    x = rng.uniform(*SHAPES_POS_RANGE, size=count).astype(np.float32)
    y = rng.uniform(*SHAPES_POS_RANGE, size=count).astype(np.float32)
    scale = rng.uniform(*SHAPES_SCALE_RANGE, size=count).astype(np.float32)
    images = _render_shapes(shape, colour, x, y, scale, size) * 2.0 - 1.0
    shape_t = torch.from_numpy(shape.astype(np.int64))
    factors = {
        "shape": shape_t,
        "colour": torch.from_numpy(colour.astype(np.int64)),
        "x": torch.from_numpy(x),
        "y": torch.from_numpy(y),
        "scale": torch.from_numpy(scale),
    }
    kinds = {"shape": "categorical", "colour": "categorical"}
    kinds |= {"x": "continuous", "y": "continuous", "scale": "continuous"}
    return ImageData(
        name="shapes",
        images=torch.from_numpy(images),
        labels=shape_t.clone(),
        num_classes=len(SHAPES),
        factors=factors,
        factor_kinds=kinds,
    )


# --------------------------------------------------------------------------- image folders


def _find_images(root: Path) -> list[Path]:
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        # Hidden files/dirs (.ipynb_checkpoints, macOS "._x.png") are copies or junk.
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image as 8-bit "L": PIL's own convert
    clips these to 0..255, crushing a 16-bit ramp to two or three levels."""
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        levels = a.astype(np.uint32)
    elif im.mode == "I":
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 65535:  # 16-bit samples (older PIL opens 16-bit PNGs as "I")
            levels = a.astype(np.int64)
        else:  # no known range: stretch what is there over 16 bits
            levels = (a.astype(np.float64) - lo) * (65535 / max(hi - lo, 1))
    else:  # "F": [0, 1] when it fits there, else 0..255 like PIL's own 8-bit modes
        f = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 65535.0 if f.size and f.max() <= 1.0 else 257.0
        levels = np.clip(f, 0.0, None) * scale
    out = np.clip(np.rint(np.asarray(levels, dtype=np.float64) / 257.0), 0, 255)
    return Image.fromarray(out.astype(np.uint8), "L")


def _load_one(path: Path, image_size: int, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I") or im.mode == "F":
                im = _to_8bit(im)
            # Palette/alpha images: go through RGBA so transparency is dropped consistently.
            if im.mode in ("P", "PA", "LA", "RGBA") and mode == "RGB":
                im = im.convert("RGBA")
            im = im.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise GuidekitError(f"cannot read image {path}: {exc}; remove it or fix it") from exc
    w, h = im.size
    ratio = image_size / min(w, h)
    new_w, new_h = max(image_size, round(w * ratio)), max(image_size, round(h * ratio))
    im = im.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    im = im.crop((left, top, left + image_size, top + image_size))
    return np.asarray(im, dtype=np.uint8)


def load_image_folder(path: str | Path, image_size: int, channels: int = 3) -> ImageData:
    """Every image under ``path`` (recursive, sorted), short side resized and centre-cropped.

    Files with extensions in :data:`IMAGE_EXTENSIONS` (any case) are used; hidden files and
    folders are skipped. The result is unlabelled.
    """
    size = check_image_size(image_size, "image_size")
    if channels not in (1, 3):
        raise GuidekitError(f"channels must be 1 or 3, got {channels!r}; pick one of them")
    root = Path(path).expanduser()
    if not root.exists():
        raise GuidekitError(f"image folder {root} does not exist; check the path")
    if not root.is_dir():
        raise GuidekitError(f"{root} is not a directory; give a folder that contains images")
    files = _find_images(root)
    if not files:
        raise GuidekitError(
            f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "add images or pick another folder"
        )
    _check_fits(len(files), channels, size, f"image folder {root}")
    mode = "RGB" if channels == 3 else "L"
    arrays = np.stack([_load_one(f, size, mode) for f in files])  # (N, H, W[, 3]) uint8
    if channels == 1:
        arrays = arrays[..., None]
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return ImageData(
        name=root.name or str(root), images=images.contiguous(), labels=None, num_classes=0
    )


# --------------------------------------------------------------------------- built-ins


def _builtin_digits(
    split: str = "train", image_size: int | None = None, seed: int = 0
) -> ImageData:
    del seed  # the digits split is fixed; nothing random to seed
    return load_digits(split, 16 if image_size is None else image_size)


def _builtin_shapes(
    split: str = "train", image_size: int | None = None, seed: int = 0
) -> ImageData:
    return make_shapes(split, seed=seed, image_size=32 if image_size is None else image_size)


# Uniform signature: (split="train", image_size=None -> dataset default, seed=0) -> ImageData.
BUILTIN_DATASETS: dict[str, Callable[..., ImageData]] = {
    "digits": _builtin_digits,
    "shapes": _builtin_shapes,
}


# --------------------------------------------------------------------------- image writing


def _to_uint8(images: torch.Tensor, what: str) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, with validation."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
        raise GuidekitError(f"{what} needs images shaped (N, C, H, W), got {shape}; reshape them")
    if images.shape[1] not in (1, 3):
        raise GuidekitError(
            f"{what} needs 1 or 3 channels, got {images.shape[1]}; convert the images first"
        )
    if images.shape[0] == 0:
        raise GuidekitError(f"{what} got no images; pass at least one")
    x = images.detach().to("cpu", torch.float32)
    # Diverged samples can hold NaN/inf; write them as grey/black/white rather than crash.
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _check_can_create(path: Path, flag: str) -> None:
    """The nearest existing folder above ``path`` must be a folder this process may write."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise GuidekitError(f"{flag} {path}: {parent} is a file, not a folder: choose a path "
                            "under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GuidekitError(f"{flag} {path}: cannot write in {parent} (permission denied): "
                            "choose a writable folder or fix its permissions")


def check_png_path(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a Path when a PNG can be written there (a .png name, not a folder, with
    writable folders above), else a one-line error naming ``flag``: checked before the work
    that makes the image, so a typo does not cost a whole sampling run."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise GuidekitError(f"{flag} {path} is a folder: give a file name like "
                            f"{path / 'samples.png'}")
    if path.suffix.lower() != ".png":
        raise GuidekitError(f"cannot write {path}: images are saved as PNG; use a .png name")
    _check_can_create(path, flag)
    return path


def check_output_dir(path: str | Path, flag: str = "--out-dir") -> Path:
    """``path`` as a Path when it is, or can be made, a folder this process writes in; else a
    one-line error naming ``flag``."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GuidekitError(f"{flag} {path} is a file, not a folder: give a folder (it "
                                "is created when missing)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise GuidekitError(f"{flag} {path}: cannot write in it (permission denied): "
                                "choose a writable folder or fix its permissions")
        return path
    _check_can_create(path, flag)
    return path


def _write_png(array: np.ndarray, path: Path) -> Path:
    """Write an (H, W, C) uint8 array as a PNG atomically."""
    if path.suffix.lower() != ".png":
        raise GuidekitError(f"cannot write {path}: images are saved as PNG; use a .png name")
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def save_image_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int | None = None,
    padding: int = 1,
    scale: int = 1,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write images in [-1, 1], (N, C, H, W) with C in {1, 3}, as one PNG grid.

    ``nrow`` is the number of images per row (default ceil(sqrt(N))); ``padding`` pixels of
    white separate and surround the images; ``scale`` upsamples each image by nearest
    neighbour so tiny images are visible. The grid is
    ``rows * (H * scale + padding) + padding`` pixels high and likewise wide.

    ``row_labels`` (one per row), ``col_labels`` (one per column) and ``title`` are drawn
    into the PNG in dark text on white with Pillow's bundled font: row labels right-aligned
    in a left margin as wide as the longest (at most 200 pixels; longer ones end in an
    ellipsis), column labels centred in a strip above their column (wrapped onto up to three
    lines when wider than the column), the title centred above all. The margins add to the
    size above; the PNG stays greyscale (L) for 1-channel images and RGB for 3-channel ones.
    Without labels or title the grid is exactly as before.
    """
    arr = _to_uint8(images, "save_image_grid")
    path = check_png_path(path, "save_image_grid path")
    n, h, w, c = arr.shape
    per_row = math.ceil(math.sqrt(n)) if nrow is None else _check_positive_int(nrow, "nrow")
    pad = _check_positive_int(padding, "padding", minimum=0)
    up = _check_positive_int(scale, "scale")
    cols = min(per_row, n)
    rows = math.ceil(n / cols)
    rlabels = check_labels(row_labels, rows, "row_labels", "row")
    clabels = check_labels(col_labels, cols, "col_labels", "column")
    if title is not None and not isinstance(title, str):
        raise GuidekitError(f"save_image_grid title must be a string, got "
                            f"{type(title).__name__}; pass text")
    if up > 1:
        arr = arr.repeat(up, axis=1).repeat(up, axis=2)
        h, w = h * up, w * up
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = arr[i]
    heading = " ".join(title.split()) if title else None
    if rlabels is not None or clabels is not None or heading:
        grid = draw_labels(grid, h, w, pad, rlabels, clabels, heading)
    return _write_png(grid, path)


def save_images(images: torch.Tensor, directory: str | Path, prefix: str = "sample") -> list[Path]:
    """Write each image in [-1, 1], (N, C, H, W), as ``{prefix}_{i:05d}.png`` in directory."""
    arr = _to_uint8(images, "save_images")
    out = check_output_dir(directory, "save_images directory")
    return [_write_png(a, out / f"{prefix}_{i:05d}.png") for i, a in enumerate(arr)]
