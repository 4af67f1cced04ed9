"""Convert a diffusers ``UNet2DModel`` pipeline folder into a guidekit ``ddpm`` checkpoint.

A ``DDPMPipeline`` / ``DDIMPipeline`` folder (``model_index.json``, ``unet/``,
``scheduler/``) or a bare ``unet/`` folder becomes guidekit's own
:class:`~guidekit.unet.UNet`: diffusers' ResnetBlock2D, Attention, Downsample2D and
Upsample2D are the ADM blocks the UNet family already has, so the converted model is the
same class every command, guidance and PDAE's gradient estimator already take.

diffusers reads the folder (it knows every file layout and legacy key name it ever saved);
guidekit then copies the weights into its UNet, runs both on one probe batch, and refuses to
write a model that disagrees with diffusers' own. The schedule is the β list diffusers'
scheduler computes from ``scheduler_config.json``; its ``clip_sample``, ``variance_type`` and
``timestep_spacing`` become the checkpoint's sampling defaults. Only ε-prediction models are
taken: guidekit's engine and guidances are written for ε.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from guidekit.config import config_field
from guidekit.convert import check_out, write_converted
from guidekit.errors import GuidekitError

__all__ = ["EXTRA", "convert_diffusers", "map_state_dict", "require_diffusers"]

EXTRA = "pip install 'guidekit[diffusers]'"
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
_VARIANCE = {"fixed_small": "small", "fixed_small_log": "small", "fixed_large": "large",
             "fixed_large_log": "large", "learned_range": "small"}
_SPACINGS = ("leading", "linspace", "trailing")
_RES = {"norm1": "in_layers.0", "conv1": "in_conv", "time_emb_proj": "emb_layers.1",
        "norm2": "out_norm", "conv2": "out_layers.2", "conv_shortcut": "skip"}


def require_diffusers() -> Any:
    """The diffusers module, imported offline; a one-line error naming the extra without it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never the Hub
    try:
        import diffusers
    except ImportError:
        raise GuidekitError(f"reading a diffusers model needs the diffusers extra: {EXTRA}"
                            ) from None
    return diffusers


def _json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise GuidekitError(f"{path} is missing or not a file ({what})")
    if path.stat().st_size > 1 << 24:
        raise GuidekitError(f"{path} is too large for a {what}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise GuidekitError(f"{path} is not a readable JSON {what}: "
                            f"{str(exc).splitlines()[0][:200]}") from None
    if not isinstance(d, dict):
        raise GuidekitError(f"{path} must hold a JSON object ({what})")
    return d


def _folders(path: Path, scheduler: Path | None) -> tuple[Path, Path]:
    """(unet folder, scheduler_config.json) of a pipeline folder or a bare unet folder."""
    if not path.is_dir():
        raise GuidekitError(f"{path} is not a folder: give a diffusers pipeline folder "
                            "(model_index.json, unet/, scheduler/) or its unet/ folder")
    if (path / "model_index.json").is_file():
        index = _json(path / "model_index.json", "pipeline index")
        entry = index.get("unet")
        if entry is None:
            raise GuidekitError(f"{path}: the pipeline has no unet (model_index.json)")
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] == "UNet2DModel"):
            raise GuidekitError(f"{path}: the pipeline's unet is {entry!r}, not a "
                                "UNet2DModel; guidekit converts unconditional and "
                                "class-conditional UNet2DModel pipelines")
        others = sorted(k for k, v in index.items() if not k.startswith("_")
                        and k not in ("unet", "scheduler") and isinstance(v, list)
                        and v[:1] != [None])
        if others:
            raise GuidekitError(f"{path}: the pipeline also has {', '.join(others)} (a "
                                "latent-diffusion pipeline samples their latents, not "
                                "images); guidekit converts pixel-space UNet2DModel pipelines")
        unet, found = path / "unet", path / "scheduler" / "scheduler_config.json"
    elif (path / "config.json").is_file():
        unet, found = path, path.parent / "scheduler" / "scheduler_config.json"
    else:
        raise GuidekitError(f"{path} is not a diffusers model: it has neither "
                            "model_index.json (a pipeline) nor config.json (a unet/ folder)")
    if scheduler is not None:
        found = scheduler / "scheduler_config.json" if scheduler.is_dir() else scheduler
    if not found.is_file():
        raise GuidekitError(f"no scheduler config for {path}: expected {found}; give "
                            "--scheduler PATH (a scheduler_config.json or its folder)")
    return unet, found


