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
from guidekit.vlb import vlb_terms

__all__ = [
    "DDPMTask",
    "DDPM_OPTIONS",
    "DPM",
    "KIND",
    "SamplingDefaults",
    "VLB_WEIGHT",
    "check_objective",
    "data_meta",
    "ddpm_trainer",
    "load_dpm",
    "per_sample_mse",
    "sample_grid",
    "train_ddpm",
]


KIND = "ddpm"
VLB_WEIGHT = 0.001  # improved DDPM's λ of the hybrid objective


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample, (B,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


class DDPMTask:
    """L = E[λ_t ‖ε − ε_θ(x_t, t[, y])‖²] with λ from a weighting plugin; with a learned Σ
    (improved DDPM's hybrid objective) plus ``vlb_weight``·T·L_t, the bound's term at the
    sampled t on a stop-gradient mean, so it trains Σ alone.

    A class-conditional UNet sees the batch's labels; with ``cond_drop`` p each label is
    replaced by the null class ∅ with probability p, so the same network learns
    ε(x_t, ∅) for classifier-free guidance.
    """

    kind = KIND

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        weights: Tensor,
        weighting: dict[str, Any],
        data: ImageData,
        model_entry: dict[str, Any] | None = None,
        *,
        cond_drop: float = 0.0,
        vlb_weight: float = VLB_WEIGHT,
    ) -> None:
        cfg = getattr(model, "config", None)
        self.learn_sigma = bool(getattr(cfg, "learn_sigma", False))
        self.num_classes = getattr(cfg, "num_classes", None)
        self.null_label = getattr(model, "null_label", None)
        check_objective(self.num_classes, self.null_label is not None, cond_drop, vlb_weight,
                        data)
        self.model = model
        self.schedule = schedule
        self.weights = weights
        self.weighting = weighting
        self.model_entry = model_entry or {"name": "unet", "config": cfg.to_dict()}
        self.cond_drop = float(cond_drop)
        self.vlb_weight = float(vlb_weight)
        self.data_meta = data_meta(data)

    def trainable(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def _condition(self, labels: Tensor | None, gen: torch.Generator) -> tuple[Tensor, ...]:
        """The model's extra argument: the labels, some dropped to ∅; none if unconditional.
        The drop draw is taken only when dropping, so other runs keep their random streams."""
        if self.num_classes is None:
            return ()
        assert labels is not None  # check_objective refused unlabelled data
        if self.cond_drop > 0:
            drop = torch.rand(labels.shape, generator=gen, device=labels.device) < self.cond_drop
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        return (labels,)

    def loss(self, nets, x0, labels, gen) -> Tensor:
        tab = self.schedule.to(x0.device).tables
        t = torch.randint(0, self.schedule.num_steps, (x0.shape[0],), generator=gen,
                          device=x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        x_t = ops.q_sample(tab, x0, t, noise)
        out = nets["model"](x_t, t, *self._condition(labels, gen))
        eps, v = out.chunk(2, dim=1) if self.learn_sigma else (out, None)
        loss = self.weights.to(x0.device)[t] * per_sample_mse(eps, noise)
        if v is not None:
            # improved DDPM: λ·L_vlb with L_vlb estimated as T·L_t at the sampled t
            vb = vlb_terms(tab, x0, x_t, t, eps.detach().float(), v.float())
            loss = loss + self.vlb_weight * self.schedule.num_steps * vb
        return loss.mean()

    def config(self) -> dict[str, Any]:
        return {
            "model": self.model_entry,
            "schedule": self.schedule.config.to_dict(),
            "data": self.data_meta,
            "weighting": self.weighting,
            "objective": {"cond_drop": self.cond_drop,
                          "vlb_weight": self.vlb_weight if self.learn_sigma else None},
        }


def check_objective(num_classes: int | None, null_class: bool, cond_drop: float,
                    vlb_weight: float, data: ImageData) -> None:
    """One-line errors for a training objective the model or data cannot carry."""
    if isinstance(cond_drop, bool) or not 0 <= cond_drop < 1:
        raise GuidekitError(f"--cond-drop must be a probability in [0, 1), got {cond_drop!r}")
    if isinstance(vlb_weight, bool) or not 0 <= vlb_weight <= 1000:
        raise GuidekitError(f"--vlb-weight must be in [0, 1000], got {vlb_weight!r}")
    if cond_drop > 0 and not null_class:
        raise GuidekitError("--cond-drop needs a class-conditional model with a null class: "
                            "add --class-cond (a model from --init must have been trained "
                            "with --cond-drop)")
    if null_class and cond_drop == 0:
        raise GuidekitError("this model has a null class, which only --cond-drop > 0 trains: "
                            "give --cond-drop (e.g. 0.1)")
    if num_classes is None:
        return
    if data.labels is None:
        raise GuidekitError(f"a class-conditional DPM needs labels but '{data.name}' has "
                            "none: give a labelled dataset (digits, shapes) or drop "
                            "--class-cond")
    if data.num_classes != num_classes:
        raise GuidekitError(f"the model has {num_classes} classes but '{data.name}' has "
                            f"{data.num_classes}: train on data with the model's classes")


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
    """Write an unguided sample grid of the checkpoint beside it (a class-conditional DPM:
    classes in ascending blocks)."""
    from guidekit.sampling import sample

    dpm = load_dpm(checkpoint)
    k = getattr(getattr(dpm.model, "config", None), "num_classes", None)
    classes = [] if k is None else [i * k // n for i in range(n)]  # ascending class blocks
    x = sample(dpm, n, sampler=sampler, steps=steps, seed=seed, classes=classes)
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
    cond_drop: float = 0.0,
    vlb_weight: float = VLB_WEIGHT,
    init: str | Path | None = None,
) -> dict[str, Any]:
    """Train a DDPM on ``data`` into checkpoint ``out``; writes ``samples.png`` beside it.

    ``unet.num_classes`` makes it class-conditional on the data's labels, with
    ``unet.null_class`` and ``cond_drop`` > 0 also unconditional (classifier-free guidance);
    ``unet.learn_sigma`` trains Σ with the hybrid objective (``vlb_weight`` = λ). ``init``:
    fine-tune a ``ddpm`` checkpoint (its EMA weights, network and schedule; a converted
    openai model too) instead of starting from random weights; ``unet`` and ``schedule``
    must then be None.

    Returns a summary (checkpoint, steps, final loss, seconds, images/s, sample grid).
    """
    out = Path(out)
    config = config or TrainConfig()
    if init is not None:
        if unet is not None or schedule is not None:
            raise GuidekitError("the network and schedule come from --init: drop the "
                                "network and schedule options")
        if resume:
            raise GuidekitError("--init starts a new run and --resume continues one: give "
                                "one of them")
        start = load_dpm(init)
        model, sched = start.model, start.schedule.to("cpu")
        entry = dict(start.config["model"])
        unet = getattr(model, "config", None)
        model.requires_grad_(True).train().to("cpu")
    else:
        unet = unet or UNetConfig()
        sched = NoiseSchedule.from_config(schedule or ScheduleConfig())
        entry = None
    shape = (getattr(unet, "in_channels", None), getattr(unet, "image_size", None))
    if shape != (data.channels, data.image_size):
        raise GuidekitError(
            f"the UNet is configured for {shape[0]}x{shape[1]}px images but "
            f"'{data.name}' has {data.channels}x{data.image_size}px"
            + (": give --data of the model's size, or --image-size" if init else "")
        )
    weights = weighting_table(weighting, sched, weighting_options)
    resolved = lookup.weighting_options(weighting, weighting_options)
    meta = {"name": weighting, "options": _plain(resolved)}
    if init is None:
        check_trainable(lambda: UNet(unet), config, f"a UNet {_size_text(unet)}", _SMALLER)
        torch.manual_seed(config.seed)  # the initial weights
        model = UNet(unet)
    else:
        check_trainable(model_builder(entry), config, f"the model of --init {init}",
                        "fine-tune on a device with more memory (--device)")
    task = DDPMTask(model, sched, weights, meta, data, entry, cond_drop=cond_drop,
                    vlb_weight=vlb_weight)
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
    Option("class_cond", bool, False, "Class-conditional on the data's labels (ε(x_t, y, t))."),
    Option("cond_drop", float, 0.0, "With --class-cond: probability of training a label as "
           "the null class ∅, so the network is also unconditional (for --guidance cfg); "
           "0.1-0.2 is usual."),
    Option("learn_sigma", bool, False, "Also learn Σ (improved DDPM's variance "
           "interpolation), with the hybrid objective L_simple + λ·L_vlb."),
    Option("vlb_weight", float, VLB_WEIGHT, "λ of the hybrid objective (with a learned Σ)."),
    Option("init", Path, None, "Fine-tune this ddpm checkpoint (its EMA weights, network and "
           "schedule; a converted openai model too) instead of random weights."),
    opt.WEIGHTING,
    *opt.train_options(steps=2000, batch_size=32, lr=1e-3, ema_decay=0.995),
    Option("samples", int, 64, "Sample grid size written at the end (0: none)."),
)

# The options that shape the network and schedule: with --init they come from the checkpoint
_ARCHITECTURE = ("model_channels", "channel_mult", "num_res_blocks", "attention", "num_heads",
                 "dropout", "schedule", "timesteps", "class_cond", "learn_sigma")


def _given_architecture(o: dict[str, Any]) -> list[str]:
    """The architecture flags whose values differ from their defaults."""
    defaults = {opt_.name: opt_.default for opt_ in DDPM_OPTIONS}
    return [f"--{n.replace('_', '-')}" for n in _ARCHITECTURE if o[n] != defaults[n]]


def ddpm_trainer(ctx: TrainerContext) -> StepReport:
    """``guidekit train ddpm``: train a DDPM noise predictor ε_θ (class-conditional with
    --class-cond, with a learned Σ with --learn-sigma, or fine-tuned from --init). Weighting
    options (e.g. --p2-gamma) follow --weighting."""
    o = ctx.options
    if o["cond_drop"] and not o["class_cond"] and o["init"] is None:
        raise GuidekitError("--cond-drop trains the null class of a class-conditional model: "
                            "add --class-cond")
    images = load_dataset(o["data"], "train", o["image_size"], o["seed"])
    unet_cfg = sched = None
    if o["init"] is not None:
        given = _given_architecture(o)
        if given:
            raise GuidekitError(f"the network and schedule come from --init: drop "
                                f"{', '.join(given)}")
    else:
        if o["class_cond"] and images.labels is None:
            raise GuidekitError(f"--class-cond needs labels but '{images.name}' has none: "
                                "give a labelled dataset (digits, shapes)")
        unet_cfg = UNetConfig(
            image_size=images.image_size,
            in_channels=images.channels,
            model_channels=o["model_channels"],
            channel_mult=opt.parse_ints(o["channel_mult"], "--channel-mult"),
            num_res_blocks=o["num_res_blocks"],
            attention_resolutions=opt.parse_ints(o["attention"], "--attention"),
            num_heads=o["num_heads"],
            dropout=o["dropout"],
            learn_sigma=o["learn_sigma"],
            num_classes=images.num_classes if o["class_cond"] else None,
            null_class=bool(o["class_cond"] and o["cond_drop"] > 0),
        )
        sched = ScheduleConfig(kind=o["schedule"], num_timesteps=o["timesteps"])
    summary = train_ddpm(
        images, o["out"], unet=unet_cfg, schedule=sched,
        weighting=o["weighting"], weighting_options=ctx.weighting_options,
        config=opt.train_config(o), resume=o["resume"], samples=o["samples"],
        progress=ctx.progress, cond_drop=o["cond_drop"], vlb_weight=o["vlb_weight"],
        init=o["init"],
    )
    return StepReport(f"trained {KIND} in {summary['seconds']} s -> {o['out']}",
                      metrics=summary)
