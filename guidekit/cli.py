"""The ``guidekit`` command line. Commands come from the core and from plugins (trainers under
``guidekit train``, anything else through the ``guidekit_commands`` hook)."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.table import Table

from guidekit import __version__
from guidekit.errors import GuidekitError
from guidekit.options import describe_options
from guidekit.plugins import get_manager, get_registry

EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
err = Console(stderr=True)


def sample_command(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., help="A ddpm checkpoint directory."),
    sampler: str = typer.Option("ddim", help="ddim or ddpm."),
    steps: int = typer.Option(50, help="Sampling steps (respaced from the T training steps)."),
    respacing: str = typer.Option(None, help="Explicit respacing, e.g. 'ddim25' or '10,5'."),
    n: int = typer.Option(16, help="Number of images."),
    seed: int = typer.Option(0, help="Seed of x_T and the sampling noise."),
    eta: float = typer.Option(0.0, help="DDIM η (0: deterministic)."),
    variance: str = typer.Option("small", help="DDPM Σ when fixed: small (β̃) or large (β)."),
    clip: bool = typer.Option(True, help="Clip x̂_0 to [-1, 1] in each step."),
    guidance: list[str] = typer.Option([], help="Guidance plugin name (repeatable)."),
    scale: list[float] = typer.Option([], help="Guidance scale (one, or one per --guidance)."),
    guidance_schedule: list[str] = typer.Option(
        [], help="When guidance is on: constant, snr:LO:HI or t:LO:HI."
    ),
    out: Path = typer.Option(Path("samples.png"), help="PNG grid to write."),
    out_dir: Path = typer.Option(None, help="Also write one PNG per image here."),
    nrow: int = typer.Option(None, help="Images per grid row."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the step math."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Sample a grid from a trained DPM, optionally guided. Plugin options (e.g.
    --classifier) follow the --guidance that declares them; `guidekit plugins` lists them."""
    from guidekit.data import save_image_grid, save_images
    from guidekit.ddpm import load_dpm
    from guidekit.sampling import requests_from_cli, sample

    requests = requests_from_cli(guidance, scale, guidance_schedule, ctx.args)
    dpm = load_dpm(checkpoint, device)
    x = sample(
        dpm, n, sampler=sampler, steps=respacing or steps, eta=eta, guidance=requests,
        seed=seed, clip_x0=clip, variance=variance, compile=compile, progress=not json_out,
    )
    import torch

    bad = int((~torch.isfinite(x.flatten(1))).any(1).sum())
    if bad:
        raise GuidekitError(f"{bad} of {n} samples diverged (non-finite values), so nothing was "
                            "written: lower --scale, or sample with --sampler ddim")
    grid = save_image_grid(x.cpu(), out, nrow=nrow, scale=max(1, 64 // x.shape[-1]))
    files = save_images(x.cpu(), out_dir) if out_dir else []
    result = {"grid": str(grid), "n": n, "files": [str(f) for f in files],
              "mean": float(x.mean()), "std": float(x.std())}
    typer.echo(json.dumps(result) if json_out else f"wrote {grid}")


def plugins_command(
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """List loaded plugins, their versions and the names each registers."""
    reg = get_registry()
    rows = [
        {"name": p.name, "version": p.version, "module": p.module, "registers": p.registers}
        for p in reg.plugins
    ]
    if json_out:
        typer.echo(json.dumps({"plugins": rows, "failed": [
            {"name": n, "error": e} for n, e in reg.failures]}, indent=2))
        return
    table = Table("plugin", "version", "module", "registers")
    for r in rows:
        regs = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(r["registers"].items()))
        table.add_row(r["name"], r["version"], r["module"], regs or "-")
    Console().print(table)
    for name, error in reg.failures:
        Console().print(f"[red]failed[/red] {name}: {error}")


def quickstart_command(
    out: Path = typer.Option(Path("runs/quickstart"), help="Where checkpoints and grids go."),
    fast: bool = typer.Option(False, help="Tiny settings (a smoke test, not a result)."),
    seed: int = typer.Option(0, help="Seed of every step."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Train everything on the built-in digits and write grids, tables and report.html."""
    from guidekit.quickstart import run_quickstart

    summary = run_quickstart(out, fast=fast, seed=seed, progress=not json_out)
    typer.echo(json.dumps(summary, indent=2) if json_out else f"report: {summary['report']}")


def plugin_options_help(kind: str, specs: dict) -> str | None:
    """A help epilog listing each plugin's extra options (they follow --{kind} NAME)."""
    blocks = [
        f"{kind} {name}: " + "; ".join(describe_options(spec.options).splitlines())
        for name, spec in sorted(specs.items())
        if spec.options
    ]
    return "\n\n".join(blocks) or None


def build_app() -> typer.Typer:
    """The CLI with every registered trainer and plugin command."""
    app = typer.Typer(
        name="guidekit", help=f"guidekit {__version__}: guided diffusion with plugins.",
        no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    )
    reg = get_registry()
    train = typer.Typer(help="Train a model: `guidekit train NAME --help`.", no_args_is_help=True)
    weighting_help = plugin_options_help("weighting", reg.specs["weighting"])
    for name, spec in sorted(reg.specs["trainer"].items()):
        takes_weighting = "weighting" in inspect.signature(spec.command).parameters
        train.command(name, help=spec.help, context_settings=EXTRA_ARGS,
                      epilog=weighting_help if takes_weighting else None)(spec.command)
    app.add_typer(train, name="train")
    app.command("sample", context_settings=EXTRA_ARGS,
                epilog=plugin_options_help("guidance", reg.specs["guidance"]))(sample_command)
    app.command("plugins")(plugins_command)
    app.command("quickstart")(quickstart_command)
    # Each plugin's commands on their own, so one broken plugin costs only its commands.
    for impl in get_manager().hook.guidekit_commands.get_hookimpls():
        try:
            impl.function(cli=app)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            err.print(f"guidekit: plugin '{impl.plugin_name}' could not add its commands: "
                      f"{reason}", highlight=False, markup=False, soft_wrap=True)
    return app


def main(argv: list[str] | None = None) -> None:
    """Entry point: user mistakes become one line on stderr and exit status 2."""
    try:
        reg = get_registry()
        for name, error in reg.failures:
            err.print(f"guidekit: plugin '{name}' failed to load and was skipped: {error}",
                      highlight=False, markup=False, soft_wrap=True)
        command = typer.main.get_command(build_app())
        command.main(args=argv, prog_name="guidekit", standalone_mode=False)
    except GuidekitError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        err.print("aborted")
        sys.exit(130)
    except FileNotFoundError as exc:
        err.print(f"error: {exc.strerror}: {exc.filename}", highlight=False, markup=False)
        sys.exit(2)
