"""What every ``guidekit train NAME`` command shares: its options, as typer ``Annotated`` types
(the flag and help live here; each command keeps its own defaults), and the steps from parsed
options to a :class:`~guidekit.training.TrainConfig` and back to the terminal.

A trainer declares ``steps: Steps = 1500`` and so on, then calls :func:`train_config` with its
context; the options a command leaves out take TrainConfig's defaults.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from guidekit.distributed import is_main_process
from guidekit.errors import GuidekitError
from guidekit.options import parse_plugin_options
from guidekit.plugins import get_registry
from guidekit.training import TrainConfig

Data = Annotated[str, typer.Option(help="Dataset name or a folder of images.")]
Out = Annotated[Path, typer.Option(help="Checkpoint directory.")]
ImageSize = Annotated[int | None, typer.Option(
    help="Resize images (default: the dataset's size).")]
Steps = Annotated[int, typer.Option(help="Optimisation steps.")]
BatchSize = Annotated[int, typer.Option(help="Global batch size (split across processes).")]
LR = Annotated[float, typer.Option(help="AdamW learning rate.")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
EMADecay = Annotated[float, typer.Option(help="EMA decay of the weights kept for use.")]
GradClip = Annotated[float, typer.Option(help="Gradient-norm clip.")]
Seed = Annotated[int, typer.Option(help="Seed of every random stream.")]
BF16 = Annotated[bool, typer.Option(help="bf16 autocast.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the trained networks.")]
Device = Annotated[str | None, typer.Option(
    help="cpu or cuda (default: cuda when available).")]
Resume = Annotated[bool, typer.Option(help="Continue the checkpoint in --out.")]
SaveEvery = Annotated[int, typer.Option(help="Steps between checkpoints.")]
LogEvery = Annotated[int, typer.Option(help="Steps between metric lines.")]
JSONOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
Weighting = Annotated[str, typer.Option(
    help="Loss weighting plugin (`guidekit plugins` lists them); its options follow it.")]

# UNet-shaped networks (the DDPM's UNet, the classifiers' encoder half)
ModelChannels = Annotated[int, typer.Option(help="Base width.")]
ChannelMult = Annotated[str, typer.Option(help="Width multiplier per level, e.g. 1,2,2.")]
NumResBlocks = Annotated[int, typer.Option(help="Residual blocks per level.")]
Attention = Annotated[str, typer.Option(
    help="Feature-map sizes with self-attention, e.g. 8 (empty: none).")]
NumHeads = Annotated[int, typer.Option(help="Attention heads.")]
Dropout = Annotated[float, typer.Option(help="Dropout in residual blocks.")]

_CONFIG_FIELDS = frozenset(f.name for f in fields(TrainConfig))


def train_config(ctx: typer.Context) -> TrainConfig:
    """The :class:`TrainConfig` of a trainer command's parsed options.

    Trainers accept arguments they do not declare, because those are the options of the
    chosen ``--weighting``; a command without ``--weighting`` has none, so any is an error.
    """
    if ctx.args and "weighting" not in ctx.params:
        raise GuidekitError(f"unexpected argument(s): {' '.join(ctx.args)}")
    return TrainConfig(**{k: v for k, v in ctx.params.items() if k in _CONFIG_FIELDS})


def weighting_options(ctx: typer.Context) -> dict[str, Any]:
    """The values of the chosen ``--weighting``'s own options, parsed from ``ctx.args``."""
    name = ctx.params["weighting"]
    spec = get_registry().weighting(name)
    (values,) = parse_plugin_options([(f"weighting '{name}'", spec.options)], ctx.args)
    return values


def report(summary: dict[str, Any], json_out: bool, *shown: Any) -> None:
    """Print a command's result once (on the main process): ``summary`` as JSON with
    ``--json``, else ``shown`` in order (lines of text or rich renderables such as tables)."""
    if not is_main_process():
        return
    if json_out:
        typer.echo(json.dumps(summary))
        return
    console = Console()
    for item in shown:
        console.print(item, highlight=False, markup=False, soft_wrap=True)
