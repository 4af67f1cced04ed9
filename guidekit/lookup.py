"""Names to things: the one module between the plugin registry and the rest of guidekit.

Datasets, networks, weightings, guidances and quickstart steps are looked up by name here;
the engine modules (schedule, ops, guidance, engine, networks, data, checkpoint, training)
never see the registry. What a plugin returns is checked here too, so a broken plugin ends
in one line naming it instead of a traceback deep in training or sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guidekit.errors import GuidekitError, PluginError
from guidekit.options import resolve_options
from guidekit.plugins import get_registry
from guidekit.specs import GuidanceSpec, QuickstartStep

if TYPE_CHECKING:  # torch loads on first use: `guidekit --help` must not import it
    from torch import Tensor, nn

    from guidekit.data import ImageData
    from guidekit.schedule import NoiseSchedule

__all__ = [
    "build_model",
    "model_builder",
    "dataset_names",
    "guidance_spec",
    "load_dataset",
    "plugin_call",
    "quickstart_steps",
    "weighting_options",
    "weighting_table",
]


def plugin_call(kind: str, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a plugin's function; its own :class:`GuidekitError` passes through (a user
    mistake it names), as does an ``OSError`` about a named file (one the user gave cannot
    be read or written: the CLI says which, in one line); anything else becomes one line
    naming the plugin."""
    try:
        return fn(*args, **kwargs)
    except GuidekitError:
        raise
    except (Exception, SystemExit) as exc:
        if isinstance(exc, OSError) and exc.filename:
            raise
        owner = get_registry().owners.get((kind, name), "?")
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise PluginError(f"{kind} '{name}' (plugin '{owner}') failed: {reason}; the plugin "
                          "has a bug: report it to its authors or uninstall it") from None


def dataset_names() -> list[str]:
    """The registered dataset names."""
    return get_registry().names("dataset")


def load_dataset(
    name_or_path: str | Path, split: str = "train", image_size: int | None = None,
    seed: int = 0,
) -> ImageData:
    """Load a registered dataset by name (``digits``, ``shapes``, or a plugin's), or every
    image in a folder.

    Registered names win over a folder of the same name. Folders have no train/test split:
    either split loads the whole folder (default image_size 32, RGB).
    """
    from guidekit.data import ImageData, check_image_size, check_split, load_image_folder

    check_split(split)
    registry = get_registry()
    name = str(name_or_path)
    if not name.strip():
        # Path("") is the current directory: an empty --data must not train on whatever is there
        raise GuidekitError(f"--data is empty: give a dataset name "
                            f"({', '.join(registry.names('dataset'))}) or a folder of images")
    if image_size is not None:
        check_image_size(image_size)  # before a plugin's loader allocates anything
    if name in registry.names("dataset"):
        data = plugin_call("dataset", name, registry.dataset(name).load, split, image_size, seed)
        if not isinstance(data, ImageData):
            raise PluginError(f"dataset '{name}' did not return an ImageData (it returned "
                              f"{type(data).__name__}): plugin "
                              f"'{registry.owners[('dataset', name)]}' has a bug")
        if len(data) == 0:
            raise PluginError(f"dataset '{name}' has no images in its {split} split")
        return data
    folder = Path(name).expanduser()
    if folder.is_dir():
        return load_image_folder(folder, 32 if image_size is None else image_size, channels=3)
    raise GuidekitError(
        f"unknown dataset '{name}': choose one of "
        f"{', '.join(registry.names('dataset'))}, or give a folder of images"
    )


def build_model(entry: dict[str, Any]) -> nn.Module:
    """Rebuild a network from a config.json ``model`` entry (``{"name", "config"}``)."""
    return model_builder(entry)()


def model_builder(entry: dict[str, Any]) -> Callable[[], nn.Module]:
    """What builds the network of a config.json ``model`` entry, its name and config
    resolved now: the plugins load here, never inside a meta-device build (which would
    make the tensors a plugin creates at import meta tensors)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(
            entry.get("config"), dict):
        raise GuidekitError("the checkpoint's config.json has no valid 'model' entry "
                            '({"name": ..., "config": {...}}): the checkpoint is damaged')
    name = entry["name"]
    spec = get_registry().model(name)
    config = spec.config_class.from_dict(entry["config"])
    model_class = spec.model_class  # a Lazy one imports now, too
    return lambda: plugin_call("model", name, model_class, config)


def weighting_options(name: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every option value of weighting ``name``: ``given`` checked, the rest defaults."""
    spec = get_registry().weighting(name)
    return resolve_options(spec.options, given, f"weighting '{name}'")


def weighting_table(
    name: str, schedule: NoiseSchedule, options: dict[str, Any] | None = None
) -> Tensor:
    """λ_t for every training step from the weighting plugin ``name``: (T,) float32, finite,
    ≥ 0 and not all zero."""
    import torch

    spec = get_registry().weighting(name)
    values = weighting_options(name, options)
    weights = plugin_call("weighting", name, spec.weights, schedule, **values)
    if not isinstance(weights, torch.Tensor):
        raise PluginError(f"weighting '{name}' returned {type(weights).__name__}, not a tensor")
    weights = weights.detach().to("cpu", torch.float32)
    if weights.shape != (schedule.num_steps,) or not bool(torch.isfinite(weights).all()):
        raise PluginError(f"weighting '{name}' must return {schedule.num_steps} finite weights, "
                          f"got shape {tuple(weights.shape)}")
    if bool((weights < 0).any()) or not bool((weights > 0).any()):
        raise PluginError(f"weighting '{name}' returned negative or all-zero weights: a loss "
                          "weight must be >= 0 and not all zero")
    return weights


def guidance_spec(name: str) -> GuidanceSpec:
    """The registered guidance ``name`` (a one-line error listing the choices otherwise)."""
    return get_registry().guidance(name)


def quickstart_steps() -> list[QuickstartStep]:
    """Every registered quickstart step, in ``order``."""
    return sorted(get_registry().specs["quickstart step"].values(), key=lambda s: s.order)
