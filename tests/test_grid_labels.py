"""Row and column labels, and a title, drawn into PNG grids by save_image_grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from guidekit.data import save_image_grid
from guidekit.errors import GuidekitError

# White images, so any dark pixel in the PNG is label ink.
WHITE = torch.ones(6, 1, 8, 8)


def _array(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


@pytest.mark.parametrize("channels", [1, 3])
def test_labels_add_margins_with_ink(tmp_path, channels: int) -> None:
    images = WHITE.expand(6, channels, 8, 8)
    plain = save_image_grid(images, tmp_path / "plain.png", nrow=3, scale=4)
    labelled = save_image_grid(images, tmp_path / "lab.png", nrow=3, scale=4,
                               row_labels=["original", "PDAE"],
                               col_labels=["t=1", "t=2", "t=3"])
    with Image.open(plain) as a, Image.open(labelled) as b:
        assert a.size == (3 * 33 + 1, 2 * 33 + 1)
        # Same mode as the unlabelled grid: greyscale stays L, colour stays RGB.
        assert b.mode == a.mode == ("L" if channels == 1 else "RGB")
        extra_w, extra_h = b.size[0] - a.size[0], b.size[1] - a.size[1]
    assert extra_w > 0 and extra_h > 0
    arr = _array(labelled)
    # The images sit in the bottom-right corner, unchanged; the margins hold dark text.
    assert np.array_equal(arr[extra_h:, extra_w:], _array(plain))
    left, top = arr[extra_h:, :extra_w], arr[:extra_h, extra_w:]
    assert (left < 128).sum() > 20 and (top < 128).sum() > 20
    # One label per row: ink in the band of each row, and in the band above each column.
    for r in range(2):
        assert (left[1 + r * 33 : (r + 1) * 33] < 128).any()
    for q in range(3):
        assert (top[:, 1 + q * 33 : (q + 1) * 33] < 128).any()


def test_rows_only_columns_only_and_title(tmp_path) -> None:
    base = save_image_grid(WHITE, tmp_path / "p.png", nrow=3, scale=2)
    with Image.open(base) as im:
        w, h = im.size
    rows = save_image_grid(WHITE, tmp_path / "r.png", nrow=3, scale=2, row_labels=["a", "b"])
    cols = save_image_grid(WHITE, tmp_path / "c.png", nrow=3, scale=2, col_labels=["1", "2", "3"])
    titled = save_image_grid(WHITE, tmp_path / "t.png", nrow=3, scale=2, title="A title")
    with Image.open(rows) as r, Image.open(cols) as c, Image.open(titled) as t:
        assert r.size[1] == h and r.size[0] > w  # a left margin only
        assert c.size[0] == w and c.size[1] > h  # a top strip only
        assert t.size[0] == w and t.size[1] > h
    assert (_array(titled)[: _array(titled).shape[0] - h] < 128).sum() > 10


def test_long_labels_are_cut_and_wrapped(tmp_path) -> None:
    long = "x" * 400
    path = save_image_grid(WHITE, tmp_path / "g.png", nrow=3, scale=1,
                           row_labels=[long, "b"], col_labels=[long, "a b c d e f g", "z"])
    with Image.open(path) as im:
        w, h = im.size
    # The row margin is capped (200 px of text + gaps), the column strip at three lines.
    assert w <= 3 * 9 + 1 + 200 + 8
    assert h <= 2 * 9 + 1 + 3 * 16 + 12


def test_greek_labels_get_ink(tmp_path) -> None:
    # Pillow's bundled font lacks Greek; the grid falls back to a font that has it.
    path = save_image_grid(WHITE[:2], tmp_path / "g.png", nrow=2, scale=4,
                           col_labels=["\u03bb=0", "\u03bb=1"])
    arr = _array(path)
    assert (arr[: arr.shape[0] - 33] < 128).sum() > 10


def test_label_count_and_type_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(GuidekitError, match="row_labels has 3 labels but the grid has 2 rows"):
        save_image_grid(WHITE, tmp_path / "g.png", nrow=3, row_labels=["a", "b", "c"])
    with pytest.raises(GuidekitError, match="col_labels has 2 labels but the grid has 3 col"):
        save_image_grid(WHITE, tmp_path / "g.png", nrow=3, col_labels=["a", "b"])
    with pytest.raises(GuidekitError, match="list of 2 strings") as err:
        save_image_grid(WHITE, tmp_path / "g.png", nrow=3, row_labels="ab")
    assert "\n" not in str(err.value)
    with pytest.raises(GuidekitError, match="title must be a string"):
        save_image_grid(WHITE, tmp_path / "g.png", title=3)  # type: ignore[arg-type]
    assert not (tmp_path / "g.png").exists()
    with pytest.raises(TypeError):  # keyword-only, so positional calls stay as they were
        save_image_grid(WHITE, tmp_path / "g.png", 3, 1, 1, ["a", "b"])  # type: ignore[misc]
