"""DDPM: the ε-prediction training task, ``guidekit train ddpm``, and loading a trained DPM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import typer
from torch import Tensor, nn

from guidekit import ops
from guidekit import trainer_options as opt
from guidekit.checkpoint import Checkpoint, load_weights, read_checkpoint
from guidekit.data import ImageData, load_dataset, save_image_grid
from guidekit.engine import Sampler
from guidekit.errors import GuidekitError
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


def train_ddpm(
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


def train_ddpm_command(
    ctx: typer.Context,
    data: opt.Data = "digits",
    out: opt.Out = Path("runs/ddpm"),
    steps: opt.Steps = 2000,
    batch_size: opt.BatchSize = 32,
    lr: opt.LR = 1e-3,
    weight_decay: opt.WeightDecay = 0.0,
    ema_decay: opt.EMADecay = 0.995,
    grad_clip: opt.GradClip = 1.0,
    image_size: opt.ImageSize = None,
    model_channels: opt.ModelChannels = 32,
    channel_mult: opt.ChannelMult = "1,2,2",
    num_res_blocks: opt.NumResBlocks = 1,
    attention: opt.Attention = "8",
    dropout: opt.Dropout = 0.0,
    schedule: str = typer.Option("linear", help="Noise schedule: linear or cosine."),
    timesteps: int = typer.Option(1000, help="Training timesteps T."),
    weighting: opt.Weighting = "uniform",
    seed: opt.Seed = 0,
    bf16: opt.BF16 = False,
    compile: opt.Compile = False,
    device: opt.Device = None,
    resume: opt.Resume = False,
    save_every: opt.SaveEvery = 500,
    log_every: opt.LogEvery = 50,
    samples: int = typer.Option(64, help="Sample grid size written at the end (0: none)."),
    json_out: opt.JSONOut = False,
) -> None:
    """Train a DDPM noise predictor ε_θ. Weighting options (e.g. --p2-gamma) follow --weighting."""
    images = load_dataset(data, "train", image_size, seed)
    unet_cfg = UNetConfig(
        image_size=images.image_size,
        in_channels=images.channels,
        model_channels=model_channels,
        channel_mult=parse_ints(channel_mult, "--channel-mult"),
        num_res_blocks=num_res_blocks,
        attention_resolutions=parse_ints(attention, "--attention"),
        dropout=dropout,
    )
    summary = train_ddpm(
        images, out, unet=unet_cfg,
        schedule=ScheduleConfig(kind=schedule, num_timesteps=timesteps),
        weighting=weighting, weighting_options=opt.weighting_options(ctx),
        config=opt.train_config(ctx), resume=resume, samples=samples, progress=not json_out,
    )
    opt.report(summary, json_out, f"trained {KIND} in {summary['seconds']} s -> {out}")
