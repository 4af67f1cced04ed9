"""DDPM: the ε-prediction training task, ``guidekit train ddpm``, and loading a trained DPM."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import typer
from torch import Tensor, nn

from guidekit import ops
from guidekit.checkpoint import Checkpoint, load_weights, read_checkpoint
from guidekit.data import ImageData, load_dataset, save_image_grid
from guidekit.distributed import is_main_process
from guidekit.engine import Sampler
from guidekit.errors import GuidekitError
from guidekit.options import parse_plugin_options
from guidekit.plugins import get_registry
from guidekit.schedule import NoiseSchedule, ScheduleConfig
from guidekit.training import TrainConfig, fit
from guidekit.unet import UNet, UNetConfig

KIND = "ddpm"


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample, (B,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


class DDPMTask:
    """L = E[λ_t ‖ε − ε_θ(x_t, t)‖²] with λ from a weighting plugin."""

    kind = KIND

    def __init__(
        self,
        model: UNet,
        schedule: NoiseSchedule,
        weights: Tensor,
        weighting: dict[str, Any],
        data: ImageData,
        model_name: str = "unet",
    ) -> None:
        if model.config.learn_sigma:
            raise GuidekitError("training learned-variance models is not supported yet")
        self.model = model
        self.schedule = schedule
        self.weights = weights
        self.weighting = weighting
        self.model_name = model_name
        self.data_meta = data_meta(data)

    def trainable(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def loss(self, nets, x0, labels, gen) -> Tensor:
        tab = self.schedule.to(x0.device).tables
        t = torch.randint(0, self.schedule.num_steps, (x0.shape[0],), generator=gen,
                          device=x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        x_t = ops.q_sample(tab, x0, t, noise)
        eps = nets["model"](x_t, t)
        return (self.weights.to(x0.device)[t] * per_sample_mse(eps, noise)).mean()

    def config(self) -> dict[str, Any]:
        return {
            "model": {"name": self.model_name, "config": self.model.config.to_dict()},
            "schedule": self.schedule.config.to_dict(),
            "data": self.data_meta,
            "weighting": self.weighting,
        }


def data_meta(data: ImageData) -> dict[str, Any]:
    return {
        "name": data.name,
        "image_size": data.image_size,
        "channels": data.channels,
        "num_classes": data.num_classes,
    }


@dataclass
class DPM:
    """A trained noise predictor with its schedule, ready to sample."""

    model: nn.Module
    schedule: NoiseSchedule
    checkpoint: Checkpoint

    @property
    def config(self) -> dict[str, Any]:
        """The checkpoint's config.json."""
        return self.checkpoint.config

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the DPM was trained on."""
        d = self.config["data"]
        return d["channels"], d["image_size"], d["image_size"]

    def sampler(self, **kwargs: Any) -> Sampler:
        """A :class:`~guidekit.engine.Sampler` over this model and schedule (``steps="ddim50"``,
        ``clip_x0``, ... as keyword arguments)."""
        return Sampler(self.model, self.schedule, **kwargs)


def build_model(entry: dict[str, Any]) -> nn.Module:
    """Rebuild a network from a config.json ``model`` entry via the model registry."""
    spec = get_registry().model(entry["name"])
    return spec.model_class(spec.config_class.from_dict(entry["config"]))


def load_dpm(path: str | Path, device: str | torch.device = "cpu", role: str = "ema") -> DPM:
    """Load a ``ddpm`` checkpoint (EMA weights by default), frozen, in eval mode."""
    ckpt = read_checkpoint(path, KIND)
    model = build_model(ckpt.config["model"])
    load_weights(model, ckpt.module_tensors(role, "model"), str(path))
    model.to(device).eval().requires_grad_(False)
    schedule = NoiseSchedule.from_config(ScheduleConfig.from_dict(ckpt.config["schedule"]))
    return DPM(model, schedule.to(device), ckpt)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise GuidekitError(f"{what} must be comma-separated integers, got '{text}'") from None


def sample_grid(
    checkpoint: str | Path,
    n: int = 64,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    name: str = "samples.png",
) -> Path:
    """Write an unguided sample grid of the checkpoint beside it."""
    from guidekit.sampling import sample

    x = sample(load_dpm(checkpoint), n, sampler=sampler, steps=steps, seed=seed)
    return save_image_grid(x, Path(checkpoint) / name, scale=4)


def weighting_table(
    name: str, schedule: NoiseSchedule, options: dict[str, Any] | None = None
) -> Tensor:
    """λ_t for every training step from the weighting plugin ``name``."""
    weights = get_registry().weighting(name).weights(schedule, **(options or {}))
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if weights.shape != (schedule.num_steps,) or not bool(torch.isfinite(weights).all()):
        raise GuidekitError(f"weighting '{name}' must return {schedule.num_steps} finite weights")
    return weights


def train(
    data: ImageData,
    out: str | Path,
    *,
    unet: UNetConfig | None = None,
    schedule: ScheduleConfig | None = None,
    weighting: str = "uniform",
    weighting_options: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    samples: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a DDPM on ``data`` into checkpoint ``out``; writes ``samples.png`` beside it.

    Returns a summary (checkpoint, steps, final loss, seconds, images/s, sample grid).
    """
    out = Path(out)
    config = config or TrainConfig()
    unet = unet or UNetConfig()
    if (unet.image_size, unet.in_channels) != (data.image_size, data.channels):
        raise GuidekitError(
            f"the UNet is configured for {unet.in_channels}x{unet.image_size}px images but "
            f"'{data.name}' has {data.channels}x{data.image_size}px"
        )
    sched = NoiseSchedule.from_config(schedule or ScheduleConfig())
    weights = weighting_table(weighting, sched, weighting_options)
    meta = {"name": weighting, "options": dict(weighting_options or {})}
    torch.manual_seed(config.seed)  # the initial weights
    task = DDPMTask(UNet(unet), sched, weights, meta, data)
    result = fit(task, data, out, config, resume=resume, progress=progress)
    summary: dict[str, Any] = {
        "checkpoint": str(out),
        "steps": result.step,
        "final_loss": result.loss,
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
    }
    if samples and result.is_main:
        summary["samples"] = str(sample_grid(out, samples, seed=config.seed))
    return summary


