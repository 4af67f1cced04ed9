"""The plugin's commands: ``guidekit inpaint prepare`` (a test image and a mask as PNGs) and
``guidekit inpaint evaluate`` (guided vs unguided inpainting of held-out images, judged).

The only module of the plugin that imports typer: it reads the command line and calls the
Python functions of :mod:`.inputs` and :mod:`.evaluate`.
"""

from __future__ import annotations

from pathlib import Path

import typer
from guidekit import GuidekitError
from guidekit.cli.params import Device, JSONOut, parse_scales, report
from guidekit.options import check_seed

from .guidance import DEFAULT_NORM, NORMS
from .inputs import MASKS, prepare_inputs

inpaint_app = typer.Typer(help="Inpainting with reconstruction guidance: inputs and figures.",
                          no_args_is_help=True)


def parse_sigmas(text: str) -> list[float]:
    """``"0.05,0.1"`` -> [0.05, 0.1]; anything but positive numbers is a one-line error."""
    try:
        values = parse_scales(text, "--inpaint-sigma")
    except GuidekitError:
        values = []
    if not values or not all(v > 0 for v in values):
        raise GuidekitError(f"--inpaint-sigma must be positive numbers like 0.1 or 0.05,0.1, "
                            f"got '{text}'")
    return values


@inpaint_app.command("prepare")
def prepare_command(
    index: int = typer.Option(0, help="Which image of the test split."),
    mask: str = typer.Option("left", help=f"A named mask ({', '.join(MASKS)}): the part kept."),
    out: Path = typer.Option(Path("inpaint"), help="Folder for image.png and mask.png."),
    data: str = typer.Option("digits", help="A registered dataset with a test split."),
    json_out: JSONOut = False,
) -> None:
    """Write a held-out image and a mask (white = known) for `guidekit sample --guidance
    inpaint --image OUT/image.png --mask OUT/mask.png`."""
    report(prepare_inputs(index, mask, out, data), json_out)


@inpaint_app.command("evaluate")
def evaluate_command(
    checkpoint: Path = typer.Option(..., help="The ddpm checkpoint that inpaints."),
    judge: Path = typer.Option(None, help="A clean judge (`guidekit train judge`) for the "
                               "agreement figures."),
    n: int = typer.Option(100, help="Held-out images to inpaint."),
    start: int = typer.Option(0, help="First test image."),
    mask: str = typer.Option("left", help=f"A named mask ({', '.join(MASKS)}) or a PNG at the "
                             "DPM's size, white = known."),
    sampler: str = typer.Option("ddim", help="ddim or ddpm."),
    steps: int = typer.Option(50, help="Sampling steps (respaced from the T training steps)."),
    scale: float = typer.Option(1.0, help="Guidance scale."),
    inpaint_sigma: str = typer.Option(None, help="σ, or several comma-separated to sweep "
                                      "(default: the norm's default)."),
    inpaint_norm: str = typer.Option(DEFAULT_NORM, help=f"{' or '.join(NORMS)}."),
    seed: int = typer.Option(0, help="Seed of x_T and the sampling noise (same every row)."),
    out_dir: Path = typer.Option(Path("runs/inpaint-eval"), help="Where the grid goes."),
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """Inpaint N held-out images unguided and guided (same x_T); report the known region's MSE
    and the judge's agreement, and write a grid (reference, masked, unguided, guided)."""
    # imported here so the classifier plugin and torch load only when this command runs
    from guidekit import load_dpm
    from guidekit_classifier.training import JUDGE_KIND, load_classifier

    from .evaluate import evaluate_inpainting, evaluation_report

    check_seed(seed)
    sigmas = None if inpaint_sigma is None else parse_sigmas(inpaint_sigma)
    dpm = load_dpm(checkpoint, device)
    jdg = None if judge is None else load_classifier(judge, JUDGE_KIND, device)
    result = evaluate_inpainting(
        dpm, jdg, n=n, start=start, mask=mask, sigmas=sigmas, norm=inpaint_norm, scale=scale,
        sampler=sampler, steps=steps, seed=seed, progress=not json_out,
    )
    report(evaluation_report(result, out_dir), json_out)


__all__ = ["inpaint_app", "parse_sigmas"]