def _unet_config(d: dict[str, Any], image_size: int | None, where: str) -> Any:
    """guidekit's UNetConfig for a UNet2DModel config, or a one-line refusal."""
    from guidekit.unet import UNetConfig

    if d.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise GuidekitError(f"{where}: a {d['_class_name']!r}, not a UNet2DModel; guidekit "
                            "converts UNet2DModel pipelines (DDPMPipeline, DDIMPipeline)")
    refuse = {
        "center_input_sample": (False, "rescales its input"),
        "time_embedding_type": ("positional", "does not use the sinusoidal time embedding"),
        "class_embed_type": (None, "embeds its classes other than by a class table"),
        "mid_block_type": ("UNetMidBlock2D", "has another middle block"),
        "mid_block_scale_factor": (1, "rescales its middle block"),
    }
    for key, (want, why) in refuse.items():
        if d.get(key, want) != want:
            raise GuidekitError(f"{where}: {key}={d[key]!r}: the model {why}, which guidekit's "
                                "UNet does not have")
    if d.get("act_fn", "silu") not in ("silu", "swish"):
        raise GuidekitError(f"{where}: act_fn={d['act_fn']!r}: guidekit's UNet uses SiLU")
    boc = config_field(d, "block_out_channels", (list,), where, [224, 448, 672, 896])
    if not 1 <= len(boc) <= 8 or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 < c <= 8192 for c in boc):
        raise GuidekitError(f"{where}: block_out_channels must be 1 to 8 integers in "
                            "1..8192")
    down = config_field(d, "down_block_types", (list, type(None)), where, None) or []
    up = config_field(d, "up_block_types", (list, type(None)), where, None) or []
    for kind, table in ((down, _DOWN), (up, _UP)):
        for name in kind:
            if not isinstance(name, str) or name not in table:
                raise GuidekitError(f"{where}: block {name!r} is not one guidekit converts "
                                    f"({', '.join(table)})")
    if len(down) != len(boc) or len(up) != len(boc):
        raise GuidekitError(f"{where}: down_block_types, up_block_types and "
                            "block_out_channels must have one entry per level")
    attn = [_DOWN[n] for n in down]
    if [_UP[n] for n in reversed(up)] != attn:
        raise GuidekitError(f"{where}: the up path's attention does not mirror the down "
                            "path's; guidekit's UNet puts attention at the same levels in both")
    size = image_size or config_field(d, "sample_size", (int, list, type(None)), where, None)
    if isinstance(size, list):
        if len(size) != 2 or size[0] != size[1]:
            raise GuidekitError(f"{where}: sample_size {str(size)[:80]} is not square; give "
                                "--image-size N")
        size = size[0]
    factor = 2 ** (len(boc) - 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % factor:
        raise GuidekitError(f"{where}: image size {str(size)[:80]} cannot pass the UNet's "
                            f"{len(boc) - 1} downsamplings: give --image-size as a multiple "
                            f"of {factor}")
    if size > 4096:
        raise GuidekitError(f"{where}: image size {size} is above guidekit's 4096")
    groups = config_field(d, "norm_num_groups", (int,), where, 32, 1, 8192)
    if d.get("attn_norm_num_groups") not in (None, groups):
        raise GuidekitError(f"{where}: attn_norm_num_groups differs from norm_num_groups")
    for key in ("downsample_type", "upsample_type"):
        # "resnet" reaches only the attention blocks, so such a UNet mixes both resamplers
        if d.get(key, "conv") != "conv":
            raise GuidekitError(f"{where}: {key}={d[key]!r} is not supported (only conv)")
    head = d.get("attention_head_dim", 8)  # None: one head per layer
    if head is not None:
        head = config_field(d, "attention_head_dim", (int,), where, 8, 1, 8192)
    shift = d.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise GuidekitError(f"{where}: resnet_time_scale_shift={shift!r} is not supported")
    if shift == "scale_shift" and d.get("attn_norm_num_groups") is None and d.get(
            "add_attention", True):
        raise GuidekitError(f"{where}: with resnet_time_scale_shift='scale_shift' and no "
                            "attn_norm_num_groups the middle attention has no GroupNorm, "
                            "which guidekit's UNet does not have")
    emb_dim = d.get("time_embedding_dim")
    if emb_dim not in (None, 4 * boc[0]):
        raise GuidekitError(f"{where}: time_embedding_dim={emb_dim!r}: guidekit's UNet "
                            f"embeds time in 4 × block_out_channels[0] = {4 * boc[0]}")
    in_ch = config_field(d, "in_channels", (int,), where, 3, 1, 64)
    out_ch = config_field(d, "out_channels", (int,), where, 3, 1, 128)
    if out_ch not in (in_ch, 2 * in_ch):
        raise GuidekitError(f"{where}: out_channels={out_ch} for in_channels={in_ch}: "
                            "expected ε (the same) or ε and the variance values (twice)")
    classes = config_field(d, "num_class_embeds", (int, type(None)), where, None, 1,
                           1_000_000)
    try:
        return UNetConfig(
            image_size=size, in_channels=in_ch, model_channels=boc[0],
            channel_mult=tuple(_mult(c, boc[0]) for c in boc),
            num_res_blocks=config_field(d, "layers_per_block", (int,), where, 2, 1, 16),
            attention_resolutions=tuple(size // 2**i for i, a in enumerate(attn) if a),
            num_heads=1, num_head_channels=-1 if head is None else head,
            dropout=float(config_field(d, "dropout", (int, float), where, 0.0, 0, 0.999)),
            use_scale_shift_norm=shift == "scale_shift",
            resblock_updown=False, conv_resample=True,
            learn_sigma=out_ch == 2 * in_ch, num_classes=classes,
            norm_groups=groups,
            norm_eps=float(config_field(d, "norm_eps", (int, float), where, 1e-5, 1e-12, 1.0)),
            flip_sin_to_cos=config_field(d, "flip_sin_to_cos", (bool,), where, True),
            freq_shift=float(config_field(d, "freq_shift", (int, float), where, 0, -1e6, 1e6)),
            downsample_padding=config_field(d, "downsample_padding", (int,), where, 1, 0, 1),
            mid_attention=config_field(d, "add_attention", (bool,), where, True),
        )
    except GuidekitError as exc:
        raise GuidekitError(f"{where}: {exc}") from None


def _mult(c: int, base: int) -> float:
    """A channel multiplier m with int(m · base) == c exactly."""
    m = c / base
    return m if int(m * base) == c else math.nextafter(m, math.inf)


def _schedule(d: dict[str, Any], where: str, learned: bool) -> tuple[Any, dict[str, Any]]:
    """(ScheduleConfig of diffusers' β list, sampling defaults) for a scheduler config."""
    from guidekit.schedule import ScheduleConfig

    kind = d.get("prediction_type", "epsilon")
    if kind != "epsilon":
        raise GuidekitError(f"{where}: prediction_type={str(kind)[:40]!r} is not supported: "
                            "guidekit's engine and guidances take ε-prediction (epsilon) models")
    for key, why in (("thresholding", "dynamic thresholding"),
                     ("rescale_betas_zero_snr", "a zero-terminal-SNR schedule")):
        if d.get(key, False):
            raise GuidekitError(f"{where}: {key}=true ({why}) is not supported")
    if config_field(d, "clip_sample_range", (int, float), where, 1.0, 0, 1e6) != 1.0:
        raise GuidekitError(f"{where}: clip_sample_range must be 1.0 (guidekit clips x̂_0 "
                            "to [-1, 1])")
    variance = config_field(d, "variance_type", (str,), where, "fixed_small")
    if variance not in _VARIANCE:
        raise GuidekitError(f"{where}: variance_type={variance!r} is not supported: use "
                            f"{', '.join(_VARIANCE)}")
    if (variance == "learned_range") != learned:
        raise GuidekitError(f"{where}: variance_type={variance!r} does not fit a UNet that "
                            f"{'predicts' if learned else 'does not predict'} the variance")
    spacing = config_field(d, "timestep_spacing", (str,), where, "leading")
    if spacing not in _SPACINGS:
        raise GuidekitError(f"{where}: timestep_spacing={spacing!r}: choose one of "
                            f"{', '.join(_SPACINGS)}")
    clip = config_field(d, "clip_sample", (bool,), where, True)
    T = config_field(d, "num_train_timesteps", (int,), where, 1000, 1, 100_000)
    diffusers = require_diffusers()
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    try:
        betas = diffusers.DDPMScheduler(**{k: d[k] for k in keys if k in d}).betas
    except Exception as exc:  # noqa: BLE001 -- any complaint of diffusers' is the config's
        raise GuidekitError(f"{where}: diffusers cannot build its schedule: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                            ) from None
    schedule = ScheduleConfig(kind="given", num_timesteps=T,
                              betas=tuple(float(b) for b in betas.double()))
    sampling = {"clip_x0": clip, "variance": _VARIANCE[variance], "spacing": spacing}
    return schedule, sampling


def _pairs(cfg: Any) -> list[tuple[str, str, str]]:
    """(guidekit prefix, diffusers prefix, kind) for every layer, walking both paths in the
    order they are built: kinds ``plain`` (the same tensors), ``res`` (a ResnetBlock2D)
    and ``attn`` (an Attention)."""
    attn = [r in cfg.attention_resolutions for r in cfg.resolutions]
    L, n = len(cfg.widths), cfg.num_res_blocks
    pairs = [("input_blocks.0.0", "conv_in", "plain"),
             ("time_embed.0", "time_embedding.linear_1", "plain"),
             ("time_embed.2", "time_embedding.linear_2", "plain"),
             ("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    if cfg.num_classes:
        pairs.append(("label_emb", "class_embedding", "plain"))
    idx = 1
    for i in range(L):
        for j in range(n):
            pairs.append((f"input_blocks.{idx}.0", f"down_blocks.{i}.resnets.{j}", "res"))
            if attn[i]:
                pairs.append((f"input_blocks.{idx}.1", f"down_blocks.{i}.attentions.{j}", "attn"))
            idx += 1
        if i < L - 1:
            pairs.append((f"input_blocks.{idx}.0.op", f"down_blocks.{i}.downsamplers.0.conv",
                          "plain"))
            idx += 1
    mid = ["middle_block.0", "middle_block.1", "middle_block.2"]
    pairs.append((mid[0], "mid_block.resnets.0", "res"))
    if cfg.mid_attention:
        pairs.append((mid[1], "mid_block.attentions.0", "attn"))
    pairs.append((mid[2] if cfg.mid_attention else mid[1], "mid_block.resnets.1", "res"))
    idx = 0
    for u in range(L):
        level = L - 1 - u
        for j in range(n + 1):
            pairs.append((f"output_blocks.{idx}.0", f"up_blocks.{u}.resnets.{j}", "res"))
            pos = 1
            if attn[level]:
                pairs.append((f"output_blocks.{idx}.1", f"up_blocks.{u}.attentions.{j}", "attn"))
                pos = 2
            if level > 0 and j == n:
                pairs.append((f"output_blocks.{idx}.{pos}.conv",
                              f"up_blocks.{u}.upsamplers.0.conv", "plain"))
            idx += 1
    return pairs


def map_state_dict(sd: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """diffusers' UNet2DModel state dict as guidekit UNet keys; every tensor used once."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise GuidekitError(f"the diffusers weights lack {key}")
        used.add(key)
        return sd[key]

    for gk, df, kind in _pairs(cfg):
        if kind == "plain":
            for p in ("weight", "bias"):
                if p == "weight" or f"{df}.{p}" in sd:  # an Embedding has no bias
                    out[f"{gk}.{p}"] = take(f"{df}.{p}")
        elif kind == "res":
            for d_name, g_name in _RES.items():
                if f"{df}.{d_name}.weight" in sd:
                    for p in ("weight", "bias"):
                        out[f"{gk}.{g_name}.{p}"] = take(f"{df}.{d_name}.{p}")
        else:
            for p in ("weight", "bias"):
                out[f"{gk}.norm.{p}"] = take(f"{df}.group_norm.{p}")
                qkv = torch.cat([take(f"{df}.to_{x}.{p}") for x in "qkv"])
                proj = take(f"{df}.to_out.0.{p}")
                # Linear → 1×1 Conv2d; q, k, v stacked first, then heads (the new QKV order)
                out[f"{gk}.qkv.{p}"] = qkv[..., None, None] if p == "weight" else qkv
                out[f"{gk}.proj.{p}"] = proj[..., None, None] if p == "weight" else proj
    left = sorted(set(sd) - used)
    if left:
        raise GuidekitError(f"the diffusers weights hold {len(left)} tensors guidekit's UNet "
                            f"has no place for (first: {left[0]})")
    return out


def _read_unet(unet_dir: Path, where: str) -> Any:
    diffusers = require_diffusers()
    try:
        diffusers.utils.logging.set_verbosity_error()
        return diffusers.UNet2DModel.from_pretrained(
            unet_dir, local_files_only=True, low_cpu_mem_usage=False).eval()
    except Exception as exc:  # noqa: BLE001 -- a damaged or foreign folder, in one line
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise GuidekitError(f"{where}: diffusers cannot load the UNet2DModel: {text}") from None


@torch.no_grad()
def _probe(theirs: Any, ours: Any, cfg: Any, T: int) -> float:
    """max |ours − theirs| / max(1, max |theirs|) on one seeded batch at t = 0, T/2, T − 1."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    t = torch.tensor([0, T // 2, T - 1])
    y = torch.arange(3) % cfg.num_classes if cfg.num_classes else None
    want = theirs(x, t, class_labels=y).sample
    got = ours(x, t, y)
    return float((got - want).abs().max() / want.abs().max().clamp(min=1))


def convert_diffusers(
    folder: str | Path, out: str | Path, *, scheduler: str | Path | None = None,
    image_size: int | None = None, force: bool = False,
) -> Path:
    """Convert a diffusers UNet2DModel pipeline folder (or its ``unet/`` folder, with the
    scheduler config beside it or given as ``scheduler``) into a ``ddpm`` checkpoint at
    ``out``. ``image_size`` overrides the UNet's ``sample_size`` (it is fully convolutional).
    """
    from guidekit.unet import UNet

    folder, out = Path(folder), Path(out)
    unet_dir, sched_file = _folders(folder, None if scheduler is None else Path(scheduler))
    unet_cfg = _json(unet_dir / "config.json", "UNet config")
    cfg = _unet_config(unet_cfg, image_size, str(unet_dir / "config.json"))
    sched_cfg = _json(sched_file, "scheduler config")
    schedule, sampling = _schedule(sched_cfg, str(sched_file), cfg.learn_sigma)
    check_out(out, force)
    theirs = _read_unet(unet_dir, str(unet_dir))
    ours = UNet(cfg).eval()
    tensors = map_state_dict({k: v.float() for k, v in theirs.state_dict().items()}, cfg)
    want = ours.state_dict()
    bad = [k for k in want if k not in tensors or tensors[k].shape != want[k].shape]
    if bad:
        k = bad[0]
        got = tuple(tensors[k].shape) if k in tensors else "nothing"
        raise GuidekitError(f"{unet_dir}: the weights do not fit the config: {k} is "
                            f"{got}, the UNet wants {tuple(want[k].shape)}")
    ours.load_state_dict(tensors, strict=True)
    try:
        gap = _probe(theirs, ours, cfg, schedule.num_timesteps)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise GuidekitError(f"{unet_dir}: the probe forward pass failed: "
                            f"{str(exc).splitlines()[0][:200]}") from None
    if not gap <= 1e-4:
        raise GuidekitError(f"{unet_dir}: the converted UNet disagrees with diffusers' own by "
                            f"{gap:.2g} (relative) on a probe batch; nothing was written")
    record: dict[str, Any] = {
        "format": "diffusers", "source": str(folder), "probe_max_rel_error": gap,
        "diffusers_version": unet_cfg.get("_diffusers_version"),
        "scheduler": {k: sched_cfg[k] for k in (
            "_class_name", "beta_schedule", "beta_start", "beta_end", "clip_sample",
            "variance_type", "timestep_spacing", "steps_offset", "set_alpha_to_one")
            if k in sched_cfg},
    }
    if sched_cfg.get("steps_offset", 0) or sched_cfg.get("set_alpha_to_one", True) is False:
        record["note"] = ("steps_offset and set_alpha_to_one are recorded, not applied: "
                          "guidekit's leading steps start at 0 and its DDIM ends at ᾱ = 1")
    return write_converted(out, "ddpm", "unet", ours, schedule, cfg.num_classes, record,
                           sampling=sampling)
