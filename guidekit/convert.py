"""Convert released checkpoints into guidekit checkpoint folders.

``convert_adm`` reads openai's guided-diffusion (ADM) models and noisy classifiers and
improved-diffusion's models, given the flags exactly as openai's READMEs write them;
``convert_pdae`` reads the PDAE repository's pre-trained DPMs (``checkpoint.pt`` +
``config.yml``). The result is guidekit's own :class:`~guidekit.unet.UNet` or
:class:`~guidekit.unet.EncoderUNet` with float32 weights, a ``ddpm`` or ``classifier``
checkpoint that every command takes.

Pickles are read with ``torch.load(weights_only=True)``: one that wants to run code is refused,
never run. Two things change no tensor's shape and so cannot be checked against the weights:
the head counts (``--num_head_channels`` / ``--num_heads``) and ``--use_new_attention_order``.
Whether a file is a diffusion model or a classifier is read from the weights (a classifier has
no ``output_blocks``); ``--classifier_*`` flags on a diffusion model's weights are an error.
"""

from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path
from typing import Any

from guidekit.config import config_field
from guidekit.errors import CheckpointError, GuidekitError

__all__ = [
    "ADM_DEFAULTS",
    "IMPROVED_DEFAULTS",
    "convert_adm",
    "convert_pdae",
    "parse_openai_flags",
    "read_state_dict",
]

# guided-diffusion's model_and_diffusion_defaults() + classifier_defaults() (script_util.py).
ADM_DEFAULTS: dict[str, Any] = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4,
    "num_heads_upsample": -1, "num_head_channels": -1, "attention_resolutions": "16,8",
    "channel_mult": "", "dropout": 0.0, "class_cond": False, "use_checkpoint": False,
    "use_scale_shift_norm": True, "resblock_updown": False, "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False, "diffusion_steps": 1000, "noise_schedule": "linear",
    "timestep_respacing": "", "use_kl": False, "predict_xstart": False,
    "rescale_timesteps": False, "rescale_learned_sigmas": False,
    "classifier_use_fp16": False, "classifier_width": 128, "classifier_depth": 2,
    "classifier_attention_resolutions": "32,16,8", "classifier_use_scale_shift_norm": True,
    "classifier_resblock_updown": True, "classifier_pool": "attention",
}
# improved-diffusion's model_and_diffusion_defaults(): its UNet always resamples with
# convolutions, uses the legacy QKV order and num_heads (no per-head width).
IMPROVED_DEFAULTS: dict[str, Any] = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4,
    "num_heads_upsample": -1, "attention_resolutions": "16,8", "dropout": 0.0,
    "learn_sigma": False, "sigma_small": False, "class_cond": False, "diffusion_steps": 1000,
    "noise_schedule": "linear", "timestep_respacing": "", "use_kl": False,
    "predict_xstart": False, "rescale_timesteps": True, "rescale_learned_sigmas": True,
    "use_checkpoint": False, "use_scale_shift_norm": True, "use_fp16": False,
    "channel_mult": "",
}
# guidekit's extensions for sizes openai never released (the classifier's channel_mult
# otherwise follows create_classifier's table; openai's NUM_CLASSES is 1000).
_EXTENSIONS: dict[str, Any] = {"channel_mult": "", "num_classes": 1000,
                               "classifier_num_head_channels": 64}
# Flags of openai's sampling scripts: accepted so a README command line pastes as it is,
# recorded, not applied (guidekit's `sample` has --sampler, --steps, --respacing, --scale).
_SCRIPT_FLAGS: dict[str, Any] = {"clip_denoised": True, "num_samples": 10000,
                                 "batch_size": 16, "use_ddim": False, "model_path": "",
                                 "classifier_path": "", "classifier_scale": 1.0}
_NOT_APPLIED = ("use_fp16", "classifier_use_fp16", "use_checkpoint", "use_kl",
                "rescale_learned_sigmas", "timestep_respacing", "sigma_small",
                *_SCRIPT_FLAGS)
_MULT = {"guided-diffusion": {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4),
                              128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)},
         "improved-diffusion": {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}}
_BY_NAME = {"guided-diffusion": ADM_DEFAULTS, "improved-diffusion": IMPROVED_DEFAULTS}


# --------------------------------------------------------------------------- flags


def _str2bool(name: str, v: str) -> bool:
    """openai's str2bool, as one-line errors."""
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise GuidekitError(f"--{name} expects a boolean (True/False, yes/no, 1/0), got '{v}'")


