"""ADM-style UNet (Dhariwal & Nichol 2021) for ε_θ, and its encoder half as a noisy classifier.

One family covers guidekit's own DPMs and openai's released ADM / improved-diffusion models
(and the PDAE repository's): per-layer head counts from ``num_head_channels``, a class
embedding, ResBlock or convolution up/down sampling, scale-shift or additive time embedding,
both QKV layouts, learned Σ, timestep rescaling and the classifier's attention pools. The
defaults are the layout guidekit has always trained, so older checkpoints load unchanged.

The blocks are module-level so other methods (e.g. PDAE) can assemble their own paths from them.
Forward passes branch only on Python-level facts (shapes, ``None``), never on tensor values, so
the models compile with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from guidekit.config import ConfigMixin
from guidekit.errors import GuidekitError

__all__ = [
    "MAX_BLOCKS",
    "MAX_LEVELS",
    "MAX_WIDTH",
    "POOLS",
    "AttentionBlock",
    "AttentionPool2d",
    "BackboneConfig",
    "ClassifierConfig",
    "DownFeatures",
    "Downsample",
    "EmbedSequential",
    "EncoderUNet",
    "ResBlock",
    "UNet",
    "UNetConfig",
    "Upsample",
    "attention_heads",
    "build_input_blocks",
    "build_middle_block",
    "build_output_blocks",
    "build_time_embed",
    "conv3x3",
    "count_parameters",
    "down_path_channels",
    "normalization",
    "set_attention",
    "timestep_embedding",
    "zero_module",
]

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")
# Structural bounds, far beyond any published model (ADM: 3 blocks, 5 levels, 256 channels),
# checked before anything is built: a config asking for a million blocks is refused at once
# instead of building them one by one. Widths within these are bounded by memory.
MAX_BLOCKS = 64
MAX_LEVELS = 16
MAX_WIDTH = 1 << 16
# Layout fields older guidekit configs lack; their absence marks a config written before the
# family covered ADM (see ``BackboneConfig.from_dict``).
_ADM_FIELDS = ("num_head_channels", "use_scale_shift_norm", "resblock_updown")


# --------------------------------------------------------------------------- configs

@dataclass
class BackboneConfig(ConfigMixin):
    """Fields shared by the UNet and the classifier: the down path + middle block.

    Widths are ``int(mult * model_channels)`` per level, as in ADM, so a multiplier may be a
    fraction (openai's 512×512 model starts at 0.5).
    """

    image_size: int = 16
    in_channels: int = 1
    model_channels: int = 32
    channel_mult: tuple[float, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)  # feature-map sizes (pixels) with attention
    num_heads: int = 4
    dropout: float = 0.0
    # A fixed head width: each attention layer then has channels // num_head_channels heads
    # (ADM's released models use 64); -1 uses num_heads everywhere.
    num_head_channels: int = -1
    use_scale_shift_norm: bool = True  # AdaGN; False adds the time embedding before the norm
    resblock_updown: bool = True  # resample inside ResBlocks; False uses Down/Upsample layers
    conv_resample: bool = True  # those layers convolve (only used without resblock_updown)
    use_new_attention_order: bool = True  # q, k, v split before heads; False: heads first
    timestep_scale: float = 1.0  # the model embeds t·scale (improved-diffusion: 1000 / T)
    # Width of the input convolution; None is ADM's int(channel_mult[0] * model_channels).
    # Configs written before guidekit followed that rule record model_channels here.
    stem_channels: int | None = None
    # diffusers' UNet2DModel layout (the defaults are ADM's): GroupNorm groups and eps, the
    # sinusoid order and frequency shift (``flip_sin_to_cos``, ``freq_shift``), a stride-2
    # conv padded only right and bottom (``downsample_padding=0``), no middle attention.
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_attention: bool = True

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so configs stay hashable and compare equal.
        self.channel_mult = tuple(_number(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        self.validate()

    @classmethod
    def from_dict(cls, d: Any) -> Any:
        if isinstance(d, dict) and not any(k in d for k in _ADM_FIELDS) and d.get(
                "stem_channels") is None:
            mult = d.get("channel_mult")
            if isinstance(mult, list) and mult and mult[0] != 1:
                d = {**d, "stem_channels": d.get("model_channels", cls.model_channels)}
        return super().from_dict(d)

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level of the down path."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels at each level: int(mult * model_channels)."""
        return tuple(int(m * self.model_channels) for m in self.channel_mult)

    @property
    def stem(self) -> int:
        """Channels of the input convolution."""
        return self.stem_channels if self.stem_channels is not None else self.widths[0]

    def heads(self, channels: int, upsample: bool = False) -> int:
        """Attention heads of a layer with ``channels`` channels."""
        return attention_heads(channels, self.num_heads, self.num_head_channels)

    def norm(self, channels: int) -> nn.GroupNorm:
        """The GroupNorm of a layer with ``channels`` channels."""
        return normalization(channels, self.norm_groups, self.norm_eps)

    def validate(self) -> None:
        name = type(self).__name__
        if not self.channel_mult or min(self.channel_mult) <= 0:
            raise GuidekitError(f"{name}.channel_mult must be non-empty positive numbers, "
                                f"got {self.channel_mult}")
        for key in ("image_size", "in_channels", "model_channels", "num_heads"):
            if getattr(self, key) < 1:
                raise GuidekitError(f"{name}.{key} must be >= 1, got {getattr(self, key)}")
        if min(self.widths) < 1:
            raise GuidekitError(f"{name}: channel_mult {self.channel_mult} gives a level with "
                                f"no channels at model_channels={self.model_channels}")
        if self.num_head_channels != -1 and self.num_head_channels < 1:
            raise GuidekitError(f"{name}.num_head_channels must be >= 1 or -1, "
                                f"got {self.num_head_channels}")
        if self.stem_channels is not None and self.stem_channels < 1:
            raise GuidekitError(f"{name}.stem_channels must be >= 1, got {self.stem_channels}")
        for key, types in (("norm_groups", (int,)), ("norm_eps", (int, float)),
                           ("freq_shift", (int, float)), ("downsample_padding", (int,)),
                           ("flip_sin_to_cos", (bool,)), ("mid_attention", (bool,))):
            v = getattr(self, key)
            if isinstance(v, bool) != (types == (bool,)) or not isinstance(v, types):
                raise GuidekitError(f"{name}.{key} must be "
                                    f"{' or '.join(t.__name__ for t in types)}, got {v!r}")
        if self.norm_groups < 1:
            raise GuidekitError(f"{name}.norm_groups must be >= 1, got {self.norm_groups}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise GuidekitError(f"{name}.norm_eps must be > 0, got {self.norm_eps}")
        if not (math.isfinite(self.freq_shift) and self.freq_shift < self.model_channels // 2):
            raise GuidekitError(f"{name}.freq_shift must be below half of model_channels, "
                                f"got {self.freq_shift}")
        if self.downsample_padding not in (0, 1):
            raise GuidekitError(f"{name}.downsample_padding must be 0 or 1, "
                                f"got {self.downsample_padding}")
        if not 0 <= self.num_res_blocks <= MAX_BLOCKS:
            raise GuidekitError(f"{name}.num_res_blocks must be in 0..{MAX_BLOCKS}, got "
                                f"{self.num_res_blocks}")
        for key in ("model_channels", "stem_channels", "image_size"):
            v = getattr(self, key)
            if v is not None and v > MAX_WIDTH:
                raise GuidekitError(f"{name}.{key} must be at most {MAX_WIDTH}, got {v}")
        if len(self.channel_mult) > MAX_LEVELS or max(self.channel_mult) > MAX_LEVELS:
            raise GuidekitError(f"{name}.channel_mult must have at most {MAX_LEVELS} levels of "
                                f"at most {MAX_LEVELS}x, got {self.channel_mult}")
        if not 0.0 <= self.dropout < 1.0:
            raise GuidekitError(f"{name}.dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.timestep_scale) and self.timestep_scale > 0):
            raise GuidekitError(f"{name}.timestep_scale must be > 0, got {self.timestep_scale}")
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
        for res, ch in zip(self.resolutions, self.widths, strict=True):
            if res in self.attention_resolutions:
                self._check_heads(ch, f"{ch} channels at resolution {res}")
        if self.mid_attention:
            self._check_heads(self.widths[-1], f"middle-block channels {self.widths[-1]}")

    def _check_heads(self, ch: int, what: str, upsample: bool = False) -> None:
        try:
            self.heads(ch, upsample)
        except GuidekitError as exc:
            raise GuidekitError(f"{type(self).__name__}: {what}: {exc}") from None


def _number(m: Any) -> float:
    """A channel multiplier: an int when integral (so configs print as before); anything
    but a finite number below 1e300 is a one-line error."""
    try:
        v = float(m) if isinstance(m, numbers.Real) and not isinstance(m, bool) else math.nan
    except OverflowError:  # a 400-digit integer from a crafted config
        v = math.inf
    if not math.isfinite(v):
        raise GuidekitError(f"channel_mult entries must be finite numbers, got "
                            f"{str(m)[:40]}")
    return int(v) if v.is_integer() else v


def attention_heads(channels: int, num_heads: int, num_head_channels: int = -1) -> int:
    """Heads of an attention layer: ``channels // num_head_channels`` with a fixed head
    width, else ``num_heads``; the channels must split evenly."""
    if num_head_channels != -1:
        if channels % num_head_channels:
            raise GuidekitError(f"{channels} channels are not divisible by "
                                f"num_head_channels={num_head_channels}")
        return channels // num_head_channels
    if channels % num_heads:
        raise GuidekitError(f"{channels} channels are not divisible by num_heads={num_heads}")
    return num_heads


@dataclass
class UNetConfig(BackboneConfig):
    """The ε-prediction UNet: the backbone's widths and levels, optionally also predicting v
    and conditioned on a class label."""

    learn_sigma: bool = False  # also output v, the improved-DDPM variance interpolation value
    num_classes: int | None = None  # class-conditional: label_emb(y) joins the time embedding
    # one more embedding row, label num_classes, for "no class" (∅): trained by dropping labels
    # (--cond-drop) so one network is also the unconditional model classifier-free guidance needs
    null_class: bool = False
    num_heads_upsample: int = -1  # heads in the up path without num_head_channels; -1: same

    @property
    def out_channels(self) -> int:
        """Output channels: the image's, doubled when the variance is learned."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    def heads(self, channels: int, upsample: bool = False) -> int:
        n = self.num_heads_upsample if upsample and self.num_heads_upsample != -1 else (
            self.num_heads)
        return attention_heads(channels, n, self.num_head_channels)

    def validate(self) -> None:
        super().validate()
        if self.num_classes is not None and (isinstance(self.num_classes, bool)
                                             or self.num_classes < 1):
            raise GuidekitError(f"UNetConfig.num_classes must be >= 1 or null, "
                                f"got {self.num_classes}")
        if self.null_class and self.num_classes is None:
            raise GuidekitError("UNetConfig.null_class needs num_classes: a null class only "
                                "exists beside real ones")
        if self.num_heads_upsample != -1 and self.num_heads_upsample < 1:
            raise GuidekitError(f"UNetConfig.num_heads_upsample must be >= 1 or -1, "
                                f"got {self.num_heads_upsample}")
        for res, ch in zip(self.resolutions, self.widths, strict=True):
            if res in self.attention_resolutions:
                self._check_heads(ch, f"{ch} up-path channels at resolution {res}", True)


@dataclass
class ClassifierConfig(BackboneConfig):
    """A noisy classifier: the backbone, then a head that pools to ``num_classes`` logits.

    ``pool``: ``adaptive`` (mean over pixels, then linear), ``attention`` (ADM's attention
    pool, its released classifiers), ``spatial`` / ``spatial_v2`` (the means of every down
    block's and the middle block's output, then an MLP).
    """

    num_classes: int = 10
    pool: str = "adaptive"

    def validate(self) -> None:
        super().validate()
        if self.num_classes < 1:
            raise GuidekitError(f"ClassifierConfig.num_classes must be >= 1, "
                                f"got {self.num_classes}")
        if self.pool not in POOLS:
            raise GuidekitError(f"unknown classifier pool '{self.pool}': choose one of "
                                f"{', '.join(POOLS)}")
        if self.pool == "attention":
            self._check_heads(self.widths[-1], "the attention pool's channels")


# --------------------------------------------------------------------------- blocks


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000,
                       flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) in float32; t is the raw timestep, e.g. 0..T-1.

    Frequencies ``max_period^(−i / (dim/2 − freq_shift))``; cosines first (ADM) unless
    ``flip_sin_to_cos`` is False (diffusers' DDPM ports put the sines first, with shift 1).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        / (half - freq_shift)
    )
    args = t.float()[:, None] * freqs[None]
    pair = (torch.cos(args), torch.sin(args))
    emb = torch.cat(pair if flip_sin_to_cos else pair[::-1], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def zero_module(m: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches and heads start as no-ops."""
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def normalization(ch: int, groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups when they divide ``ch`` (every ADM and diffusers
    width), else the largest of 16, 8, ... that does."""
    n = groups if ch % groups == 0 else next(
        g for g in (16, 8, 4, 2, 1) if g < groups and ch % g == 0)
    return nn.GroupNorm(n, ch, eps=eps)


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 conv (``use_conv``) or 2×2 average pooling.
    ``padding=0`` pads the conv's input by one only on the right and bottom (diffusers)."""

    def __init__(self, channels: int, use_conv: bool = True, padding: int = 1) -> None:
        super().__init__()
        self.pad = use_conv and padding == 0
        self.op: nn.Module = (nn.Conv2d(channels, channels, 3, stride=2, padding=padding)
                              if use_conv else nn.AvgPool2d(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(F.pad(x, (0, 1, 0, 1)) if self.pad else x)


class Upsample(nn.Module):
    """Double the resolution (nearest), then a 3×3 conv when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool = True) -> None:
        super().__init__()
        self.conv = conv3x3(channels, channels) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class ResBlock(nn.Module):
    """BigGAN-style residual block with time conditioning (and optional extra condition).

    With ``scale_shift`` (AdaGN) ``h = norm(h) * (1 + scale_t) + shift_t``, else
    ``h = norm(h + emb_t)``; with ``cond_channels`` a second projection of ``cond`` then
    gives ``h = h * (1 + scale_c) + shift_c`` (PDAE's latent shift).
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
        scale_shift: bool = True,
        groups: int = 32,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResBlock cannot be both up and down")
        out_channels = out_channels or channels
        self.cond_channels = cond_channels
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(normalization(channels, groups, eps), nn.SiLU())
        # Resample between the activation and the conv, on both branches, as ADM does.
        self.resample: nn.Module = (
            nn.Upsample(scale_factor=2, mode="nearest") if up
            else nn.AvgPool2d(2) if down
            else nn.Identity()
        )
        self.in_conv = conv3x3(channels, out_channels)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, (2 if scale_shift else 1) * out_channels))
        # Default init, not zero: the zero-initialised output conv already makes the block
        # start as the identity, and a zero projection as well would keep z's gradient at
        # zero until two layers downstream had moved (measured: a less linear z).
        self.cond_layers = (
            nn.Linear(cond_channels, 2 * out_channels) if cond_channels else None
        )
        self.out_norm = normalization(out_channels, groups, eps)
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
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out)
        if self.cond_layers is not None:
            c_scale, c_shift = self.cond_layers(cond).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + c_scale) + c_shift
        return self.skip(x) + self.out_layers(h)


def _attend(q: Tensor, k: Tensor, v: Tensor, sdpa: bool) -> Tensor:
    """softmax(q kᵀ / √d) v over (B, heads, L, d): torch's fused kernel, or written out."""
    if sdpa:
        return F.scaled_dot_product_attention(q, k, v)
    weight = torch.einsum("bnld,bnmd->bnlm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bnlm,bnmd->bnld", weight.float().softmax(-1).to(v.dtype), v)


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all pixels.

    ``new_order``: the 3·C qkv channels are laid out q, k, v first, then heads (ADM's
    ``use_new_attention_order=True``); otherwise heads first, then q, k, v in each
    (ADM's legacy layout). ``sdpa=False`` writes the attention out instead of torch's
    ``scaled_dot_product_attention`` (for comparison; the results agree to rounding).
    """

    def __init__(self, channels: int, num_heads: int = 4, new_order: bool = True,
                 sdpa: bool = True, groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__()
        if channels % num_heads:
            raise GuidekitError(f"AttentionBlock: {channels} channels not divisible by "
                                f"num_heads={num_heads}")
        self.num_heads = num_heads
        self.layout = ("b (three n d) h w -> three b n (h w) d" if new_order
                       else "b (n three d) h w -> three b n (h w) d")
        self.sdpa = sdpa
        self.norm = normalization(channels, groups, eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(self.norm(x))
        q, k, v = rearrange(qkv, self.layout, three=3, n=self.num_heads)
        out = _attend(q, k, v, self.sdpa)
        out = rearrange(out, "b n (h w) d -> b (n d) h w", h=x.shape[2])
        return x + self.proj(out)


class AttentionPool2d(nn.Module):
    """ADM's classifier head (after CLIP): the pixels' mean attends over itself and every
    pixel, with a learned positional embedding; its output is projected to the logits."""

    def __init__(self, side: int, channels: int, num_heads: int, out_channels: int,
                 sdpa: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.sdpa = sdpa
        self.positional_embedding = nn.Parameter(
            torch.randn(channels, side**2 + 1) / channels**0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2)
        x = torch.cat([x.mean(-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(
            x.dtype)
        q, k, v = rearrange(self.qkv_proj(x), "b (three n d) l -> three b n l d", three=3,
                            n=self.num_heads)
        out = rearrange(_attend(q, k, v, self.sdpa), "b n l d -> b (n d) l")
        return self.c_proj(out)[:, :, 0]


def set_attention(module: nn.Module, sdpa: bool) -> nn.Module:
    """Switch every attention layer of ``module`` to torch's SDPA kernel or the written-out
    attention (a benchmark's comparison); returns ``module``."""
    for m in module.modules():
        if isinstance(m, (AttentionBlock, AttentionPool2d)):
            m.sdpa = sdpa
    return module


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


def _res(cfg: BackboneConfig, c_in: int, emb: int, c_out: int, cond: int | None = None,
         **kw: bool) -> ResBlock:
    return ResBlock(c_in, emb, c_out, cfg.dropout, cond_channels=cond,
                    scale_shift=cfg.use_scale_shift_norm, groups=cfg.norm_groups,
                    eps=cfg.norm_eps, **kw)


def _attn(cfg: BackboneConfig, ch: int, upsample: bool = False) -> AttentionBlock:
    return AttentionBlock(ch, cfg.heads(ch, upsample), cfg.use_new_attention_order,
                          groups=cfg.norm_groups, eps=cfg.norm_eps)


def build_input_blocks(cfg: BackboneConfig, emb_dim: int) -> tuple[nn.ModuleList, list[int], int]:
    """The down path. Returns (blocks, channels of each skip in order, output channels).

    Every block produces one skip tensor (the input conv included), as in ADM.
    """
    ch = cfg.stem
    blocks = nn.ModuleList([EmbedSequential(conv3x3(cfg.in_channels, ch))])
    skip_chs = [ch]
    levels = list(zip(cfg.widths, cfg.resolutions, strict=True))
    for level, (width, res) in enumerate(levels):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [_res(cfg, ch, emb_dim, width)]
            ch = width
            if res in cfg.attention_resolutions:
                layers.append(_attn(cfg, ch))
            blocks.append(EmbedSequential(*layers))
            skip_chs.append(ch)
        if level < len(levels) - 1:
            down = (_res(cfg, ch, emb_dim, ch, down=True) if cfg.resblock_updown
                    else Downsample(ch, cfg.conv_resample, cfg.downsample_padding))
            blocks.append(EmbedSequential(down))
            skip_chs.append(ch)
    return blocks, skip_chs, ch


def down_path_channels(cfg: BackboneConfig) -> tuple[list[int], int]:
    """(channels of each skip, output channels) of :func:`build_input_blocks`, without
    building it: for networks that read a UNet's features (PDAE's gradient estimator)."""
    skip_chs, ch = [cfg.stem], cfg.stem
    for level, width in enumerate(cfg.widths):
        ch = width if cfg.num_res_blocks else ch
        skip_chs += [ch] * cfg.num_res_blocks
        if level < len(cfg.widths) - 1:
            skip_chs.append(ch)
    return skip_chs, ch


def build_middle_block(cfg: BackboneConfig, ch: int, emb_dim: int,
                       cond_channels: int | None = None) -> EmbedSequential:
    """ResBlock, attention (unless ``mid_attention`` is off), ResBlock at the bottom of the
    UNet (``cond_channels``: the ResBlocks also take a condition, as PDAE's G_ψ takes z)."""
    attention = [_attn(cfg, ch)] if cfg.mid_attention else []
    return EmbedSequential(
        _res(cfg, ch, emb_dim, ch, cond_channels),
        *attention,
        _res(cfg, ch, emb_dim, ch, cond_channels),
    )


def build_output_blocks(
    cfg: BackboneConfig, skip_chs: list[int], ch: int, emb_dim: int,
    cond_channels: int | None = None,
) -> tuple[nn.ModuleList, int]:
    """The up path, consuming ``skip_chs`` last-first. Returns (blocks, output channels).
    PDAE's G_ψ builds its own with ``cond_channels``, mirroring the UNet it reads."""
    skip_chs = list(skip_chs)
    blocks = nn.ModuleList()
    levels = list(enumerate(zip(cfg.widths, cfg.resolutions, strict=True)))
    for level, (width, res) in reversed(levels):
        for i in range(cfg.num_res_blocks + 1):
            layers: list[nn.Module] = [
                _res(cfg, ch + skip_chs.pop(), emb_dim, width, cond_channels)]
            ch = width
            if res in cfg.attention_resolutions:
                layers.append(_attn(cfg, ch, upsample=True))
            if level > 0 and i == cfg.num_res_blocks:
                layers.append(_res(cfg, ch, emb_dim, ch, cond_channels, up=True)
                              if cfg.resblock_updown else Upsample(ch, cfg.conv_resample))
            blocks.append(EmbedSequential(*layers))
    return blocks, ch


# --------------------------------------------------------------------------- models


@dataclass
class DownFeatures:
    h: Tensor  # output of the down path (input to the middle block)
    skips: list[Tensor]  # skip tensors in the order they were produced
    emb: Tensor  # time embedding (B, emb_dim), the class embedding added when conditional

    def first(self, n: int) -> DownFeatures:
        """The features of the batch's first ``n`` samples (the engine batches extra label
        evaluations behind a step's own samples)."""
        return DownFeatures(self.h[:n], [s[:n] for s in self.skips], self.emb[:n])


class _Backbone(nn.Module):
    """Time (and class) embedding + down path, shared by :class:`UNet` and
    :class:`EncoderUNet`."""

    def __init__(self, config: BackboneConfig, num_classes: int | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.emb_dim = 4 * config.model_channels
        self.time_embed = build_time_embed(config.model_channels)
        self.label_emb = nn.Embedding(num_classes, self.emb_dim) if num_classes else None
        self.input_blocks, self.skip_channels, self.down_channels = build_input_blocks(
            config, self.emb_dim
        )

    def _check_input(self, x: Tensor, t: Tensor | int | float, y: Tensor | None) -> Tensor:
        """Validate x's shape and y's presence (Python facts only); return t as (B,)."""
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
        if (y is None) != (self.label_emb is None):
            raise GuidekitError(
                "this DPM is class-conditional: give the class labels (--class N)"
                if y is None else
                "this DPM is unconditional: it takes no class labels (drop --class)")
        if y is not None and tuple(y.shape) != (x.shape[0],):
            raise GuidekitError(f"class labels must have shape ({x.shape[0]},), "
                                f"got {tuple(y.shape)}")
        return t

    def down(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> DownFeatures:
        """Time (+ class) embedding and input blocks."""
        t = self._check_input(x, t, y)
        scale = self.config.timestep_scale
        emb_in = timestep_embedding(t.float() * scale if scale != 1 else t,
                                    self.config.model_channels,
                                    flip_sin_to_cos=self.config.flip_sin_to_cos,
                                    freq_shift=self.config.freq_shift)
        emb = self.time_embed(emb_in.to(self.time_embed[0].weight.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        return DownFeatures(h=h, skips=skips, emb=emb)


class UNet(_Backbone):
    """Noise predictor ε_θ(x_t, t[, y]) -> (B, out_channels, H, W); zero output at
    initialisation. ``y`` (B,) long: the class labels of a class-conditional UNet."""

    config: UNetConfig

    def __init__(self, config: UNetConfig) -> None:
        rows = config.num_classes and config.num_classes + int(config.null_class)
        super().__init__(config, rows)
        self.middle_block = build_middle_block(config, self.down_channels, self.emb_dim)
        self.output_blocks, ch = build_output_blocks(
            config, self.skip_channels, self.down_channels, self.emb_dim)
        self.out = nn.Sequential(
            config.norm(ch), nn.SiLU(), zero_module(conv3x3(ch, config.out_channels))
        )

    @property
    def null_label(self) -> int | None:
        """The label of "no class" (∅) when the UNet has one (``null_class``), else None."""
        c = self.config
        return c.num_classes if c.null_class else None

    def middle_up(self, feats: DownFeatures) -> Tensor:
        """Middle block + output blocks (consuming skips last-first) + output head."""
        emb = feats.emb
        h = self.middle_block(feats.h, emb)
        for block, skip in zip(self.output_blocks, reversed(feats.skips), strict=True):
            h = block(torch.cat([h, skip], dim=1), emb)
        return self.out(h)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.middle_up(self.down(x, t, y))


class EncoderUNet(_Backbone):
    """Noisy classifier p_φ(y | x_t, t): down path + middle block + pooled head."""

    config: ClassifierConfig

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__(config)
        ch, k = self.down_channels, config.num_classes
        self.middle_block = build_middle_block(config, ch, self.emb_dim)
        self.head: nn.Sequential
        if config.pool == "adaptive":
            self.head = nn.Sequential(config.norm(ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(ch, k))
        elif config.pool == "attention":
            side = config.resolutions[-1]
            self.head = nn.Sequential(config.norm(ch), nn.SiLU(),
                                      AttentionPool2d(side, ch, config.heads(ch), k))
        else:  # the spatial pools: every block's mean, then an MLP
            features = sum(self.skip_channels) + ch
            hidden: list[nn.Module] = ([nn.ReLU()] if config.pool == "spatial"
                                       else [normalization(2048), nn.SiLU()])
            self.head = nn.Sequential(nn.Linear(features, 2048), *hidden, nn.Linear(2048, k))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        feats = self.down(x, t)
        h = self.middle_block(feats.h, feats.emb)
        if self.config.pool.startswith("spatial"):
            h = torch.cat([s.mean(dim=(2, 3)) for s in (*feats.skips, h)], dim=-1)
        return self.head(h)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
