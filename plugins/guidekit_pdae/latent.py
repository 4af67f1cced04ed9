"""A latent DPM over PDAE's z, so PDAE generates new images: ``guidekit train pdae-latent``
and ``guidekit pdae sample``.

Training encodes the data with E_φ, normalises z per dimension and fits an MLP ε-predictor
on the normalised latents with the shared loop (latents are stored as (N, D, 1, 1) "images",
so :func:`guidekit.training.fit` and the engine work unchanged). Sampling draws z with DDIM
on the latent DPM, un-normalises it, and decodes it with DDIM from random x_T on the frozen
DPM, guided by G_ψ(x_t, z, t) at scale 1. The trainer is :func:`latent_trainer`; the sample
command lives in :mod:`guidekit_pdae.cli`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from guidekit import (
    DPM,
    CheckpointError,
    GuidanceTerm,
    GuidekitError,
    ImageData,
    ModelSpec,
    NoiseSchedule,
    Option,
    ScheduleConfig,
    StepReport,
    TrainConfig,
    TrainerContext,
    load_dataset,
    ops,
)
from guidekit import trainer_options as opt
from guidekit.checkpoint import CONFIG, Checkpoint, load_module, read_checkpoint
from guidekit.config import ConfigMixin, check_value, config_field
from guidekit.ddpm import data_meta, per_sample_mse
from guidekit.distributed import resolve_device
from guidekit.engine import respacing
from guidekit.training import check_trainable, fit
from guidekit.unet import MAX_BLOCKS, MAX_WIDTH, timestep_embedding, zero_module

from .guidance import PDAEGuidance
from .training import LoadedPDAE, check_data, load_pdae

KIND = "pdae-latent"
MODEL_NAME = "latent_mlp"
STD_FLOOR = 1e-6  # a constant latent dimension must not divide by zero


# --------------------------------------------------------------------------- network


@dataclass
class LatentMLPConfig(ConfigMixin):
    """A residual MLP ε-predictor over D-dimensional latents."""

    latent_dim: int = 64
    hidden: int = 512
    depth: int = 4

    def __post_init__(self) -> None:
        for key, high in (("latent_dim", MAX_WIDTH), ("hidden", MAX_WIDTH), ("depth", MAX_BLOCKS)):
            if not 1 <= getattr(self, key) <= high:
                raise GuidekitError(f"LatentMLPConfig.{key} must be in 1..{high}, "
                                    f"got {getattr(self, key)}")


class LatentBlock(nn.Module):
    """h + MLP(SiLU(LayerNorm(h)·(1+scale) + shift)), scale/shift from the time embedding."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.emb = nn.Linear(width, 2 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = zero_module(nn.Linear(width, width))  # each block starts as the identity

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.emb(emb).chunk(2, dim=-1)
        y = F.silu(self.norm(h) * (1 + scale) + shift)
        return h + self.fc2(F.silu(self.fc1(y)))


