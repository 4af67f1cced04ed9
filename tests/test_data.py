"""Tests for guidekit.data: datasets, batching, and image writing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from guidekit.data import (
    BUILTIN_DATASETS,
    COLOURS,
    ImageData,
    load_digits,
    load_image_folder,
    make_shapes,
    save_image_grid,
    save_images,
)
from guidekit.errors import GuidekitError
from guidekit.lookup import load_dataset

# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_train() -> ImageData:
    return load_digits("train")


def test_digits_shapes_range_and_labels(digits_train: ImageData) -> None:
    test = load_digits("test")
    assert digits_train.images.shape == (1500, 1, 16, 16)
    assert test.images.shape == (297, 1, 16, 16)
    for d in (digits_train, test):
        assert d.images.dtype == torch.float32
        assert d.images.min() >= -1.0 and d.images.max() <= 1.0
        assert d.labels is not None and d.labels.dtype == torch.int64
        assert set(d.labels.tolist()) == set(range(10))
        assert d.num_classes == 10 and d.image_size == 16 and d.channels == 1
    # Background is black and strokes reach full white.
    assert digits_train.images.min() == -1.0 and digits_train.images.max() > 0.9


def test_digits_split_deterministic(digits_train: ImageData) -> None:
    again = load_digits("train")
    assert torch.equal(digits_train.images, again.images)
    assert torch.equal(digits_train.labels, again.labels)
    assert len(load_digits("test")) + len(digits_train) == 1797


def test_digits_image_size() -> None:
    d = load_digits("test", image_size=8)
    assert d.images.shape == (297, 1, 8, 8)
    # Values at 8x8 are exactly the original 0..16 levels.
    levels = (d.images + 1) / 2 * 16
    assert torch.allclose(levels, levels.round(), atol=1e-5)
    with pytest.raises(GuidekitError, match="image_size"):
        load_digits(image_size=4)
    with pytest.raises(GuidekitError, match="split"):
        load_digits("val")


# --------------------------------------------------------------------------- shapes


def test_shapes_default_sizes_and_factors() -> None:
    train = make_shapes("train")
    assert train.images.shape == (4096, 3, 32, 32)
    assert len(make_shapes("test", n=None, image_size=8)) == 1024
    assert train.images.min() >= -1.0 and train.images.max() <= 1.0
    assert train.num_classes == 3
    assert set(train.factors) == {"shape", "colour", "x", "y", "scale"}
    assert train.factor_kinds == {
        "shape": "categorical",
        "colour": "categorical",
        "x": "continuous",
        "y": "continuous",
        "scale": "continuous",
    }
    for key, value in train.factors.items():
        assert value.shape == (4096,)
        kind = train.factor_kinds[key]
        assert value.dtype == (torch.int64 if kind == "categorical" else torch.float32)
    assert torch.equal(train.labels, train.factors["shape"])
    assert set(train.factors["shape"].tolist()) == {0, 1, 2}
    assert set(train.factors["colour"].tolist()) == set(range(len(COLOURS)))
    for key in ("x", "y", "scale"):
        v = train.factors[key]
        assert v.min() > 0.0 and v.max() < 1.0


def test_shapes_deterministic_and_seed_split_dependent() -> None:
    a = make_shapes("train", n=64, seed=3)
    b = make_shapes("train", n=64, seed=3)
    assert torch.equal(a.images, b.images)
    for key in a.factors:
        assert torch.equal(a.factors[key], b.factors[key])
    assert not torch.equal(a.images, make_shapes("train", n=64, seed=4).images)
    assert not torch.equal(a.images, make_shapes("test", n=64, seed=3).images)
    # Factors do not depend on the render size.
    small = make_shapes("train", n=64, seed=3, image_size=16)
    assert torch.equal(a.factors["x"], small.factors["x"])


def test_shapes_render_matches_factors() -> None:
    d = make_shapes("test", n=300, seed=1, image_size=32)
    rgb = (d.images + 1) / 2  # [0, 1], black background
    size = d.image_size
    coverage = rgb.amax(dim=1)  # (N, H, W): every hue has a channel at full value
    lit = coverage > 0.5
    assert (lit.sum(dim=(1, 2)) > 4).all(), "every shape should be visible"

    # Colour: mean colour of lit pixels, divided by its brightest channel (edge pixels are
    # darker from anti-aliasing), equals the colour factor's RGB.
    expected = torch.tensor(
        [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.float32
    )
    mean_colour = (rgb * lit[:, None]).sum(dim=(2, 3)) / lit.sum(dim=(1, 2))[:, None]
    hue = mean_colour / mean_colour.amax(dim=1, keepdim=True)
    assert torch.allclose(hue, expected[d.factors["colour"]], atol=0.05)
    red = d.factors["colour"] == COLOURS.index("red")
    assert red.any()
    assert (mean_colour[red, 0] > 0.5).all() and (mean_colour[red, 1:] < 0.05).all()

    # Position: coverage-weighted centroid within half a pixel of (x, y); y runs down rows.
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    w = coverage / coverage.sum(dim=(1, 2), keepdim=True)
    cx = (w.sum(dim=1) * coords).sum(dim=1)
    cy = (w.sum(dim=2) * coords).sum(dim=1)
    assert (cx - d.factors["x"]).abs().max() < 0.5 / size
    assert (cy - d.factors["y"]).abs().max() < 0.5 / size

    # Size: every shape has area (2 * scale)^2.
    area = coverage.sum(dim=(1, 2)) / size**2
    assert torch.allclose(area, (2 * d.factors["scale"]) ** 2, rtol=0.05)

    # Shape: a square fills its bounding box, a circle ~pi/4 of it, a triangle about half.
    rows, cols = lit.any(dim=2), lit.any(dim=1)  # (N, H), (N, W)
    idx = torch.arange(size)

    def extent(m: torch.Tensor) -> torch.Tensor:
        return torch.where(m, idx, -1).amax(dim=1) - torch.where(m, idx, size).amin(dim=1) + 1

    fill = lit.sum(dim=(1, 2)) / (extent(rows) * extent(cols))
    shape = d.factors["shape"]
    assert fill[shape == 0].min() > 0.9  # square
    assert 0.65 < fill[shape == 1].mean() < 0.9  # circle
    assert fill[shape == 2].max() < 0.7  # triangle


def test_shapes_validation() -> None:
    with pytest.raises(GuidekitError, match="split"):
        make_shapes("validation")
    with pytest.raises(GuidekitError, match="image_size"):
        make_shapes(image_size=0)
    with pytest.raises(GuidekitError, match="n must"):
        make_shapes(n=0)
    with pytest.raises(GuidekitError, match="seed"):
        make_shapes(seed=-1)


# --------------------------------------------------------------------------- folders


def _write_png(path, size, colour, mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_image_folder_loads_resizes_and_crops(tmp_path) -> None:
    _write_png(tmp_path / "b.png", (40, 20), (255, 0, 0))
    _write_png(tmp_path / "a.PNG", (20, 40), (0, 0, 255))
    _write_png(tmp_path / "sub" / "c.jpg", (64, 64), 128, mode="L")
    _write_png(tmp_path / "sub" / "d.png", (12, 12), (0, 255, 0, 128), mode="RGBA")
    (tmp_path / "notes.txt").write_text("not an image")
    _write_png(tmp_path / ".hidden" / "e.png", (8, 8), (1, 2, 3))
    d = load_image_folder(tmp_path, image_size=16)
    assert d.images.shape == (4, 3, 16, 16)
    assert d.images.min() >= -1.0 and d.images.max() <= 1.0
    assert d.labels is None and d.num_classes == 0
    # Sorted order: a.PNG (blue), b.png (red), sub/c.jpg (grey), sub/d.png (green).
    centre = d.images[:, :, 8, 8]
    assert torch.allclose(centre[0], torch.tensor([-1.0, -1.0, 1.0]), atol=0.02)
    assert torch.allclose(centre[1], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)
    assert torch.allclose(centre[2], torch.full((3,), 128 / 127.5 - 1), atol=0.05)
    assert torch.allclose(centre[3], torch.tensor([-1.0, 1.0, -1.0]), atol=0.02)
    grey = load_image_folder(str(tmp_path), image_size=10, channels=1)
    assert grey.images.shape == (4, 1, 10, 10)


def test_image_folder_errors(tmp_path) -> None:
    with pytest.raises(GuidekitError, match="does not exist"):
        load_image_folder(tmp_path / "missing", image_size=16)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(GuidekitError, match="not a directory"):
        load_image_folder(tmp_path / "file.png", image_size=16)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(GuidekitError, match="no images found") as info:
        load_image_folder(empty, image_size=16)
    assert ".png" in str(info.value) and "\n" not in str(info.value)
    bad = tmp_path / "bad"
    _write_png(bad / "good.png", (8, 8), (0, 0, 0))
    corrupt = bad / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(256))
    with pytest.raises(GuidekitError, match="cannot read image") as info:
        load_image_folder(bad, image_size=16)
    assert str(corrupt) in str(info.value)
    with pytest.raises(GuidekitError, match="channels"):
        load_image_folder(bad, image_size=16, channels=4)


# --------------------------------------------------------------------------- load_dataset


def test_load_dataset_names_and_folders(tmp_path) -> None:
    d = load_dataset("digits", split="test")
    assert d.images.shape == (297, 1, 16, 16)
    s = load_dataset("shapes", split="test", image_size=8, seed=2)
    assert s.images.shape == (1024, 3, 8, 8)
    assert torch.equal(s.images, make_shapes("test", seed=2, image_size=8).images)
    _write_png(tmp_path / "x.png", (50, 40), (10, 20, 30))
    f = load_dataset(str(tmp_path))
    assert f.images.shape == (1, 3, 32, 32)
    assert set(BUILTIN_DATASETS) == {"digits", "shapes"}
    assert BUILTIN_DATASETS["digits"](split="test").image_size == 16
    assert BUILTIN_DATASETS["shapes"](split="test", image_size=None).image_size == 32


def test_load_dataset_unknown_name() -> None:
    with pytest.raises(GuidekitError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(GuidekitError, match="split"):
        load_dataset("digits", split="val")


# --------------------------------------------------------------------------- image writing


@pytest.mark.parametrize("channels", [1, 3])
def test_save_image_grid_size(tmp_path, channels: int) -> None:
    images = torch.rand(7, channels, 5, 6) * 2 - 1
    path = save_image_grid(images, tmp_path / "out" / "grid.png")
    assert path == tmp_path / "out" / "grid.png"
    with Image.open(path) as im:
        # Default nrow = ceil(sqrt(7)) = 3 per row -> 3 rows; padding 1 around every image.
        assert im.size == (3 * (6 + 1) + 1, 3 * (5 + 1) + 1)
        assert im.mode == ("L" if channels == 1 else "RGB")
    path = save_image_grid(images, tmp_path / "big.png", nrow=7, padding=2, scale=3)
    with Image.open(path) as im:
        assert im.size == (7 * (18 + 2) + 2, 1 * (15 + 2) + 2)
        arr = np.asarray(im)
    # Pixel values round-trip; each source pixel became a 3x3 block.
    first = images[0].permute(1, 2, 0).squeeze(-1)
    expected = ((first + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.array_equal(arr[2 : 2 + 15 : 3, 2 : 2 + 18 : 3], expected)
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


def test_save_image_grid_validation(tmp_path) -> None:
    with pytest.raises(GuidekitError, match="channels"):
        save_image_grid(torch.zeros(2, 2, 4, 4), tmp_path / "g.png")
    with pytest.raises(GuidekitError, match="shaped"):
        save_image_grid(torch.zeros(3, 4, 4), tmp_path / "g.png")
    with pytest.raises(GuidekitError, match=r"\.png"):
        save_image_grid(torch.zeros(1, 3, 4, 4), tmp_path / "g.jpg")
    # NaN from a diverged sampler is written, not a crash.
    save_image_grid(torch.full((1, 3, 4, 4), float("nan")), tmp_path / "nan.png")


def test_save_images(tmp_path) -> None:
    images = torch.linspace(-1, 1, 3).view(3, 1, 1, 1).expand(3, 3, 4, 5)
    paths = save_images(images, tmp_path / "samples", prefix="x")
    assert [p.name for p in paths] == ["x_00000.png", "x_00001.png", "x_00002.png"]
    with Image.open(paths[2]) as im:
        assert im.size == (5, 4) and im.getpixel((0, 0)) == (255, 255, 255)
    with Image.open(paths[0]) as im:
        assert im.getpixel((0, 0)) == (0, 0, 0)
