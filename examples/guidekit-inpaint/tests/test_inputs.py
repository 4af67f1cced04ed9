"""Reading the reference image and the mask: conversions, named masks, and every mistake as
one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from guidekit.errors import GuidekitError
from PIL import Image

from guidekit_inpaint import MASKS, load_image, load_mask, named_mask


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def test_named_masks_split_the_image() -> None:
    masks = {name: named_mask(name, 16) for name in MASKS}
    assert all(m.shape == (1, 1, 16, 16) for m in masks.values())
    assert float(masks["left"][..., :8].min()) == 1 and float(masks["left"][..., 8:].max()) == 0
    assert float(masks["top"][..., :8, :].min()) == 1 and float(masks["top"][..., 8:, :].max()) == 0
    assert torch.equal(masks["left"] + masks["right"], torch.ones(1, 1, 16, 16))
    assert torch.equal(masks["top"] + masks["bottom"], torch.ones(1, 1, 16, 16))
    assert torch.equal(masks["center"] + masks["border"], torch.ones(1, 1, 16, 16))
    assert float(masks["center"].sum()) == 64 and float(masks["center"][..., 8, 8]) == 1


def test_images_convert_and_resize(tmp_path: Path) -> None:
    rgb = np.zeros((32, 32, 3))
    rgb[:, :16] = (255, 255, 255)  # left half white
    path = write_png(tmp_path / "rgb.png", rgb)
    x = load_image(path, channels=1, size=16)
    assert x.shape == (1, 1, 16, 16)
    assert float(x[..., 2:6].min()) == pytest.approx(1.0, abs=0.01)  # white, via RGB -> L
    assert float(x[..., 10:].max()) == pytest.approx(-1.0, abs=0.01)  # Lanczos rings a little
    assert load_image(path, channels=3, size=16).shape == (1, 3, 16, 16)


def test_png_masks_threshold_at_half_grey(tmp_path: Path) -> None:
    a = np.zeros((16, 16))
    a[:, :8], a[:, 8:10] = 255, 100  # white: known; dark grey: unknown
    m = load_mask(write_png(tmp_path / "m.png", a), 16, image_size=(16, 16))
    assert torch.equal(m, named_mask("left", 16))


@pytest.mark.parametrize("case,needles", [
    ("missing image", ["--image", "nope.png does not exist"]),
    ("not an image", ["cannot read --image", "give a PNG file"]),
    ("not square", ["is 20x16 pixels", "square 16x16"]),
])
def test_bad_images(tmp_path: Path, case: str, needles: list[str]) -> None:
    path = {
        "missing image": tmp_path / "nope.png",
        "not an image": tmp_path / "text.png",
        "not square": write_png(tmp_path / "wide.png", np.zeros((16, 20))),
    }[case]
    if case == "not an image":
        path.write_text("hello")
    with pytest.raises(GuidekitError) as info:
        load_image(path, 1, 16)
    assert all(n in str(info.value) for n in needles) and "\n" not in str(info.value)


@pytest.mark.parametrize("case,needles", [
    ("unknown name", ["--mask 'diagonal' is neither a PNG file nor a named mask", "left"]),
    ("missing file", ["--mask", "gone.png does not exist"]),
    ("other size", ["is 8x8 pixels but --image is 16x16"]),
    ("all black", ["has no known (white) pixels"]),
])
def test_bad_masks(tmp_path: Path, case: str, needles: list[str]) -> None:
    spec = {
        "unknown name": "diagonal",
        "missing file": str(tmp_path / "gone.png"),
        "other size": str(write_png(tmp_path / "small.png", np.full((8, 8), 255))),
        "all black": str(write_png(tmp_path / "black.png", np.zeros((16, 16)))),
    }[case]
    with pytest.raises(GuidekitError) as info:
        load_mask(spec, 16, image_size=(16, 16))
    assert all(n in str(info.value) for n in needles) and "\n" not in str(info.value)
