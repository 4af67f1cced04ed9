"""guidekit-inpaint: reconstruction guidance for inpainting, a third-party guidekit plugin.

Registers the ``inpaint`` guidance (``guidekit sample --guidance inpaint --image IMG --mask
MASK``) and the ``guidekit inpaint`` commands (``prepare``, ``evaluate``) through the
``guidekit`` entry-point group declared in this package's pyproject.toml.
"""

from __future__ import annotations

from typing import Any

from guidekit import GuidanceSpec, hookimpl

from .guidance import (
    DEFAULT_NORM,
    DEFAULT_SIGMAS,
    GUIDANCE_OPTIONS,
    NAME,
    InpaintGuidance,
    build_inpaint_guidance,
)
from .inputs import MASKS, load_image, load_mask, named_mask

__version__ = "0.1.0"


@hookimpl
def guidekit_guidances() -> list[GuidanceSpec]:
    return [GuidanceSpec(NAME, build_inpaint_guidance, options=GUIDANCE_OPTIONS,
                         help="−∇ ‖m ⊙ (x̂_0 − y)‖² / (2σ²) (DPS-normalised by default): keep "
                         "--image where --mask is white.")]


@hookimpl
def guidekit_commands(cli: Any) -> None:
    # cli is guidekit's typer.Typer. Imported here: typer stays in .cli, and the evaluation's
    # imports (the classifier plugin) load only for the CLI.
    from .cli import inpaint_app

    cli.add_typer(inpaint_app, name="inpaint")


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
