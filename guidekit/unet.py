"""ADM-style UNet (Dhariwal & Nichol 2021) for ε_θ, and its encoder half as a noisy classifier.

The blocks are module-level so other methods (e.g. PDAE) can assemble their own paths from them.
Forward passes branch only on Python-level facts (shapes, ``None``), never on tensor values, so
the models compile with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from guidekit.config import ConfigMixin
from guidekit.errors import GuidekitError

__all__ = [
    "AttentionBlock",
    "BackboneConfig",
    "ClassifierConfig",
    "DownFeatures",
    "EmbedSequential",
    "EncoderUNet",
    "ResBlock",
    "UNet",
    "UNetConfig",
    "build_input_blocks",
    "build_middle_block",
    "build_time_embed",
    "conv3x3",
    "count_parameters",
    "down_path_channels",
    "normalization",
    "timestep_embedding",
    "zero_module",
]


# --------------------------------------------------------------------------- configs

@dataclass
class BackboneConfig(ConfigMixin):
    """Fields shared by the UNet and the classifier: the down path + middle block."""

    image_size: int = 16
    in_channels: int = 1
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)  # feature-map sizes (pixels) with attention
    num_heads: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so configs stay hashable and compare equal.
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        self.validate()

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level of the down path."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

    def validate(self) -> None:
        name = type(self).__name__
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise GuidekitError(f"{name}.channel_mult must be non-empty positive ints, "
                                f"got {self.channel_mult}")
        for key in ("image_size", "in_channels", "model_channels", "num_heads"):
            if getattr(self, key) < 1:
                raise GuidekitError(f"{name}.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_res_blocks < 0:
            raise GuidekitError(f"{name}.num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise GuidekitError(f"{name}.dropout must be in [0, 1), got {self.dropout}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise GuidekitError(
                f"{name}: image_size {self.image_size} is not divisible by {factor} "
                f"(= 2**(len(channel_mult)-1) for channel_mult {self.channel_mult}); use an "
                f"image_size that is a multiple of {factor} or fewer channel_mult levels"
            )
        bad = sorted(set(self.attention_resolutions) - set(self.resolutions))
        if bad:
            raise GuidekitError(f"{name}.attention_resolutions {bad} never occur; the feature "
                                f"maps are {list(self.resolutions)} pixels")
        for res, mult in zip(self.resolutions, self.channel_mult, strict=True):
            ch = self.model_channels * mult
            if res in self.attention_resolutions and ch % self.num_heads:
                raise GuidekitError(f"{name}: {ch} channels at resolution {res} are not "
                                    f"divisible by num_heads={self.num_heads}")
        # The middle block always has attention at the last level's width.
        if (self.model_channels * self.channel_mult[-1]) % self.num_heads:
            raise GuidekitError(f"{name}: middle-block channels "
                                f"{self.model_channels * self.channel_mult[-1]} are not "
                                f"divisible by num_heads={self.num_heads}")


@dataclass
class UNetConfig(BackboneConfig):
    """The ε-prediction UNet: the backbone's widths and levels, optionally also predicting v."""
    learn_sigma: bool = False  # also output v, the improved-DDPM variance interpolation value

    @property
    def out_channels(self) -> int:
        """Output channels: the image's, doubled when the variance is learned."""
        return self.in_channels * (2 if self.learn_sigma else 1)


@dataclass
class ClassifierConfig(BackboneConfig):
    num_classes: int = 10

    def validate(self) -> None:
        super().validate()
        if self.num_classes < 1:
            raise GuidekitError(f"ClassifierConfig.num_classes must be >= 1, "
                                f"got {self.num_classes}")


