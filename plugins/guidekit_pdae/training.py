"""PDAE training on a frozen DPM, and loading a trained PDAE.

Loss (DESIGN.md): z = E_φ(x_0), ε̂ = ε_θ(x_t, t) − √α_t (1−ᾱ_{t−1})/√(1−ᾱ_t) · G_ψ(x_t, z, t),
L = λ_t ‖ε − ε̂‖²: G_ψ learns the mean shift β̃_t·G that fills the posterior mean gap of the
pre-trained model. Only E_φ and G_ψ train; ε_θ runs without autograd and is never written.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from guidekit import (
    DPM,
    CheckpointError,
    GuidekitError,
    ImageData,
    NoiseSchedule,
    Option,
    StepReport,
    TrainConfig,
    TrainerContext,
    load_dataset,
    load_dpm,
    ops,
)
from guidekit import trainer_options as opt
from guidekit.checkpoint import CONFIG, load_module, read_checkpoint
from guidekit.config import config_field
from guidekit.ddpm import data_meta, per_sample_mse
from guidekit.distributed import resolve_device
from guidekit.lookup import weighting_table
from guidekit.training import check_trainable, fit
from guidekit.unet import DownFeatures, UNet

from .networks import (
    Encoder,
    EncoderConfig,
    EstimatorConfig,
    GradientEstimator,
    PDAEModel,
)

KIND = "pdae"
ENCODE_BATCH = 256


def fingerprint(*modules: nn.Module) -> str:
    """A short SHA-256 of the modules' weights: identifies a model independent of its path."""
    h = hashlib.sha256()
    for m in modules:
        for name, v in sorted(m.state_dict().items()):
            h.update(name.encode())
            h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_data(dpm: DPM, data: ImageData, source: str) -> None:
    """Raise a one-line error when ``data`` does not have the DPM's image shape."""
    c, s, _ = dpm.image_shape
    if (data.channels, data.image_size) != (c, s):
        raise GuidekitError(
            f"the DPM at {source} works on {c}x{s}x{s} images but '{data.name}' has "
            f"{data.channels}x{data.image_size}x{data.image_size}: use data of the DPM's size "
            f"(or --image-size {s} when only the size differs)"
        )


class PDAETask:
    """L = λ_t ‖ε − (ε_θ(x_t,t) − coef_t · G_ψ(x_t, E_φ(x_0), t))‖², ε_θ frozen."""

    kind = KIND

    def __init__(
        self,
        unet: UNet,
        encoder: Encoder,
        estimator: GradientEstimator,
        schedule: NoiseSchedule,
        weights: Tensor,
        meta: dict[str, Any],
    ) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.encoder = encoder
        self.estimator = estimator
        self.schedule = schedule
        self.weights = weights
        self.meta = meta
        self._frozen: Callable[..., tuple[DownFeatures, Tensor]] = self._frozen_forward

    def trainable(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "estimator": self.estimator}

    def compile_frozen(self) -> None:
        """Compile the frozen ε_θ's forward too (``--compile``): it is most of the step's
        forward work, and :func:`~guidekit.training.fit` compiles only what trains."""
        self._frozen = torch.compile(self._frozen_forward)

    def _frozen_forward(self, x_t: Tensor, t: Tensor, y: Tensor | None, channels: int
                        ) -> tuple[DownFeatures, Tensor]:
        with torch.no_grad():  # the frozen down path runs once and feeds both heads
            feats = self.unet.down(x_t, t, y)
            return feats, self.unet.middle_up(feats)[:, :channels]  # ε only, if Σ is learned

    def loss(self, nets, x0: Tensor, labels: Tensor | None, gen: torch.Generator) -> Tensor:
        if next(self.unet.parameters()).device != x0.device:
            self.unet.to(x0.device)
        tab = self.schedule.to(x0.device).tables
        t = torch.randint(0, self.schedule.num_steps, (x0.shape[0],), generator=gen,
                          device=x0.device)
        noise = torch.randn(x0.shape, generator=gen, device=x0.device)
        x_t = ops.q_sample(tab, x0, t, noise)
        y = None
        if self.unet.config.num_classes is not None:  # a class-conditional DPM
            if labels is None:
                raise GuidekitError("the DPM is class-conditional: PDAE trains it on "
                                    "labelled data (each image's class conditions ε_θ)")
            y = labels
        feats, eps = self._frozen(x_t, t, y, x0.shape[1])
        g = nets["estimator"](feats, nets["encoder"](x0))
        eps_hat = ops.guided_eps(tab, x_t, t, eps.float(), g.float())
        return (self.weights.to(x0.device)[t] * per_sample_mse(eps_hat, noise)).mean()

    def config(self) -> dict[str, Any]:
        return {
            **self.meta,
            "encoder": self.encoder.config.to_dict(),
            "estimator": self.estimator.config.to_dict(),
        }