def train_ddpm(
    ctx: typer.Context,
    data: str = typer.Option("digits", help="Dataset name or a folder of images."),
    out: Path = typer.Option(Path("runs/ddpm"), help="Checkpoint directory."),
    steps: int = typer.Option(2000, help="Optimisation steps."),
    batch_size: int = typer.Option(32, help="Global batch size (split across processes)."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate."),
    ema_decay: float = typer.Option(0.995, help="EMA decay of the weights used to sample."),
    grad_clip: float = typer.Option(1.0, help="Gradient-norm clip."),
    image_size: int = typer.Option(None, help="Resize images (default: the dataset's size)."),
    model_channels: int = typer.Option(32, help="UNet base width."),
    channel_mult: str = typer.Option("1,2,2", help="Width multiplier per UNet level."),
    num_res_blocks: int = typer.Option(1, help="Residual blocks per level."),
    attention: str = typer.Option("8", help="Feature-map sizes with self-attention."),
    dropout: float = typer.Option(0.0, help="Dropout in residual blocks."),
    schedule: str = typer.Option("linear", help="Noise schedule: linear or cosine."),
    timesteps: int = typer.Option(1000, help="Training timesteps T."),
    weighting: str = typer.Option("uniform", help="Loss weighting plugin (e.g. p2)."),
    seed: int = typer.Option(0, help="Seed of every random stream."),
    bf16: bool = typer.Option(False, help="bf16 autocast."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    resume: bool = typer.Option(False, help="Continue the checkpoint in --out."),
    save_every: int = typer.Option(500, help="Steps between checkpoints."),
    log_every: int = typer.Option(50, help="Steps between metric lines."),
    samples: int = typer.Option(64, help="Sample grid size written at the end (0: none)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a DDPM noise predictor ε_θ. Weighting options (e.g. --p2-gamma) follow --weighting."""
    images = load_dataset(data, "train", image_size, seed)
    spec = get_registry().weighting(weighting)
    (weighting_options,) = parse_plugin_options([(f"weighting '{weighting}'", spec.options)],
                                                ctx.args)
    unet_cfg = UNetConfig(
        image_size=images.image_size,
        in_channels=images.channels,
        model_channels=model_channels,
        channel_mult=parse_ints(channel_mult, "--channel-mult"),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_ints(attention, "--attention"),
        dropout=dropout,
    )
    cfg = TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, ema_decay=ema_decay, grad_clip=grad_clip,
        bf16=bf16, compile=compile, seed=seed, save_every=save_every, log_every=log_every,
        device=device,
    )
    summary = train(
        images, out, unet=unet_cfg,
        schedule=ScheduleConfig(kind=schedule, num_timesteps=timesteps),
        weighting=weighting, weighting_options=weighting_options, config=cfg, resume=resume,
        samples=samples, progress=not json_out,
    )
    if not is_main_process():
        return
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(f"trained {KIND} in {summary['seconds']} s -> {out}")