# --------------------------------------------------------------------------- blocks


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) in float32; t is the raw timestep, e.g. 0..T-1."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_module(m: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches and heads start as no-ops."""
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def normalization(ch: int) -> nn.GroupNorm:
    """GroupNorm with the largest of 32, 16, ... groups that divides ``ch``."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if ch % g == 0)
    return nn.GroupNorm(groups, ch)


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class ResBlock(nn.Module):
    """BigGAN-style residual block with AdaGN time conditioning (and optional extra condition).

    ``h = norm(h) * (1 + scale_t) + shift_t``; with ``cond_channels`` a second
    projection of ``cond`` then gives ``h = h * (1 + scale_c) + shift_c`` (PDAE's latent shift).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        up: bool = False,
        down: bool = False,
        cond_channels: int | None = None,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResBlock cannot be both up and down")
        out_channels = out_channels or channels
        self.cond_channels = cond_channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU())
        # Resample between the activation and the conv, on both branches, as ADM does.
        self.resample: nn.Module = (
            nn.Upsample(scale_factor=2, mode="nearest") if up
            else nn.AvgPool2d(2) if down
            else nn.Identity()
        )
        self.in_conv = conv3x3(channels, out_channels)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        # Default init, not zero: the zero-initialised output conv already makes the block
        # start as the identity, and a zero projection as well would keep z's gradient at
        # zero until two layers downstream had moved (measured: a less linear z).
        self.cond_layers = (
            nn.Linear(cond_channels, 2 * out_channels) if cond_channels else None
        )
        self.out_norm = normalization(out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(conv3x3(out_channels, out_channels))
        )
        self.skip = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor, cond: Tensor | None = None) -> Tensor:
        if (cond is None) != (self.cond_layers is None):
            raise GuidekitError(f"ResBlock(cond_channels={self.cond_channels}) got "
                                f"cond={'None' if cond is None else 'a tensor'}")
        h = self.in_conv(self.resample(self.in_layers(x)))
        x = self.resample(x)
        scale, shift = self.emb_layers(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        if self.cond_layers is not None:
            c_scale, c_shift = self.cond_layers(cond).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + c_scale) + c_shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all pixels."""

    def __init__(self, channels: int, num_heads: int = 4) -> None:
        super().__init__()
        if channels % num_heads:
            raise GuidekitError(f"AttentionBlock: {channels} channels not divisible by "
                                f"num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = normalization(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(self.norm(x))
        q, k, v = rearrange(
            qkv, "b (three n d) h w -> three b n (h w) d", three=3, n=self.num_heads
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b n (h w) d -> b (n d) h w", h=x.shape[2])
        return x + self.proj(out)


class EmbedSequential(nn.Sequential):
    """Sequential that hands ``emb`` to ResBlocks and ``cond`` only to those that take it."""

    def forward(self, x: Tensor, emb: Tensor, cond: Tensor | None = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, cond if layer.cond_layers is not None else None)
            else:
                x = layer(x)
        return x


# --------------------------------------------------------------------------- path builders


def build_time_embed(model_channels: int) -> nn.Sequential:
    """MLP on the sinusoidal embedding: model_channels -> 4 * model_channels."""
    emb_dim = 4 * model_channels
    return nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


def build_input_blocks(cfg: BackboneConfig, emb_dim: int) -> tuple[nn.ModuleList, list[int], int]:
    """The down path. Returns (blocks, channels of each skip in order, output channels).

    Every block produces one skip tensor (the input conv included), as in ADM.
    """
    mc = cfg.model_channels
    blocks = nn.ModuleList([EmbedSequential(conv3x3(cfg.in_channels, mc))])
    skip_chs, ch = [mc], mc
    for level, (mult, res) in enumerate(zip(cfg.channel_mult, cfg.resolutions, strict=True)):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, mc * mult, cfg.dropout)]
            ch = mc * mult
            if res in cfg.attention_resolutions:
                layers.append(AttentionBlock(ch, cfg.num_heads))
            blocks.append(EmbedSequential(*layers))
            skip_chs.append(ch)
        if level < len(cfg.channel_mult) - 1:
            blocks.append(EmbedSequential(ResBlock(ch, emb_dim, ch, cfg.dropout, down=True)))
            skip_chs.append(ch)
    return blocks, skip_chs, ch


def down_path_channels(cfg: BackboneConfig) -> tuple[list[int], int]:
    """(channels of each skip, output channels) of :func:`build_input_blocks`, without
    building it: for networks that read a UNet's features (PDAE's gradient estimator)."""
    skip_chs, ch = [cfg.model_channels], cfg.model_channels
    for level, mult in enumerate(cfg.channel_mult):
        ch = cfg.model_channels * mult
        skip_chs += [ch] * cfg.num_res_blocks
        if level < len(cfg.channel_mult) - 1:
            skip_chs.append(ch)
    return skip_chs, ch


def build_middle_block(cfg: BackboneConfig, ch: int, emb_dim: int) -> EmbedSequential:
    return EmbedSequential(
        ResBlock(ch, emb_dim, ch, cfg.dropout),
        AttentionBlock(ch, cfg.num_heads),
        ResBlock(ch, emb_dim, ch, cfg.dropout),
    )


# --------------------------------------------------------------------------- models


@dataclass
class DownFeatures:
    h: Tensor  # output of the down path (input to the middle block)
    skips: list[Tensor]  # skip tensors in the order they were produced
    emb: Tensor  # time embedding (B, emb_dim)


class _Backbone(nn.Module):
    """Time embedding + down path, shared by :class:`UNet` and :class:`EncoderUNet`."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.emb_dim = 4 * config.model_channels
        self.time_embed = build_time_embed(config.model_channels)
        self.input_blocks, self.skip_channels, self.down_channels = build_input_blocks(
            config, self.emb_dim
        )

    def _check_input(self, x: Tensor, t: Tensor | int | float) -> Tensor:
        """Validate x's shape (Python ints only) and return t as a (B,) tensor."""
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise GuidekitError(
                f"model expects ({c.in_channels}, {c.image_size}, {c.image_size}) images, "
                f"got shape {tuple(x.shape)}"
            )
        if not isinstance(t, Tensor):
            t = torch.full((x.shape[0],), t, device=x.device)
        elif t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise GuidekitError(f"timesteps must have shape ({x.shape[0]},), "
                                f"got {tuple(t.shape)}")
        return t

    def down(self, x: Tensor, t: Tensor) -> DownFeatures:
        """Time embedding + input blocks."""
        t = self._check_input(x, t)
        emb_in = timestep_embedding(t, self.config.model_channels)
        emb = self.time_embed(emb_in.to(self.time_embed[0].weight.dtype))
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return DownFeatures(h=h, skips=skips, emb=emb)