def train_pdae(
    data: ImageData,
    out: str | Path,
    *,
    pretrained: str | Path,
    latent_dim: int = 64,
    encoder_channels: int = 32,
    weighting: str = "pdae",
    weighting_options: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train E_φ and G_ψ on ``data`` against the frozen DPM at ``pretrained``."""
    dpm = load_dpm(pretrained)
    if not isinstance(dpm.model, UNet):
        raise GuidekitError(f"PDAE needs a UNet DPM; {pretrained} holds "
                            f"'{dpm.config['model']['name']}'")
    check_data(dpm, data, str(pretrained))
    if dpm.model.config.num_classes is not None and data.labels is None:
        raise GuidekitError(f"the DPM at {pretrained} is class-conditional: train PDAE on "
                            "labelled data (each image's class conditions ε_θ)")
    config = config or TrainConfig()
    weights = weighting_table(weighting, dpm.schedule, weighting_options)
    c, s, _ = dpm.image_shape
    enc_cfg = EncoderConfig(image_size=s, in_channels=c, channels=encoder_channels,
                            channel_mult=_encoder_levels(s), latent_dim=latent_dim)
    est_cfg = EstimatorConfig(dpm.model.config, latent_dim)
    check_trainable(lambda: nn.ModuleList([Encoder(enc_cfg), GradientEstimator(est_cfg)]),
                    config, f"a PDAE of --encoder-channels {encoder_channels} and "
                    f"--latent-dim {latent_dim}", "lower --encoder-channels or --latent-dim")
    torch.manual_seed(config.seed)  # the initial weights
    encoder = Encoder(enc_cfg)
    estimator = GradientEstimator(est_cfg)
    meta = {
        "pretrained": {
            "path": str(Path(pretrained).resolve()),
            "fingerprint": fingerprint(dpm.model),
            "model": dpm.config["model"],
        },
        "schedule": dpm.config["schedule"],
        "data": data_meta(data),
        "weighting": {"name": weighting, "options": dict(weighting_options or {})},
    }
    task = PDAETask(dpm.model, encoder, estimator, dpm.schedule, weights, meta)
    result = fit(task, data, out, config, resume=resume, progress=progress)
    return {
        "checkpoint": str(out),
        "steps": result.step,
        "final_loss": result.loss,
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
    }


PDAE_OPTIONS: tuple[Option, ...] = (
    Option("pretrained", Path, help="The frozen DDPM checkpoint to build on.", required=True),
    opt.DATA,
    opt.out_option("runs/pdae"),
    opt.IMAGE_SIZE,
    Option("latent_dim", int, 64, "Size of z."),
    Option("encoder_channels", int, 32, "Base width of the encoder E_φ."),
    opt.WEIGHTING.with_default("pdae"),
    *opt.train_options(steps=2000, batch_size=32, lr=1e-3, ema_decay=0.995),
)


def pdae_trainer(ctx: TrainerContext) -> StepReport:
    """Train PDAE's encoder and gradient estimator on a frozen DPM (its weights never change).
    Weighting options (e.g. --pdae-gamma) follow --weighting."""
    o = ctx.options
    images = load_dataset(o["data"], "train", o["image_size"], o["seed"])
    summary = train_pdae(
        images, o["out"], pretrained=o["pretrained"], latent_dim=o["latent_dim"],
        encoder_channels=o["encoder_channels"], weighting=o["weighting"],
        weighting_options=ctx.weighting_options, config=opt.train_config(o),
        resume=o["resume"], progress=ctx.progress,
    )
    return StepReport(f"trained {KIND} in {summary['seconds']} s -> {o['out']}",
                      metrics=summary)


def _encoder_levels(image_size: int) -> tuple[int, ...]:
    """Halve down to 4 px or less (16 px → 3 levels, 32 px → 3 levels capped at ×4)."""
    levels = 1
    while image_size // 2 ** (levels + 1) >= 2 and image_size % 2 ** (levels + 1) == 0:
        levels += 1
    return tuple(min(2**i, 4) for i in range(min(levels, 4)))


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedPDAE:
    """A trained PDAE beside its frozen DPM, in eval mode, without gradients."""

    dpm: DPM
    model: PDAEModel
    config: dict[str, Any]  # the PDAE checkpoint's config.json
    path: Path
    fingerprint: str  # of E_φ and G_ψ: latents carry it

    @property
    def latent_dim(self) -> int:
        """Size of z."""
        return self.model.encoder.config.latent_dim

    @property
    def device(self) -> torch.device:
        """Where the networks live."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, x0: Tensor) -> Tensor:
        """z = E_φ(x_0) for images in [−1, 1], in batches."""
        return torch.cat([self.model.encoder(b.to(self.device))
                          for b in x0.split(ENCODE_BATCH)])

    @torch.no_grad()
    def shift(
        self, x_t: Tensor, t: Tensor, z: Tensor, y: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(ε_θ, G_ψ) at x_t, original timesteps t, latent z (and class labels y for a
        class-conditional DPM)."""
        return self.model(x_t, t, z, y)

    @property
    def conditional(self) -> bool:
        """Whether the frozen DPM is class-conditional."""
        return self.model.unet.config.num_classes is not None

    def labels(self, images: ImageData, n: int | None = None) -> Tensor | None:
        """The labels of the first ``n`` images for a class-conditional DPM (else None)."""
        if not self.conditional:
            return None
        if images.labels is None:
            raise GuidekitError(f"the DPM is class-conditional: '{images.name}' has no labels "
                                "to condition it on")
        return images.labels[:n].to(self.device)

    def require_unconditional(self, what: str) -> None:
        """A one-line error for commands not yet carrying labels through."""
        if self.conditional:
            raise GuidekitError(f"{what} does not support a class-conditional DPM yet: the "
                                "PDAE of one trains and runs pdae gap / onestep")


def load_pdae(
    path: str | Path, pretrained: str | Path | None = None, device: str | torch.device = "cpu"
) -> LoadedPDAE:
    """Load a PDAE checkpoint and the DPM it was trained on (``pretrained`` overrides the
    recorded path); a DPM whose weights differ from the ones trained against is an error.
    ``device`` may be ``auto`` (a GPU when there is one)."""
    device = resolve_device(device)
    ckpt = read_checkpoint(path, KIND)
    rec = ckpt.section("pretrained")
    where = f"{ckpt.path / CONFIG} 'pretrained'"
    recorded = config_field(rec, "path", (str,), where)
    config_field(rec, "fingerprint", (str,), where)
    source = Path(pretrained) if pretrained is not None else Path(recorded)
    try:
        dpm = load_dpm(source, device)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; the PDAE at {path} needs the DPM it was trained on "
                              f"(pass --pretrained DPM_CHECKPOINT)") from None
    if fingerprint(dpm.model) != rec["fingerprint"]:
        raise CheckpointError(
            f"the DPM at {source} is not the one the PDAE at {path} was trained on (weights "
            f"fingerprint {fingerprint(dpm.model)} vs {rec['fingerprint']}): pass --pretrained "
            "with that checkpoint"
        )
    encoder = load_module(ckpt, "ema", "encoder", lambda: Encoder(
        EncoderConfig.from_dict(ckpt.section("encoder"))))
    estimator = load_module(ckpt, "ema", "estimator", lambda: GradientEstimator(
        EstimatorConfig.from_dict(ckpt.section("estimator"))))
    ckpt.close()
    assert isinstance(dpm.model, UNet)
    model = PDAEModel(dpm.model, encoder, estimator).to(device).eval().requires_grad_(False)
    return LoadedPDAE(dpm, model, ckpt.config, Path(path), fingerprint(encoder, estimator))
