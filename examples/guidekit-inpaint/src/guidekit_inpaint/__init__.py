"""guidekit-inpaint: reconstruction guidance for inpainting, a third-party guidekit plugin.

Registers the ``inpaint`` guidance (``guidekit sample --guidance inpaint --image IMG --mask
MASK``) and the ``guidekit inpaint`` commands (``prepare``, ``evaluate``) through the
``guidekit`` entry-point group declared in this package's pyproject.toml.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from guidekit import GuidanceSpec, hookimpl
from guidekit.specs import Lazy, lazy_exports

__version__ = "0.1.0"

NAME = "inpaint"  # the guidance's name, as .guidance spells it (NAME)

# The modules load on first use: they import torch, and `guidekit --help` must not.
_LAZY = {
    "guidance": ("DEFAULT_NORM", "DEFAULT_SIGMAS", "GUIDANCE_OPTIONS", "InpaintGuidance",
                 "build_inpaint_guidance"),
    "inputs": ("MASKS", "load_image", "load_mask", "named_mask"),
}
if TYPE_CHECKING:
    from .guidance import (
        DEFAULT_NORM,
        DEFAULT_SIGMAS,
        GUIDANCE_OPTIONS,
        InpaintGuidance,
        build_inpaint_guidance,
    )
    from .inputs import MASKS, load_image, load_mask, named_mask


__getattr__ = lazy_exports(__name__, _LAZY)


@hookimpl
def guidekit_guidances() -> list[GuidanceSpec]:
    return [GuidanceSpec(NAME, Lazy("guidekit_inpaint.guidance:build_inpaint_guidance"),
                         options=Lazy("guidekit_inpaint.guidance:GUIDANCE_OPTIONS"),
                         help="−∇ ‖m ⊙ (x̂_0 − y)‖² / (2σ²) (DPS-normalised by default): keep "
                         "--image where --mask is white.")]


@hookimpl
def guidekit_commands(cli: Any) -> None:
    # cli is guidekit's typer.Typer. A lazy group: `guidekit --help` lists `inpaint` without
    # importing .cli, whose option help needs .inputs and .guidance (torch); typer stays in
    # the CLI, and the evaluation's imports (the classifier plugin) load only when it runs.
    from guidekit.cli.params import lazy_group

    cli.add_typer(lazy_group("guidekit_inpaint.cli:inpaint_app", help="Inpainting with "
                             "reconstruction guidance: inputs and figures."), name="inpaint")


__all__ = [
    "DEFAULT_NORM",
    "DEFAULT_SIGMAS",
    "GUIDANCE_OPTIONS",
    "MASKS",
    "InpaintGuidance",
    "__version__",
    "build_inpaint_guidance",
    "guidekit_commands",
    "guidekit_guidances",
    "load_image",
    "load_mask",
    "named_mask",
]
