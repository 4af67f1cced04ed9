"""``guidekit inpaint prepare`` (a test digit and a mask as PNGs) and ``guidekit inpaint
evaluate`` (guided vs unguided inpainting of held-out images, judged)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from guidekit import GuidekitError, load_dataset, save_image_grid
from rich.console import Console
from rich.table import Table

from .evaluate import METRICS, comparison_grid, evaluate_inpainting, jsonable
from .guidance import DEFAULT_NORM, NORMS
from .inputs import MASKS, load_mask

inpaint_app = typer.Typer(help="Inpainting with reconstruction guidance: inputs and figures.",
                          no_args_is_help=True)


def parse_sigmas(text: str) -> list[float]:
    """``"0.05,0.1"`` -> [0.05, 0.1]; anything but positive numbers is a one-line error."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise GuidekitError(f"--inpaint-sigma must be positive numbers like 0.1 or 0.05,0.1, "
                            f"got '{text}'")
    return values


@inpaint_app.command("prepare")
def prepare_command(
    index: int = typer.Option(0, help="Which image of the test split."),
    mask: str = typer.Option("left", help=f"A named mask ({', '.join(MASKS)}): the part kept."),
    out: Path = typer.Option(Path("inpaint"), help="Folder for image.png and mask.png."),
    data: str = typer.Option("digits", help="A registered dataset with a test split."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Write a held-out image and a mask (white = known) for `guidekit sample --guidance
    inpaint --image OUT/image.png --mask OUT/mask.png`."""
    test = load_dataset(data, "test")
    if not 0 <= index < len(test):
        raise GuidekitError(f"--index must be in 0..{len(test) - 1} (the {data} test split), "
                            f"got {index}")
    m = load_mask(mask, test.image_size)
    image = save_image_grid(test.images[index : index + 1], out / "image.png", padding=0)
    mask_png = save_image_grid(m * 2 - 1, out / "mask.png", padding=0)
    label = None if test.labels is None else int(test.labels[index])
    result = {"image": str(image), "mask": str(mask_png), "index": index, "label": label}
    if json_out:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"wrote {image} (label {label}) and {mask_png} (known: {MASKS[mask]})")


# short column names, so the table fits a terminal: known/filled region MSE, judge agreement
HEADERS = ("known MSE", "fill MSE", "judge=label", "judge=ref")


def result_table(result: dict) -> Table:
    """The evaluate rows as a rich table; '-' where a figure needs a judge."""
    table = Table("guidance", "σ", *HEADERS, "seconds",
                  title=f"{result['sampler'].upper()}-{result['steps']}, {result['n']} test "
                  f"images, mask {result['mask']}, norm {result['norm']}, scale "
                  f"{result['scale']:g}")
    for r in result["rows"]:
        sigma = "-" if r["sigma"] is None else f"{r['sigma']:g}"
        cells = ["diverged" if r["diverged"] else "-" if r[k] is None else f"{r[k]:.4f}"
                 for k in METRICS]
        table.add_row(r["guidance"], sigma, *cells, f"{r['seconds']:.1f}")
    return table


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
    device: str = typer.Option("cpu", help="cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Inpaint N held-out images unguided and guided (same x_T); report the known region's MSE
    and the judge's agreement, and write a grid (reference, masked, unguided, guided)."""
    from guidekit.ddpm import load_dpm
    from guidekit_classifier.training import JUDGE_KIND, load_classifier

    sigmas = None if inpaint_sigma is None else parse_sigmas(inpaint_sigma)
    dpm = load_dpm(checkpoint, device)
    jdg = None if judge is None else load_classifier(judge, JUDGE_KIND, device)
    result = evaluate_inpainting(
        dpm, jdg, n=n, start=start, mask=mask, sigmas=sigmas, norm=inpaint_norm, scale=scale,
        sampler=sampler, steps=steps, seed=seed, progress=not json_out,
    )
    summary = {**jsonable(result),
               "grid": str(comparison_grid(result, out_dir / f"inpaint_{sampler}.png"))}
    if json_out:
        typer.echo(json.dumps(summary))
        return
    Console().print(result_table(result))
    if summary["judge_reference_accuracy"] is not None:
        typer.echo(f"judge accuracy on the references: {summary['judge_reference_accuracy']:.4f}")
    typer.echo(f"grid (rows: reference, masked, unguided, guided per σ): {summary['grid']}")


__all__ = ["inpaint_app", "parse_sigmas", "result_table"]