def _typed(name: str, default: Any, v: str) -> Any:
    if isinstance(default, bool):
        return _str2bool(name, v)
    try:
        return type(default)(v)
    except ValueError:
        raise GuidekitError(f"--{name} expects {type(default).__name__}, got '{v}'") from None


def parse_openai_flags(args: list[str], defaults: str = "guided-diffusion"
                       ) -> tuple[dict[str, Any], set[str]]:
    """Parse ``--name value`` / ``--name=value`` flags as openai's scripts do (their
    argparse over the defaults dict). Returns (every flag with defaults filled in, the names
    given)."""
    if defaults not in _BY_NAME:
        raise GuidekitError(f"unknown --defaults '{defaults}': choose "
                            f"{' or '.join(_BY_NAME)}")
    known = {**_SCRIPT_FLAGS, **_EXTENSIONS, **_BY_NAME[defaults]}
    flags, given, i = dict(known), set(), 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise GuidekitError(f"unexpected argument '{token}': flags are --name value")
        name, eq, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise GuidekitError(f"unknown flag --{name} for {defaults}'s scripts{hint}")
        if not eq:
            if i + 1 >= len(args):
                raise GuidekitError(f"--{name} needs a value")
            i, value = i + 1, args[i + 1]
        flags[name], i = _typed(name, known[name], value), i + 1
        given.add(name)
    return flags, given


def _ints(name: str, text: str) -> list[int]:
    try:
        vals = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise GuidekitError(f"--{name} expects comma-separated integers, got '{text}'") from None
    if not vals or min(vals) < 1:
        raise GuidekitError(f"--{name} expects positive integers, got '{text}'")
    return vals


def _channel_mult(text: str, size: int, table: dict[int, tuple[float, ...]]) -> tuple:
    if text:
        try:
            return tuple(float(s) for s in text.split(","))
        except ValueError:
            raise GuidekitError(f"--channel_mult expects comma-separated numbers, "
                                f"got '{text}'") from None
    if size not in table:
        raise GuidekitError(f"no default channel_mult for --image_size {size} (the scripts know "
                            f"{', '.join(map(str, table))}): give --channel_mult")
    return table[size]


