"""Helpers for tests of guidekit and of plugins: a tiny DPM checkpoint in seconds."""

from __future__ import annotations

from pathlib import Path

from guidekit.data import ImageData
from guidekit.lookup import load_dataset
from guidekit.schedule import ScheduleConfig
from guidekit.training import TrainConfig
from guidekit.unet import UNetConfig

__all__ = [
    "assert_grid_layout",
    "assert_one_line_error",
    "make_tiny_dpm",
    "run_cli",
    "tiny_unet_config",
]



def tiny_unet_config(data: ImageData) -> UNetConfig:
    """A UNet small enough to train a few steps in a second or two."""
    return UNetConfig(
        image_size=data.image_size, in_channels=data.channels, model_channels=8,
        channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), num_heads=1,
    )


def make_tiny_dpm(
    out: str | Path,
    data: str = "digits",
    steps: int = 4,
    timesteps: int = 100,
    resume: bool = False,
    **train_kwargs,
) -> Path:
    """Train (or, with ``resume``, continue) a tiny DDPM checkpoint in ``out``; no sample
    grid. ``train_kwargs`` go to :class:`~guidekit.training.TrainConfig`."""
    from guidekit.ddpm import train_ddpm

    images = load_dataset(data, "train")
    cfg = TrainConfig(steps=steps, batch_size=16, log_every=1, save_every=steps, **train_kwargs)
    train_ddpm(
        images, out, unet=tiny_unet_config(images),
        schedule=ScheduleConfig(num_timesteps=timesteps), config=cfg, resume=resume, samples=0,
        progress=False,
    )
    return Path(out)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``guidekit ARGS`` in-process; returns (exit status, stdout, stderr) via pytest's
    ``capsys``."""
    from guidekit.cli import main

    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """A user mistake: exit status 2 and one ``error: …`` line holding every needle."""
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def assert_grid_layout(path: str | Path, rows: int, cols: int, cell: int, *,
                       row_labels: bool = False, col_labels: bool = False) -> None:
    """A PNG from :func:`~guidekit.data.save_image_grid`: ``rows`` × ``cols`` images of
    ``cell`` pixels (image and one padding line) fill its bottom-right corner, white padding
    between them, and its left and top margins hold dark label text beside every row (with
    ``row_labels``) and above every column (with ``col_labels``)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    h, w = arr.shape
    left, top = w - (cols * cell + 1), h - (rows * cell + 1)
    assert left >= 0 and top >= 0, (arr.shape, rows, cols)
    grid = arr[top:, left:]
    assert (grid[::cell, :] == 255).all() and (grid[:, ::cell] == 255).all(), "padding"
    assert (left > 0) == row_labels, f"left margin {left} px"
    for r in range(rows if row_labels else 0):
        assert (arr[top + r * cell + 1 : top + (r + 1) * cell, :left] < 128).any(), r
    for q in range(cols if col_labels else 0):
        assert (arr[:top, left + q * cell + 1 : left + (q + 1) * cell] < 128).any(), q

