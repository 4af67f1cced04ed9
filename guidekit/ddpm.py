"""DDPM: the ε-prediction training task, ``guidekit train ddpm``, and loading a trained DPM."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from guidekit import lookup, ops
from guidekit import trainer_options as opt
from guidekit.checkpoint import CONFIG, Checkpoint, load_module, read_checkpoint
from guidekit.config import ConfigMixin, config_field
from guidekit.data import MAX_IMAGE_SIZE, ImageData, save_image_grid
from guidekit.distributed import resolve_device
from guidekit.engine import VARIANCES, Sampler
from guidekit.errors import CheckpointError, GuidekitError
from guidekit.lookup import load_dataset, model_builder, weighting_table
from guidekit.options import Option
from guidekit.schedule import SPACINGS, NoiseSchedule, ScheduleConfig
from guidekit.specs import StepReport, TrainerContext
from guidekit.training import TrainConfig, check_trainable, fit
from guidekit.unet import UNet, UNetConfig

__all__ = [
    "DDPMTask",
    "DDPM_OPTIONS",
    "DPM",
    "KIND",
    "SamplingDefaults",
    "data_meta",
    "ddpm_trainer",
    "load_dpm",
    "per_sample_mse",
    "sample_grid",
    "train_ddpm",
]


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


@dataclass(frozen=True)
class SamplingDefaults(ConfigMixin):
    """How a DPM samples when the caller does not say (``config.json``'s ``"sampling"``):
    a converted diffusers model keeps its scheduler's ``clip_sample``, ``variance_type`` and
    ``timestep_spacing``; guidekit's own DPMs have none and take these defaults."""

    clip_x0: bool = True
    variance: str = "small"
    spacing: str | None = None  # None: leading for DDIM, linspace for DDPM

    def __post_init__(self) -> None:
        if not isinstance(self.clip_x0, bool):
            raise GuidekitError(f"sampling.clip_x0 must be true or false, got {self.clip_x0!r}")
        if self.variance not in VARIANCES:
            raise GuidekitError(f"sampling.variance must be one of {', '.join(VARIANCES)}, "
                                f"got {self.variance!r}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise GuidekitError(f"sampling.spacing must be one of {', '.join(SPACINGS)}, "
                                f"got {self.spacing!r}")


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

    @functools.cached_property
    def defaults(self) -> SamplingDefaults:
        """Clipping, fixed Σ and step spacing when a command gives none."""
        d = self.config.get("sampling", {})
        if not isinstance(d, dict):
            raise GuidekitError(f"{self.checkpoint.path}: config.json's 'sampling' must be an "
                                "object")
        return SamplingDefaults.from_dict(d)

    def sampler(self, **kwargs: Any) -> Sampler:
        """A :class:`~guidekit.engine.Sampler` over this model and schedule (``steps="ddim50"``,
        ``clip_x0``, ... as keyword arguments); ``clip_x0`` and ``variance`` left out (or None)
        are the DPM's :attr:`defaults`."""
        d = self.defaults
        if kwargs.get("clip_x0") is None:
            kwargs["clip_x0"] = d.clip_x0
        if kwargs.get("variance") is None:
            kwargs["variance"] = d.variance
        return Sampler(self.model, self.schedule, **kwargs)


def load_dpm(path: str | Path, device: str | torch.device = "cpu", role: str = "ema") -> DPM:
    """Load a ``ddpm`` checkpoint (EMA weights by default), frozen, in eval mode, on
    ``device`` (``auto``: a GPU when there is one)."""
    device = resolve_device(device)
    ckpt = read_checkpoint(path, KIND)
    with ckpt.reading():
        schedule = NoiseSchedule.from_config(ScheduleConfig.from_dict(ckpt.section("schedule")))
        data = ckpt.section("data")
        config_field(data, "channels", (int,), "'data'", low=1, high=1024)
        config_field(data, "image_size", (int,), "'data'", low=1, high=MAX_IMAGE_SIZE)
        build = model_builder(ckpt.section("model"))
    model = load_module(ckpt, role, "model", build)
    ckpt.close()
    mc = getattr(model, "config", None)
    if getattr(mc, "in_channels", data["channels"]) != data["channels"]:
        raise CheckpointError(f"{ckpt.path / CONFIG}: 'data' says {data['channels']} channels "
                              f"but the model takes {mc.in_channels}; the checkpoint is "
                              "damaged: re-train or restore it")
    model.to(device).eval().requires_grad_(False)
    dpm = DPM(model, schedule.to(device), ckpt)
    dpm.defaults  # noqa: B018 -- read once at load, so a bad "sampling" entry fails here
    return dpm


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
    resolved = lookup.weighting_options(weighting, weighting_options)
    meta = {"name": weighting, "options": _plain(resolved)}
    check_trainable(lambda: UNet(unet), config, f"a UNet {_size_text(unet)}", _SMALLER)
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


_SMALLER = "lower --model-channels, --channel-mult or --num-res-blocks"


def _size_text(cfg: UNetConfig) -> str:
    return (f"of --model-channels {cfg.model_channels}, --channel-mult "
            f"{','.join(f'{m:g}' for m in cfg.channel_mult)}, --num-res-blocks "
            f"{cfg.num_res_blocks}")


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """Option values as JSON values (paths as strings, tuples as lists)."""
    return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            for k, v in values.items()}


DDPM_OPTIONS: tuple[Option, ...] = (
    opt.DATA,
    opt.out_option("runs/ddpm"),
    opt.IMAGE_SIZE,
    *opt.unet_options(),
    Option("schedule", str, "linear", "Noise schedule.", choices=("linear", "cosine")),
    Option("timesteps", int, 1000, "Training timesteps T."),
    opt.WEIGHTING,
    *opt.train_options(steps=2000, batch_size=32, lr=1e-3, ema_decay=0.995),
    Option("samples", int, 64, "Sample grid size written at the end (0: none)."),
)


def ddpm_trainer(ctx: TrainerContext) -> StepReport:
    """``guidekit train ddpm``: train a DDPM noise predictor ε_θ. Weighting options (e.g.
    --p2-gamma) follow --weighting."""
    o = ctx.options
    images = load_dataset(o["data"], "train", o["image_size"], o["seed"])
    unet_cfg = UNetConfig(
        image_size=images.image_size,
        in_channels=images.channels,
        model_channels=o["model_channels"],
        channel_mult=opt.parse_ints(o["channel_mult"], "--channel-mult"),
        num_res_blocks=o["num_res_blocks"],
        attention_resolutions=opt.parse_ints(o["attention"], "--attention"),
        num_heads=o["num_heads"],
        dropout=o["dropout"],
    )
    summary = train_ddpm(
        images, o["out"], unet=unet_cfg,
        schedule=ScheduleConfig(kind=o["schedule"], num_timesteps=o["timesteps"]),
        weighting=o["weighting"], weighting_options=ctx.weighting_options,
        config=opt.train_config(o), resume=o["resume"], samples=o["samples"],
        progress=ctx.progress,
    )
    return StepReport(f"trained {KIND} in {summary['seconds']} s -> {o['out']}",
                      metrics=summary)
