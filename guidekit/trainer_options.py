"""The options every ``guidekit train NAME`` command shares, as :class:`~guidekit.options.Option`
declarations, and the step from their values to a :class:`~guidekit.training.TrainConfig`.

A trainer lists ``train_options(steps=1500, lr=5e-3)`` (the shared options with its own
defaults) beside its own options, and calls :func:`train_config` on ``ctx.options``.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guidekit.errors import GuidekitError
from guidekit.options import Option

if TYPE_CHECKING:  # torch loads on first use: `guidekit --help` must not import it
    from guidekit.training import TrainConfig

__all__ = [
    "DATA",
    "IMAGE_SIZE",
    "WEIGHTING",
    "out_option",
    "parse_ints",
    "train_config",
    "train_options",
    "unet_options",
]

DATA = Option("data", str, "digits", "Dataset name or a folder of images.")
IMAGE_SIZE = Option("image_size", int, None, "Resize images (default: the dataset's size).")
WEIGHTING = Option("weighting", str, "uniform",
                   "Loss weighting plugin (`guidekit plugins` lists them); its options follow.")

# The defaults are TrainConfig's, written out so that declaring these options (every train
# command's --help) needs no torch; tests/test_cli_startup.py holds them equal.
_TRAIN: tuple[Option, ...] = (
    Option("steps", int, 2000, "Optimisation steps."),
    Option("batch_size", int, 32, "Global batch size (split across processes)."),
    Option("lr", float, 1e-3, "AdamW learning rate."),
    Option("weight_decay", float, 0.0, "AdamW weight decay."),
    Option("ema_decay", float, 0.995, "EMA decay of the weights kept for use."),
    Option("grad_clip", float, 1.0, "Gradient-norm clip."),
    Option("seed", int, 0, "Seed of every random stream."),
    Option("bf16", bool, False, "bf16 autocast."),
    Option("compile", bool, False, "torch.compile the trained networks."),
    Option("device", str, "auto", "cpu, cuda, cuda:N, or auto (a GPU when there is one)."),
    Option("resume", bool, False, "Continue the checkpoint in --out."),
    Option("save_every", int, 500, "Steps between checkpoints."),
    Option("log_every", int, 50, "Steps between metric lines."),
)

_UNET: tuple[Option, ...] = (
    Option("model_channels", int, 32, "Base width."),
    Option("channel_mult", str, "1,2,2", "Width multiplier per level, e.g. 1,2,2."),
    Option("num_res_blocks", int, 1, "Residual blocks per level."),
    Option("attention", str, "8", "Feature-map sizes with self-attention, e.g. 8 (empty: none)."),
    Option("num_heads", int, 4, "Attention heads."),
    Option("dropout", float, 0.0, "Dropout in residual blocks."),
)


def _with_defaults(options: tuple[Option, ...], defaults: dict[str, Any]) -> list[Option]:
    by_name = {o.name for o in options}
    unknown = sorted(set(defaults) - by_name)
    if unknown:
        raise TypeError(f"no shared option(s) {', '.join(unknown)}")
    return [o.with_default(defaults[o.name]) if o.name in defaults else o for o in options]


def train_options(**defaults: Any) -> list[Option]:
    """The training options (TrainConfig's fields and ``resume``), with these defaults."""
    return _with_defaults(_TRAIN, defaults)


def unet_options(**defaults: Any) -> list[Option]:
    """The width/depth/attention options of UNet-shaped networks, with these defaults."""
    return _with_defaults(_UNET, defaults)


def out_option(default: str | Path) -> Option:
    """``--out``: the checkpoint directory, defaulting to ``default``."""
    return Option("out", Path, Path(default), "Checkpoint directory.")


def train_config(options: dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` of a trainer's option values (keys it does not know are
    ignored: they are the trainer's own options)."""
    from guidekit.training import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in options.items() if k in names})


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """``"1,2,2"`` → ``(1, 2, 2)``; anything else is a one-line error naming ``what``."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise GuidekitError(f"{what} must be comma-separated integers, got '{text}'") from None