class UNet(_Backbone):
    """Noise predictor ε_θ(x_t, t) -> (B, out_channels, H, W); zero output at initialisation."""

    config: UNetConfig

    def __init__(self, config: UNetConfig) -> None:
        super().__init__(config)
        cfg, mc, ch = config, config.model_channels, self.down_channels
        self.middle_block = build_middle_block(cfg, ch, self.emb_dim)
        skip_chs = list(self.skip_channels)
        self.output_blocks = nn.ModuleList()
        levels = list(enumerate(zip(cfg.channel_mult, cfg.resolutions, strict=True)))
        for level, (mult, res) in reversed(levels):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [
                    ResBlock(ch + skip_chs.pop(), self.emb_dim, mc * mult, cfg.dropout)
                ]
                ch = mc * mult
                if res in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg.num_heads))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, self.emb_dim, ch, cfg.dropout, up=True))
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv3x3(ch, cfg.out_channels))
        )

    def middle_up(self, feats: DownFeatures) -> Tensor:
        """Middle block + output blocks (consuming skips last-first) + output head."""
        emb = feats.emb
        h = self.middle_block(feats.h, emb)
        for block, skip in zip(self.output_blocks, reversed(feats.skips), strict=True):
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.out(h)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.middle_up(self.down(x, t))


class EncoderUNet(_Backbone):
    """Noisy classifier p_φ(y | x_t, t): down path + middle block + pooled linear head."""

    config: ClassifierConfig

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__(config)
        ch = self.down_channels
        self.middle_block = build_middle_block(config, ch, self.emb_dim)
        self.head = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(ch, config.num_classes),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        feats = self.down(x, t)
        return self.head(self.middle_block(feats.h, feats.emb))


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