class LatentMLP(nn.Module):
    """ε_θ(z_t, t) for latents shaped (B, D) or (B, D, 1, 1): a linear stem, pre-norm residual
    blocks, and a zero-initialised linear head on the residual stream."""

    def __init__(self, config: LatentMLPConfig) -> None:
        super().__init__()
        self.config = config
        w = config.hidden
        self.time = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.inp = nn.Linear(config.latent_dim, w)
        self.blocks = nn.ModuleList(LatentBlock(w) for _ in range(config.depth))
        # no norm before the head: a final LayerNorm would erase |z_t|, and ε̂ must scale
        # with it (ε̂ ≈ z_t at high noise); with one, samples came out 5x too wide
        self.out = zero_module(nn.Linear(w, config.latent_dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        d = self.config.latent_dim
        if x.shape[1] != d or x[0].numel() != d:
            raise GuidekitError(f"the latent DPM expects (B, {d}) or (B, {d}, 1, 1) latents, "
                                f"got shape {tuple(x.shape)}")
        emb = self.time(timestep_embedding(t, self.config.hidden).to(x.dtype))
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h).view_as(x)


def latent_model_spec() -> ModelSpec:
    """The ``latent_mlp`` model, for ``guidekit_models``: config.json names it like any DPM."""
    return ModelSpec(MODEL_NAME, LatentMLPConfig, LatentMLP,
                     help="Residual MLP ε-predictor over PDAE latents (pdae-latent).")


# --------------------------------------------------------------------------- training


def as_latent_data(z: Tensor, name: str) -> ImageData:
    """Latents (N, D) as an ImageData of (N, D, 1, 1) "images", so the shared loop runs as is."""
    if z.ndim != 2 or len(z) < 1:
        raise GuidekitError(f"latents must be (N, D) with N >= 1, got {tuple(z.shape)}")
    return ImageData(name=name, images=z.float()[:, :, None, None].contiguous(), labels=None,
                     num_classes=0)


def normalisation(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std (floored) of latents (N, D)."""
    z = z.double()
    std = z.std(0, correction=0).clamp(min=STD_FLOOR) if len(z) > 1 else torch.ones_like(z[0])
    return z.mean(0).float(), std.float()


class LatentTask:
    """L = ‖ε − ε_θ(z_t, t)‖² on normalised latents (uniform weighting)."""

    kind = KIND

    def __init__(self, model: LatentMLP, schedule: NoiseSchedule, meta: dict[str, Any]) -> None:
        self.model = model
        self.schedule = schedule
        self.meta = meta

    def trainable(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def loss(self, nets, x0: Tensor, labels: Tensor | None, gen: torch.Generator) -> Tensor:
        tab = self.schedule.to(x0.device).tables
        t = torch.randint(0, self.schedule.num_steps, (x0.shape[0],), generator=gen,
                          device=x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        eps = nets["model"](ops.q_sample(tab, x0, t, noise), t)
        return per_sample_mse(eps, noise).mean()

    def config(self) -> dict[str, Any]:
        return {
            **self.meta,
            "model": {"name": MODEL_NAME, "config": self.model.config.to_dict()},
            "schedule": self.schedule.config.to_dict(),
        }


def train_latent_dpm(
    latents: Tensor,
    out: str | Path,
    *,
    pdae: LoadedPDAE | None = None,
    data_name: str = "latents",
    hidden: int = 512,
    depth: int = 4,
    schedule: ScheduleConfig | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a latent DPM on ``latents`` (N, D); ``pdae`` is the PDAE they came from (its
    path and fingerprint are recorded; None for latents from elsewhere, e.g. tests)."""
    config = config or TrainConfig()
    mean, std = normalisation(latents)
    data = as_latent_data((latents.float() - mean) / std, f"{data_name}:z")
    sched = NoiseSchedule.from_config(schedule or ScheduleConfig())
    mlp = LatentMLPConfig(latents.shape[1], hidden, depth)
    check_trainable(lambda: LatentMLP(mlp), config, f"a latent DPM of --hidden {hidden} and "
                    f"--depth {depth}", "lower --hidden or --depth")
    torch.manual_seed(config.seed)  # the initial weights
    model = LatentMLP(mlp)
    meta = {
        "pdae": None if pdae is None else {
            "path": str(pdae.path.resolve()), "fingerprint": pdae.fingerprint},
        "data": data_meta(data),
        "normalisation": {"mean": mean.tolist(), "std": std.tolist()},
    }
    result = fit(LatentTask(model, sched, meta), data, out, config, resume=resume,
                 progress=progress)
    return {
        "checkpoint": str(out),
        "latents": len(latents),
        "latent_dim": int(latents.shape[1]),
        "steps": result.step,
        "final_loss": result.loss,
        "seconds": round(result.seconds, 2),
        "latents_per_second": round(result.images_per_second, 1),
    }


def train_pdae_latent(
    pdae_path: str | Path,
    data: ImageData,
    out: str | Path,
    *,
    hidden: int = 512,
    depth: int = 4,
    schedule: ScheduleConfig | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Encode ``data`` with the PDAE at ``pdae_path`` and train a latent DPM on its z."""
    pdae = load_pdae(pdae_path, device=device)
    check_data(pdae.dpm, data, str(pdae.config["pretrained"]["path"]))
    t0 = time.perf_counter()
    z = pdae.encode(data.images).cpu()
    encode_seconds = round(time.perf_counter() - t0, 2)
    summary = train_latent_dpm(z, out, pdae=pdae, data_name=data.name, hidden=hidden,
                               depth=depth, schedule=schedule, config=config, resume=resume,
                               progress=progress)
    return {**summary, "encode_seconds": encode_seconds}


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedLatentDPM:
    """A trained latent DPM (a :class:`~guidekit.ddpm.DPM` over (D, 1, 1)) and the
    normalisation of the latents it was trained on."""

    dpm: DPM
    mean: Tensor  # (D,)
    std: Tensor  # (D,)
    path: Path

    @property
    def latent_dim(self) -> int:
        """Size of the z this latent DPM generates."""
        return int(self.mean.numel())

    @property
    def pdae(self) -> dict[str, Any] | None:
        """The PDAE record (path, fingerprint), or None when trained on given latents."""
        return self.dpm.config.get("pdae")


def load_latent_dpm(
    path: str | Path, pdae: LoadedPDAE | None = None, device: str | torch.device = "cpu"
) -> LoadedLatentDPM:
    """Load a ``pdae-latent`` checkpoint's EMA weights; with ``pdae``, a latent DPM trained on
    another PDAE's latents is a one-line error. ``device`` may be ``auto``."""
    device = resolve_device(device)
    ckpt = read_checkpoint(path, KIND)
    if pdae is not None:
        check_pairing(ckpt, pdae)
    with ckpt.reading():
        mlp = LatentMLPConfig.from_dict(config_field(ckpt.section("model"), "config", (dict,),
                                                     "'model'"))
        sched = NoiseSchedule.from_config(ScheduleConfig.from_dict(ckpt.section("schedule")))
        norm = ckpt.section("normalisation")
        stats = [_floats(config_field(norm, k, (list,), "'normalisation'"),
                         mlp.latent_dim, f"'normalisation.{k}'") for k in ("mean", "std")]
    model = load_module(ckpt, "ema", "model", lambda: LatentMLP(mlp))
    ckpt.close()
    model.to(device).eval().requires_grad_(False)
    return LoadedLatentDPM(
        DPM(model, sched.to(device), ckpt),
        torch.tensor(stats[0], dtype=torch.float32, device=device),
        torch.tensor(stats[1], dtype=torch.float32, device=device),
        Path(path),
    )


def _floats(values: list, n: int, where: str) -> tuple[float, ...]:
    """``n`` finite numbers (the per-dimension latent statistics)."""
    if len(values) != n:
        raise GuidekitError(f"{where} must be {n} finite numbers, got {len(values)}")
    return check_value(values, tuple[float, ...], where)


def check_pairing(ckpt: Checkpoint, pdae: LoadedPDAE) -> None:
    """The latent DPM must have been trained on latents of exactly this PDAE."""
    rec = ckpt.config.get("pdae")
    if rec is not None:
        where = f"{ckpt.path / CONFIG} 'pdae'"
        rec = ckpt.section("pdae")
        for key in ("path", "fingerprint"):
            config_field(rec, key, (str,), where)
    if rec is None:
        raise CheckpointError(
            f"the latent DPM at {ckpt.path} was trained on given latents, not on a PDAE's: "
            f"train one with `guidekit train pdae-latent --pdae {pdae.path}`")
    if rec["fingerprint"] != pdae.fingerprint:
        raise CheckpointError(
            f"the latent DPM at {ckpt.path} was trained on latents of another PDAE "
            f"({rec['path']}, fingerprint {rec['fingerprint']}) than {pdae.path} (fingerprint "
            f"{pdae.fingerprint}): pass that --pdae, or train one with `guidekit train "
            f"pdae-latent --pdae {pdae.path}`")


# --------------------------------------------------------------------------- sampling


def _check_steps(steps: int, num_timesteps: int, flag: str) -> None:
    if not 1 <= steps <= num_timesteps:
        raise GuidekitError(f"{flag} must be in 1..{num_timesteps} (the model's training "
                            f"timesteps), got {steps}")


def sample_latents(
    latent: LoadedLatentDPM, n: int, *, steps: int = 100, seed: int = 0, eta: float = 0.0,
    progress: bool = False,
) -> Tensor:
    """Draw ``n`` latents (n, D) with DDIM on the latent DPM, in z's own (un-normalised)
    scale. x̂_0 is not clipped: normalised latents are not confined to [−1, 1]."""
    if n < 1:
        raise GuidekitError(f"--n must be >= 1, got {n}")
    _check_steps(steps, latent.dpm.schedule.num_steps, "--latent-steps")
    device = latent.mean.device
    engine = latent.dpm.sampler(steps=respacing("ddim", steps), clip_x0=False)
    gen = torch.Generator(device).manual_seed(seed)
    u = engine.ddim(shape=(n, latent.latent_dim, 1, 1), eta=eta, generator=gen, device=device,
                    progress=progress)
    return u.flatten(1) * latent.std + latent.mean


def decode_latents(
    pdae: LoadedPDAE, z: Tensor, *, steps: int = 100, seed: int = 0, scale: float = 1.0,
    progress: bool = False, x_T: Tensor | None = None,
) -> Tensor:
    """Images (n, C, H, W) in [−1, 1] from latents (n, D): DDIM from random x_T (from
    ``seed``, or the given ``x_T``) on the frozen DPM with the PDAE guidance (G_ψ toward z)
    at ``scale``."""
    pdae.require_unconditional("pdae sample")
    _check_steps(steps, pdae.dpm.schedule.num_steps, "--steps")
    device = pdae.device
    engine = pdae.dpm.sampler(steps=respacing("ddim", steps, pdae.dpm.defaults.spacing),
                              clip_x0=True)
    term = GuidanceTerm(PDAEGuidance(pdae, z.to(device)), scale=scale, name="pdae")
    shape = (len(z), *pdae.dpm.image_shape)
    if x_T is not None and tuple(x_T.shape) != shape:
        raise GuidekitError(f"x_T must have shape {shape} (one per latent), got "
                            f"{tuple(x_T.shape)}")
    gen = torch.Generator(device).manual_seed(seed)
    x = engine.ddim(None if x_T is None else x_T.to(device), shape=shape, guidance=[term],
                    generator=gen, device=device, progress=progress)
    return x.clamp(-1, 1)


def sample_pdae(
    pdae: LoadedPDAE, latent: LoadedLatentDPM, n: int = 64, *, steps: int = 100,
    latent_steps: int = 100, seed: int = 0, progress: bool = False,
) -> dict[str, Any]:
    """New images from PDAE: z from the latent DPM, then guided DDIM decoding.

    Returns ``{"z": (n, D), "images": (n, C, H, W), "latent_seconds", "decode_seconds"}``.
    x_T uses seed + 1 so it is not the latent DPM's starting noise reshaped.
    """
    check_pairing(latent.dpm.checkpoint, pdae)
    _check_steps(steps, pdae.dpm.schedule.num_steps, "--steps")
    t0 = time.perf_counter()
    z = sample_latents(latent, n, steps=latent_steps, seed=seed, progress=progress)
    t1 = time.perf_counter()
    x = decode_latents(pdae, z, steps=steps, seed=seed + 1, progress=progress)
    return {"z": z, "images": x, "latent_seconds": round(t1 - t0, 2),
            "decode_seconds": round(time.perf_counter() - t1, 2)}


# --------------------------------------------------------------------------- trainer


LATENT_OPTIONS: tuple[Option, ...] = (
    Option("pdae", Path, help="The PDAE checkpoint whose latents are modelled.", required=True),
    replace(opt.DATA, help="Dataset to encode (the PDAE's training data)."),
    opt.out_option("runs/pdae_latent"),
    opt.IMAGE_SIZE,
    Option("hidden", int, 512, "Width of the MLP."),
    Option("depth", int, 4, "Residual MLP blocks."),
    Option("schedule", str, "linear", "Noise schedule.", choices=("linear", "cosine")),
    Option("timesteps", int, 1000, "Training timesteps T of the latent DPM."),
    *opt.train_options(steps=3000, batch_size=256, lr=1e-3, ema_decay=0.995),
)


def latent_trainer(ctx: TrainerContext) -> StepReport:
    """Train a latent DPM over a PDAE's z (encoded from --data), so `guidekit pdae sample`
    can generate new images."""
    o = ctx.options
    config = opt.train_config(o)
    images = load_dataset(o["data"], "train", o["image_size"], o["seed"])
    summary = train_pdae_latent(
        o["pdae"], images, o["out"], hidden=o["hidden"], depth=o["depth"],
        schedule=ScheduleConfig(kind=o["schedule"], num_timesteps=o["timesteps"]),
        config=config, resume=o["resume"], progress=ctx.progress, device=o["device"],
    )
    return StepReport(f"trained {KIND} on {summary['latents']} latents of dim "
                      f"{summary['latent_dim']} in {summary['seconds']} s -> {o['out']}",
                      metrics=summary)

