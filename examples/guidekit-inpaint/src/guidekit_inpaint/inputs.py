"""The two inputs of inpainting: the reference image y and the mask m of its known pixels.

Images are tensors in [−1, 1] shaped (1, C, H, W); masks are {0, 1} tensors shaped
(1, 1, H, W) with 1 = known (kept) and 0 = to be filled. A mask is a PNG (white = known) or
one of the named masks in :data:`MASKS`, whose name says which part is *known*.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from guidekit import GuidekitError, StepReport, load_dataset, save_image_grid
from PIL import Image
from torch import Tensor

# name -> what stays known; the rest is filled by the guided sampler
MASKS: dict[str, str] = {
    "left": "the left half",
    "right": "the right half",
    "top": "the top half",
    "bottom": "the bottom half",
    "center": "the central square (half the side): outpainting",
    "border": "everything but the central square: fill the middle",
}


def named_mask(name: str, size: int) -> Tensor:
    """The named mask of ``size``×``size`` pixels, (1, 1, size, size) in {0, 1}."""
    if name not in MASKS:
        raise GuidekitError(f"unknown mask '{name}': give a PNG or one of {', '.join(MASKS)}")
    rows = torch.arange(size)[:, None].expand(size, size)
    cols = torch.arange(size)[None, :].expand(size, size)
    half, lo, hi = size // 2, size // 4, size - size // 4
    centre = (rows >= lo) & (rows < hi) & (cols >= lo) & (cols < hi)
    known = {
        "left": cols < half,
        "right": cols >= half,
        "top": rows < half,
        "bottom": rows >= half,
        "center": centre,
        "border": ~centre,
    }[name]
    return known.float()[None, None]


def _open(path: Path, what: str, mode: str) -> Image.Image:
    if not path.is_file():
        raise GuidekitError(f"{what} {path} does not exist: give a PNG file")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA", "LA", "RGBA") and mode == "RGB":
                im = im.convert("RGBA")  # drop transparency the same way for every file
            return im.convert(mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GuidekitError(f"cannot read {what} {path} ({reason}): give a PNG file") from None


def image_size_of(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image file at ``path``."""
    return _open(Path(path), "--image", "L").size


def load_image(path: str | Path, channels: int, size: int) -> Tensor:
    """The reference image at ``path`` as (1, channels, size, size) in [−1, 1].

    Grayscale and RGB convert to ``channels``; a square image of another size is resized
    (Lanczos); a non-square image is an error naming the size the DPM expects.
    """
    path = Path(path)
    im = _open(path, "--image", "RGB" if channels == 3 else "L")
    w, h = im.size
    if w != h:
        raise GuidekitError(
            f"--image {path} is {w}x{h} pixels but the DPM makes square {size}x{size} images: "
            f"crop it to a square (it is then resized to {size}x{size})"
        )
    if w != size:
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    arr = np.asarray(im, dtype=np.float32).reshape(size, size, channels)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0)


def load_mask(spec: str | Path, size: int, image_size: tuple[int, int] | None = None) -> Tensor:
    """The mask ``spec`` (a named mask or a PNG, white = known) as (1, 1, size, size) in {0, 1}.

    A PNG mask must have the image file's pixel size ``image_size`` (width, height) when it is
    given; it is resized to ``size`` (box filter) and thresholded at half grey. A mask without
    known pixels is an error: there would be nothing to guide toward.
    """
    text = str(spec)
    if text in MASKS:
        mask = named_mask(text, size)
    else:
        path = Path(text)
        if not path.is_file() and path.suffix.lower() != ".png":
            raise GuidekitError(
                f"--mask '{text}' is neither a PNG file nor a named mask: give a PNG (white = "
                f"known) or one of {', '.join(MASKS)}"
            )
        im = _open(path, "--mask", "L")
        if image_size is not None and im.size != tuple(image_size):
            iw, ih = image_size
            raise GuidekitError(
                f"--mask {path} is {im.size[0]}x{im.size[1]} pixels but --image is {iw}x{ih}: "
                "draw the mask at the image's size"
            )
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BOX)
        arr = np.asarray(im, dtype=np.float32) >= 127.5
        mask = torch.from_numpy(arr.astype(np.float32))[None, None]
    if not bool(mask.any()):
        raise GuidekitError(f"--mask {text} has no known (white) pixels: nothing to guide toward")
    return mask


def masked_view(image: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """``image`` with its unknown pixels set to ``fill`` (mid grey), for figures."""
    return image * mask + fill * (1 - mask)


def prepare_inputs(index: int = 0, mask: str = "left", out: str | Path = "inpaint",
                   data: str = "digits") -> StepReport:
    """Write test image ``index`` of ``data`` and the named ``mask`` (white = known) as
    ``out/image.png`` and ``out/mask.png``; ``metrics`` holds the paths, index and label."""
    test = load_dataset(data, "test")
    if not 0 <= index < len(test):
        raise GuidekitError(f"--index must be in 0..{len(test) - 1} (the {data} test split), "
                            f"got {index}")
    m = load_mask(mask, test.image_size)
    out = Path(out)
    image = save_image_grid(test.images[index : index + 1], out / "image.png", padding=0)
    mask_png = save_image_grid(m * 2 - 1, out / "mask.png", padding=0)
    label = None if test.labels is None else int(test.labels[index])
    result = {"image": str(image), "mask": str(mask_png), "index": index, "label": label}
    known = MASKS.get(mask, mask)
    return StepReport(f"wrote {image} (label {label}) and {mask_png} (known: {known})",
                      images=[image, mask_png], metrics=result)


__all__ = [
    "MASKS",
    "image_size_of",
    "load_image",
    "load_mask",
    "masked_view",
    "named_mask",
    "prepare_inputs",
]
