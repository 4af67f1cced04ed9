"""Text drawn into PNG grids (:func:`guidekit.data.save_image_grid`'s row and column labels
and title): dark on white, in Pillow's bundled font, or matplotlib's DejaVu Sans for glyphs
it lacks (Greek letters); nothing is downloaded."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from guidekit.errors import GuidekitError

__all__ = ["check_labels", "draw_labels"]

# Labels drawn into grids: dark text on white, Pillow's bundled font (nothing downloaded).
_LABEL_FONT_SIZE = 12
_LABEL_GAP = 4  # pixels between a label and the images (and the PNG edge)
_MAX_ROW_LABEL_WIDTH = 200  # a longer row label is cut with an ellipsis
_MAX_LABEL_LINES = 3  # a column label or title wraps onto at most this many lines
_MIN_COL_FONT_SIZE = 8  # column labels shrink down to this before they wrap
_ELLIPSIS = "\u2026"


@functools.lru_cache(maxsize=8)
def _default_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:  # Pillow >= 10.1 scales its bundled font; 10.0 only has the fixed bitmap one
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


@functools.lru_cache(maxsize=8)
def _fallback_font(size: int) -> ImageFont.FreeTypeFont | None:
    """DejaVu Sans from matplotlib's own files (a dependency: nothing downloaded), for labels
    with glyphs the bundled font lacks, such as Greek letters."""
    try:
        import matplotlib

        return ImageFont.truetype(
            str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return None


def _missing_glyph(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> bool:
    """Whether some character of ``text`` would render as the font's empty box."""
    try:
        box = font.getmask("\uffff")
        box_bytes = bytes(box)
    except (UnicodeEncodeError, ValueError):  # the bitmap font takes Latin-1 only
        return any(ord(ch) > 255 for ch in text)
    for ch in set(text):
        if ch.isspace() or ord(ch) < 128:
            continue
        try:
            mask = font.getmask(ch)
        except (UnicodeEncodeError, ValueError):
            return True
        if mask.size == box.size and bytes(mask) == box_bytes:
            return True
    return False


def _label_font(texts: list[str], size: int = _LABEL_FONT_SIZE,
                ) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    font = _default_font(size)
    if any(_missing_glyph(font, t) for t in texts if t):
        fallback = _fallback_font(size)
        if fallback is not None:
            return fallback
    return font


def _text_width(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> int:
    if not text:
        return 0
    left, _, right, _ = font.getbbox(text)
    return int(math.ceil(right - min(left, 0)))


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    _, top, _, bottom = font.getbbox("Ag|_")
    return int(math.ceil(bottom - min(top, 0))) + 2


def _truncate(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str, width: int) -> str:
    """``text`` cut with an ellipsis so it is at most ``width`` pixels wide."""
    if _text_width(font, text) <= width:
        return text
    lo, hi = 0, len(text)  # the longest prefix whose ellipsised form fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _text_width(font, text[:mid].rstrip() + _ELLIPSIS) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + _ELLIPSIS if lo else ""


def _wrap(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str, width: int) -> list[str]:
    """``text`` broken at spaces (or inside a word that is too long) into lines of at most
    ``width`` pixels; at most :data:`_MAX_LABEL_LINES`, the last cut with an ellipsis."""
    lines: list[str] = []
    rest = text.strip()
    while rest and len(lines) < _MAX_LABEL_LINES - 1:
        if _text_width(font, rest) <= width:
            break
        cut = 1  # the longest prefix that fits, preferring to end at a space
        while cut < len(rest) and _text_width(font, rest[: cut + 1]) <= width:
            cut += 1
        space = rest.rfind(" ", 0, cut + 1)
        if space > 0:
            cut = space
        elif cut < len(rest) and _text_width(font, rest.split(" ")[0]) > width * _MAX_LABEL_LINES:
            break  # one long word: better cut once than chopped over every line
        lines.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        lines.append(_truncate(font, rest, width))
    return lines or [""]


def check_labels(labels: object, count: int, what: str, unit: str) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
        raise GuidekitError(f"save_image_grid {what} must be a list of {count} strings (one "
                            f"per {unit}), got {type(labels).__name__}; pass a list")
    items = list(labels)  # type: ignore[call-overload]
    if len(items) != count:
        raise GuidekitError(f"save_image_grid {what} has {len(items)} labels but the grid has "
                            f"{count} {unit}s: pass one label per {unit}")
    # One line each: a newline would overlap the next label.
    return [" ".join(str(item).split()) for item in items]


def draw_labels(grid: np.ndarray, cell_h: int, cell_w: int, pad: int,
                 row_labels: list[str] | None, col_labels: list[str] | None,
                 title: str | None) -> np.ndarray:
    """``grid`` framed by a left margin of row labels, a top strip of column labels and a
    title above, drawn dark on white in the grid's own mode (L or RGB)."""
    texts = [*(row_labels or []), *(col_labels or []), *([title] if title else [])]
    font = _label_font(texts)
    line_h = _line_height(font)
    gh, gw, c = grid.shape
    left = 0
    if row_labels is not None:
        widest = max(_text_width(font, t) for t in row_labels)
        left = min(widest, _MAX_ROW_LABEL_WIDTH) + 2 * _LABEL_GAP
        row_labels = [_truncate(font, t, left - 2 * _LABEL_GAP) for t in row_labels]
    col_lines: list[list[str]] = []
    col_h = 0
    col_font = font
    if col_labels is not None:
        width = max(cell_w + pad - 2, 1)  # a label may use its cell and half of each padding
        # Narrow columns (tiny images) first get a smaller font, then wrapped lines.
        for size in range(_LABEL_FONT_SIZE, _MIN_COL_FONT_SIZE - 1, -1):
            col_font = _label_font(texts, size)
            if all(_text_width(col_font, t) <= width for t in col_labels):
                break
        col_lines = [_wrap(col_font, t, width) for t in col_labels]
        col_h = max(len(lines) for lines in col_lines) * _line_height(col_font) + _LABEL_GAP
    title_lines = _wrap(font, title, gw + left - 2 * _LABEL_GAP) if title else []
    title_h = len(title_lines) * line_h + _LABEL_GAP if title_lines else 0
    top = title_h + col_h + (_LABEL_GAP if title_h or col_h else 0)
    canvas = np.full((gh + top, gw + left, c), 255, dtype=np.uint8)
    canvas[top:, left:] = grid
    image = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    draw = ImageDraw.Draw(image)
    ink = 0 if c == 1 else (0, 0, 0)

    def text_at(x: float, y: float, text: str, face: ImageFont.ImageFont
                | ImageFont.FreeTypeFont = font) -> None:
        if text:  # anchor at the text's own left edge, so a centred label is centred
            draw.text((x - min(face.getbbox(text)[0], 0), y), text, font=face, fill=ink)

    y = _LABEL_GAP
    for line in title_lines:
        text_at((gw + left - _text_width(font, line)) / 2, y, line)
        y += line_h
    col_line_h = _line_height(col_font)
    for q, lines in enumerate(col_lines):
        centre = left + pad + q * (cell_w + pad) + cell_w / 2
        y = title_h + _LABEL_GAP + (col_h - _LABEL_GAP - len(lines) * col_line_h)  # at bottom
        for line in lines:
            text_at(centre - _text_width(col_font, line) / 2, y, line, col_font)
            y += col_line_h
    for r, label in enumerate(row_labels or []):
        middle = top + pad + r * (cell_h + pad) + cell_h / 2
        text_at(left - _LABEL_GAP - _text_width(font, label), middle - line_h / 2, label)
    return np.asarray(image).reshape(canvas.shape)
