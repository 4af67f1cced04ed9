"""PDAE's two trainable networks: the encoder E_φ (x_0 → z) and the gradient estimator
G_ψ(x_t, z, t), which runs on the frozen ε_θ's down-path features.

:class:`PDAEModel` puts them beside the frozen UNet so one forward gives both ε_θ and G: the
frozen down path runs once, without autograd, and feeds the UNet's own up path (ε_θ) and
G_ψ's trainable middle + up path, whose blocks take z by scale/shift of their normalisation.
G_ψ's output layer is zero-initialised, so PDAE starts as the pre-trained DPM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from guidekit import GuidekitError, UNetConfig
from guidekit.config import ConfigMixin
from guidekit.unet import (
    MAX_LEVELS,
    MAX_WIDTH,
    DownFeatures,
    UNet,
    build_middle_block,
    build_output_blocks,
    conv3x3,
    down_path_channels,
    normalization,
    zero_module,
)


@dataclass
class EncoderConfig(ConfigMixin):
    """A strided CNN: ``channels * mult`` per level, each level halving the image."""

    image_size: int = 16
    in_channels: int = 1
    channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4)
    latent_dim: int = 64

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        for key in ("image_size", "in_channels", "channels", "latent_dim"):
            if not 1 <= getattr(self, key) <= MAX_WIDTH:
                raise GuidekitError(f"EncoderConfig.{key} must be in 1..{MAX_WIDTH}, got "
                                    f"{getattr(self, key)}")
        if not 1 <= len(self.channel_mult) <= MAX_LEVELS or not all(
                1 <= m <= MAX_LEVELS for m in self.channel_mult):
            raise GuidekitError(f"EncoderConfig.channel_mult must be 1 to {MAX_LEVELS} ints in "
                                f"1..{MAX_LEVELS}, got {self.channel_mult}")
        if self.image_size % 2 ** len(self.channel_mult):
            raise GuidekitError(
                f"EncoderConfig: image_size {self.image_size} is not divisible by "
                f"{2 ** len(self.channel_mult)} (one halving per channel_mult level)")


class Encoder(nn.Module):
    """E_φ: x_0 (B, C, H, W) → z (B, latent_dim)."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.channels
        layers: list[nn.Module] = [conv3x3(config.in_channels, ch)]
        for mult in config.channel_mult:
            out = config.channels * mult
            layers += [normalization(ch), nn.SiLU(), conv3x3(ch, out),
                       normalization(out), nn.SiLU(), nn.Conv2d(out, out, 3, 2, 1)]
            ch = out
        # Flatten rather than pool: G_ψ must know where the strokes are, and a pooled map
        # keeps only what is there.
        side = config.image_size // 2 ** len(config.channel_mult)
        layers += [normalization(ch), nn.SiLU(), nn.Flatten(),
                   nn.Linear(ch * side * side, config.latent_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise GuidekitError(f"the encoder expects ({c.in_channels}, {c.image_size}, "
                                f"{c.image_size}) images, got shape {tuple(x.shape)}")
        return self.net(x)


@dataclass
class EstimatorConfig(ConfigMixin):
    """G_ψ mirrors the middle and up path of the UNet whose features it reads."""

    unet: UNetConfig
    latent_dim: int = 64

    def to_dict(self) -> dict[str, Any]:
        return {"unet": self.unet.to_dict(), "latent_dim": self.latent_dim}


class GradientEstimator(nn.Module):
    """G_ψ(features of x_t, z): a middle + up path with z in every ResBlock's normalisation.

    It reads the frozen UNet's skips and time embedding, so its input layers are the UNet's
    own; only the blocks built here train. Output zero-initialised: G = 0 at the start.
    """

    def __init__(self, config: EstimatorConfig) -> None:
        super().__init__()
        self.config = config
        cfg, zd, emb = config.unet, config.latent_dim, 4 * config.unet.model_channels
        skip_chs, ch = down_path_channels(cfg)
        # The UNet's own builders with z added to every ResBlock: the same widths, heads,
        # resampling and time conditioning as the frozen middle and up path it mirrors.
        self.middle = build_middle_block(cfg, ch, emb, cond_channels=zd)
        self.up, ch = build_output_blocks(cfg, skip_chs, ch, emb, cond_channels=zd)
        self.out = nn.Sequential(
            cfg.norm(ch), nn.SiLU(), zero_module(conv3x3(ch, cfg.in_channels))
        )

    def forward(self, feats: DownFeatures, z: Tensor) -> Tensor:
        h = self.middle(feats.h, feats.emb, z)
        for block, skip in zip(self.up, reversed(feats.skips), strict=True):
            h = block(torch.cat([h, skip], dim=1), feats.emb, z)
        return self.out(h)


class PDAEModel(nn.Module):
    """The frozen ε_θ with E_φ and G_ψ: ``forward(x_t, t, z[, y]) -> (ε_θ, G)`` in one pass.

    A learned-Σ DPM's variance channels are dropped (PDAE shifts ε only); a class-conditional
    one takes each image's label ``y``."""

    def __init__(self, unet: UNet, encoder: Encoder, estimator: GradientEstimator) -> None:
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.encoder = encoder
        self.estimator = estimator

    def train(self, mode: bool = True) -> PDAEModel:
        super().train(mode)
        self.unet.eval()  # frozen: never in training mode
        return self

    def frozen_forward(
        self, x_t: Tensor, t: Tensor, y: Tensor | None = None
    ) -> tuple[Tensor, DownFeatures]:
        """ε_θ and the down-path features, without autograd."""
        with torch.no_grad():
            feats = self.unet.down(x_t, t, y)
            return self.unet.middle_up(feats)[:, : x_t.shape[1]], feats

    def forward(
        self, x_t: Tensor, t: Tensor, z: Tensor, y: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        eps, feats = self.frozen_forward(x_t, t, y)
        return eps, self.estimator(feats, z)