def _attention(name: str, text: str, size: int, levels: int, dropped: list[int]) -> tuple:
    """Pixel sizes with attention, as ADM resolves them: ds = size // res, and only the ds
    that occur (1, 2, 4, ...) count; the others are dropped (and recorded)."""
    occur = {2**i for i in range(levels)}
    keep = []
    for res in _ints(name, text):
        ds = size // res
        (keep.append(size // ds) if ds in occur else dropped.append(res))
    return tuple(sorted(set(keep), reverse=True))


def _schedule(flags: dict[str, Any]) -> Any:
    from guidekit.schedule import ScheduleConfig

    kind, steps = flags["noise_schedule"], flags["diffusion_steps"]
    if kind not in ("linear", "cosine"):
        raise GuidekitError(f"unknown --noise_schedule '{kind}': linear or cosine")
    if steps < 1:
        raise GuidekitError(f"--diffusion_steps must be >= 1, got {steps}")
    # guidekit's linear schedule scales β by 1000/T, as get_named_beta_schedule does.
    return ScheduleConfig(kind=kind, num_timesteps=steps)


def _model_config(flags: dict[str, Any], defaults: str, classifier: bool,
                  dropped: list[int]) -> Any:
    from guidekit.unet import ClassifierConfig, UNetConfig

    size = flags["image_size"]
    scale = 1000 / flags["diffusion_steps"] if flags["rescale_timesteps"] else 1.0
    if classifier:
        mult = _channel_mult(flags["channel_mult"], size, _MULT["guided-diffusion"])
        return ClassifierConfig(
            image_size=size, in_channels=3, model_channels=flags["classifier_width"],
            channel_mult=mult, num_res_blocks=flags["classifier_depth"],
            attention_resolutions=_attention("classifier_attention_resolutions",
                                             flags["classifier_attention_resolutions"],
                                             size, len(mult), dropped),
            num_heads=1, num_head_channels=flags["classifier_num_head_channels"],
            use_scale_shift_norm=flags["classifier_use_scale_shift_norm"],
            resblock_updown=flags["classifier_resblock_updown"], use_new_attention_order=False,
            timestep_scale=scale, num_classes=flags["num_classes"],
            pool=flags["classifier_pool"])
    mult = _channel_mult(flags["channel_mult"], size, _MULT[defaults])
    return UNetConfig(
        image_size=size, in_channels=3, model_channels=flags["num_channels"],
        channel_mult=mult, num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=_attention("attention_resolutions",
                                         flags["attention_resolutions"], size, len(mult),
                                         dropped),
        num_heads=flags["num_heads"], dropout=flags["dropout"],
        num_head_channels=flags.get("num_head_channels", -1),
        use_scale_shift_norm=flags["use_scale_shift_norm"],
        resblock_updown=flags.get("resblock_updown", False), conv_resample=True,
        use_new_attention_order=flags.get("use_new_attention_order", False),
        timestep_scale=scale, learn_sigma=flags["learn_sigma"],
        num_classes=flags["num_classes"] if flags["class_cond"] else None,
        num_heads_upsample=flags["num_heads_upsample"])


# --------------------------------------------------------------------------- weights


def read_state_dict(path: str | Path, entry: str | None = None) -> dict[str, Any]:
    """A flat ``{name: float tensor}`` from a ``.pt``/``.pth`` (never running pickled code)
    or ``.safetensors`` file, cast to float32; ``entry``: the dict's item holding it."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(path)
        except Exception as exc:
            raise CheckpointError(f"cannot read {path} as safetensors: "
                                  f"{str(exc).splitlines()[0] if str(exc) else exc}") from None
    else:
        obj = None
        for mmap in (True, False):  # old (non-zip) torch.save files cannot be mmapped
            try:
                with warnings.catch_warnings():  # torch's note on old pickle protocols
                    warnings.simplefilter("ignore")
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
                break
            except pickle.UnpicklingError as exc:
                what = re.search(r"GLOBAL (\S+)", str(exc))
                why = f"it wants to call {what.group(1)}" if what else (
                    "it holds something other than tensors, or is damaged")
                raise CheckpointError(
                    f"{path} was refused: torch.load(weights_only=True) found that {why}; "
                    "nothing in it was executed (convert only plain state dicts)") from None
            except Exception as exc:
                if not mmap:
                    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: "
                                          f"{first}") from None
    if entry is not None:
        if not isinstance(obj, dict) or entry not in obj:
            raise CheckpointError(f"{path} has no '{entry}' entry: expected "
                                  f"torch.save({{'{entry}': state_dict}})")
        obj = obj[entry]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} does not hold a state dict (a dict of tensors), "
                              f"but {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            hint = (" (a PDAE checkpoint? use `guidekit convert pdae`)"
                    if k == "ema_denoise_fn" else "")
            raise CheckpointError(f"{path}: entry '{k}' is of type {type(v).__name__}, not a "
                                  f"tensor; "
                                  f"expected a flat state dict{hint}")
        if not v.dtype.is_floating_point:
            raise CheckpointError(f"{path}: '{k}' holds {str(v.dtype).removeprefix('torch.')} "
                                  "values; a model's weights are floating point")
        out[k] = v.float()
    return out


# ADM names -> guidekit's (ResBlock and attention sublayers); reversed for messages.
_RENAMES = ((".in_layers.2.", ".in_conv."), (".out_layers.0.", ".out_norm."),
            (".out_layers.3.", ".out_layers.2."), (".skip_connection.", ".skip."),
            (".proj_out.", ".proj."))


def _to_guidekit(key: str, classifier: bool, pool: str) -> str:
    for a, b in _RENAMES:
        key = key.replace(a, b)
    if classifier and key.startswith("out."):
        key = "head." + key[4:]
        if pool == "adaptive" and key.startswith("head.3."):
            key = "head.4." + key[7:]  # ADM's 1x1 conv before Flatten is guidekit's Linear
    return key


def _to_file(key: str, classifier: bool, pool: str) -> str:
    if classifier and key.startswith("head."):
        key = ("out.3." + key[7:]) if pool == "adaptive" and key.startswith("head.4.") else (
            "out." + key[5:])
    for a, b in reversed(_RENAMES):
        key = key.replace(b, a)
    return key


def _file_shape(gk_key: str, shape: tuple, classifier: bool, pool: str) -> tuple:
    """A guidekit tensor's shape in the file's layout (Conv1d attention, 1x1 conv head)."""
    if re.search(r"\.(qkv|proj)\.weight$", gk_key) and not gk_key.startswith("head."):
        return shape[:3]
    if classifier and pool == "adaptive" and gk_key == "head.4.weight":
        return (*shape, 1, 1)
    return shape


def _map_weights(sd: dict[str, Any], want: dict[str, Any], classifier: bool, pool: str
                 ) -> tuple[dict[str, Any], list[tuple[str, str, tuple, tuple]]]:
    """(guidekit state dict, problems as (kind, file key, file shape, expected shape))."""
    mapped, problems = {}, []
    for k, v in sd.items():
        g = _to_guidekit(k, classifier, pool)
        if g not in want:
            problems.append(("unexpected", k, tuple(v.shape), ()))
            continue
        expected = _file_shape(g, tuple(want[g].shape), classifier, pool)
        if tuple(v.shape) != expected:
            problems.append(("shape", k, tuple(v.shape), expected))
            continue
        mapped[g] = v.reshape(want[g].shape)  # Conv1d / 1x1-conv layouts to guidekit's
    for g, t in want.items():
        k = _to_file(g, classifier, pool)
        if k not in sd:
            problems.append(("missing", k, (), _file_shape(g, tuple(t.shape), classifier, pool)))
    return mapped, problems


def _blocks(keys: list[str], pattern: str) -> set[str]:
    """The blocks (``input_blocks.3``, ...) holding a layer whose key matches ``pattern``."""
    return {m.group(1) for k in keys if (m := re.match(r"^((?:input|output)_blocks\.\d+)\.\d+"
                                                       + pattern, k))}


def _hint(problems: list[tuple[str, str, tuple, tuple]], file_keys: list[str],
          model_keys: list[str], classifier: bool) -> str:
    """The flag that most likely differs (the most telling evidence first)."""
    c = "classifier_" if classifier else ""
    shape = {k: (f, w) for kind, k, f, w in problems if kind == "shape"}
    some = [k for kind, k, _, _ in problems if kind != "shape"]
    if "label_emb.weight" in model_keys and "label_emb.weight" not in file_keys:
        return "the weights are unconditional: --class_cond False"
    if "label_emb.weight" in file_keys and "label_emb.weight" not in model_keys:
        return "the weights are class-conditional: --class_cond True"
    if "label_emb.weight" in shape:
        return f"--num_classes {shape['label_emb.weight'][0][0]}"
    if "input_blocks.0.0.weight" in shape:
        f, w = shape["input_blocks.0.0.weight"]
        if f[1] != w[1]:
            return (f"the model takes {f[1]}-channel inputs (an upsampler's low-resolution "
                    "image? those cannot be converted)")
    if "time_embed.0.weight" in shape:
        mc = shape["time_embed.0.weight"][0][1]
        return f"--classifier_width {mc}" if classifier else f"--num_channels {mc}"
    if "out.2.positional_embedding" in shape:
        return "--image_size (the attention pool's size differs)"
    if classifier and any(k.startswith("out.") for k in some):
        return "--classifier_pool"
    for k in ("out.2.c_proj.weight", "out.3.weight"):
        if classifier and k in shape:
            return f"--num_classes {shape[k][0][0]}"
    if not classifier and set(shape) == {"out.2.weight", "out.2.bias"} and not some:
        f, w = shape["out.2.weight"]
        return f"--learn_sigma {f[0] > w[0]}"
    emb = {k: fw for k, fw in shape.items() if ".emb_layers." in k}
    if not some and emb and len(emb) == len(shape) and all(
            f[0] in (2 * w[0], w[0] // 2) for f, w in emb.values()):
        f, w = next(iter(emb.values()))
        return f"--{c}use_scale_shift_norm {f[0] > w[0]}"
    updown = r"\.(op|conv)\."
    if _blocks(file_keys, updown) != _blocks(model_keys, updown):
        return f"--{c}resblock_updown {not _blocks(file_keys, updown)}"
    blocks = _blocks(file_keys, r"\.") != _blocks(model_keys, r"\.")
    if blocks:
        return (f"--{'classifier_depth' if c else 'num_res_blocks'} or --channel_mult (the "
                "number of blocks differs)")
    if _blocks(file_keys, r"\.qkv\.") != _blocks(model_keys, r"\.qkv\."):
        return f"--{c}attention_resolutions (or --image_size)"
    return "--channel_mult (the widths differ)"


def _describe(problems: list[tuple[str, str, tuple, tuple]], by: str) -> str:
    out = []
    for kind in ("shape", "missing", "unexpected"):
        for _, k, f, w in [p for p in problems if p[0] == kind][:2]:
            out.append(f"'{k}' is {f} in the file but {w} by {by}" if kind == "shape"
                       else f"'{k}' is missing from the file" if kind == "missing"
                       else f"'{k}' is in the file, but the model has no such tensor")
    return "; ".join(out)


def _load(model: Any, sd: dict[str, Any], classifier: bool, pool: str, source: str,
          pdae_config: str | None = None) -> None:
    want = model.state_dict()
    mapped, problems = _map_weights(sd, want, classifier, pool)
    if problems:
        by = pdae_config or "the flags"
        hint = (f"that {pdae_config} belongs to these weights, and --image-size" if pdae_config
                else _hint(problems, list(sd), [_to_file(k, classifier, pool) for k in want],
                           classifier))
        raise CheckpointError(f"the weights in {source} do not fit {by}: "
                              f"{_describe(problems, by)}; check {hint}")
    model.load_state_dict(mapped, strict=True)


# --------------------------------------------------------------------------- writing


def check_out(out: Path, force: bool) -> None:
    """A one-line error unless ``out`` is new, empty, or a checkpoint ``force`` replaces."""
    from guidekit.checkpoint import CONFIG, LOCK

    if out.exists() and not out.is_dir():
        raise GuidekitError(f"--out {out} is a file, not a folder")
    if (out / CONFIG).exists():
        if not force:
            raise GuidekitError(f"{out} already holds a checkpoint: give --force to replace "
                                "it, or another --out")
    elif out.is_dir() and any(p.name != LOCK and not p.name.endswith(".tmp")
                              for p in out.iterdir()):  # what a failed write left is no data
        raise GuidekitError(f"{out} is a folder that is not empty and holds no checkpoint: "
                            "give an empty or new --out")


def write_converted(out: Path, kind: str, name: str, model: Any, schedule: Any,
                    num_classes: Any, converted_from: dict[str, Any],
                    sampling: dict[str, Any] | None = None) -> Path:
    """Write a converted model as a guidekit checkpoint (EMA role only, step 0)."""
    from guidekit.checkpoint import save_checkpoint
    from guidekit.unet import count_parameters

    cfg = model.config
    converted_from["parameters"] = count_parameters(model)
    config = {
        "kind": kind, "model": {"name": name, "config": cfg.to_dict()},
        "schedule": schedule.to_dict(),
        "data": {"name": converted_from["format"], "image_size": cfg.image_size,
                 "channels": cfg.in_channels, "num_classes": num_classes},
        "converted_from": converted_from,
    }
    if sampling:
        config["sampling"] = sampling
    tensors = {"model." + k: v for k, v in model.state_dict().items()}
    return save_checkpoint(out, config, {"ema": tensors}, step=0)


def convert_adm(weights: str | Path, out: str | Path, flags: list[str] | None = None,
                defaults: str = "guided-diffusion", force: bool = False) -> Path:
    """Convert an openai guided-diffusion / improved-diffusion model or noisy classifier.

    ``flags``: openai's command-line flags (``["--image_size", "256", ...]``); flags left out
    take ``defaults``' script values. A file without ``output_blocks`` is a classifier
    (written as a ``classifier`` checkpoint), else a ``ddpm`` one. Everything is built and
    loaded strictly before anything is written. Returns the checkpoint folder."""
    from guidekit.unet import EncoderUNet, UNet

    weights, out = Path(weights), Path(out)
    parsed, given = parse_openai_flags(list(flags or []), defaults)
    if parsed["predict_xstart"]:
        raise GuidekitError("--predict_xstart True: guidekit samples ε-predicting models "
                            "only; x_0-predicting models cannot be converted")
    check_out(out, force)
    sd = read_state_dict(weights)
    classifier = not any(k.startswith("output_blocks.") for k in sd)
    clf_flags = sorted(g for g in given if g.startswith("classifier_") and g not in (
        "classifier_path", "classifier_scale"))
    if clf_flags and not classifier:
        raise GuidekitError(f"--{clf_flags[0]} given, but {weights.name} is a diffusion model "
                            "(it has output_blocks), not a classifier: drop the classifier "
                            "flags")
    dropped: list[int] = []
    cfg = _model_config(parsed, defaults, classifier, dropped)
    model = EncoderUNet(cfg) if classifier else UNet(cfg)
    _load(model, sd, classifier, getattr(cfg, "pool", ""), weights.name)
    record = {"format": defaults, "file": weights.name, "flags": parsed,
              "given": sorted(given),
              "not_applied": sorted(n for n in _NOT_APPLIED if n in given)}
    if dropped:
        record["note"] = (f"attention resolutions {dropped} never occur in this model "
                          "(openai's code ignores them) and were dropped")
    if classifier:
        return write_converted(out, "classifier", "encoder_unet", model, _schedule(parsed),
                      cfg.num_classes, record)
    return write_converted(out, "ddpm", "unet", model, _schedule(parsed), cfg.num_classes, record)


# --------------------------------------------------------------------------- PDAE


def _int_list(d: dict[str, Any], key: str, where: str, numbers: bool = False) -> tuple:
    v = config_field(d, key, (list,), where)
    ok = (int, float) if numbers else (int,)
    if not v or any(isinstance(x, bool) or not isinstance(x, ok) or x <= 0 for x in v):
        raise GuidekitError(f"{where}: '{key}' must be a list of positive numbers, got "
                            f"{v!r:.60}")
    return tuple(v)


def _pdae_config(path: Path, image_size: int) -> tuple[Any, Any]:
    import yaml

    from guidekit.schedule import ScheduleConfig
    from guidekit.unet import UNetConfig

    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise GuidekitError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise GuidekitError(f"{path} is not valid YAML: "
                            f"{str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise GuidekitError(f"{path} must be a mapping with diffusion_config and "
                            f"denoise_fn_config, got {type(doc).__name__}")
    where = f"{path.name} denoise_fn_config"
    net = config_field(doc, "denoise_fn_config", (dict,), path.name)
    diff = config_field(doc, "diffusion_config", (dict,), path.name)
    if config_field(net, "dims", (int,), where, 2) != 2:
        raise GuidekitError(f"{where}: only 2-D (image) models can be converted")
    num = (int, float)
    factors = _int_list(net, "attention_resolutions", where)
    mult = _int_list(net, "channel_multiplier", where, numbers=True)
    occur = {2**i for i in range(len(mult))}
    head = config_field(net, "head_channel", (int,), where, -1)
    cfg = UNetConfig(
        image_size=image_size, in_channels=config_field(net, "input_channel", (int,), where),
        model_channels=config_field(net, "base_channel", (int,), where), channel_mult=mult,
        num_res_blocks=config_field(net, "num_residual_blocks_of_a_block", (int,), where),
        attention_resolutions=tuple(sorted({image_size // f for f in factors if f in occur},
                                           reverse=True)),
        num_heads=config_field(net, "num_heads", (int,), where, 1),
        num_head_channels=head if head != 0 else -1,
        dropout=float(config_field(net, "dropout", num, where, 0.0)),
        use_scale_shift_norm=True, resblock_updown=True,  # PDAE's UNet always
        use_new_attention_order=config_field(net, "use_new_attention_order", (bool,), where, False),
        learn_sigma=config_field(net, "learn_sigma", (bool,), where, False),
        num_classes=config_field(net, "num_class", (int, type(None)), where, None))
    dwhere = f"{path.name} diffusion_config"
    steps = config_field(diff, "timesteps", (int,), dwhere)
    kind = config_field(diff, "betas_type", (str,), dwhere)
    if kind not in ("linear", "cosine") or steps < 1:
        raise GuidekitError(f"{dwhere}: betas_type must be linear or cosine and timesteps "
                            f">= 1, got {kind!r:.30}, {steps}")
    # PDAE's linear betas span 1e-4..0.02 for any T; guidekit's scale by 1000/T, so undo it.
    s = steps / 1000
    return cfg, ScheduleConfig(kind=kind, num_timesteps=steps, beta_start=1e-4 * s,
                               beta_end=0.02 * s)


def convert_pdae(checkpoint: str | Path, config_yml: str | Path | None, out: str | Path,
                 image_size: int, force: bool = False) -> Path:
    """Convert a PDAE pre-trained DPM: ``checkpoint.pt`` (EMA weights under
    ``ema_denoise_fn``) and its ``config.yml`` (default: beside it). The config does not say
    the image size, so ``image_size`` is required. Returns the ``ddpm`` checkpoint folder."""
    from guidekit.unet import UNet

    checkpoint, out = Path(checkpoint), Path(out)
    config_yml = Path(config_yml) if config_yml else checkpoint.parent / "config.yml"
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise GuidekitError(f"--image-size must be a positive integer, got {image_size!r}")
    cfg, schedule = _pdae_config(config_yml, image_size)
    check_out(out, force)
    sd = read_state_dict(checkpoint, entry="ema_denoise_fn")
    model = UNet(cfg)
    _load(model, sd, False, "", checkpoint.name, pdae_config=config_yml.name)
    record = {"format": "pdae", "file": checkpoint.name, "config": config_yml.name,
              "image_size": image_size}
    return write_converted(out, "ddpm", "unet", model, schedule, cfg.num_classes, record)
