"""The ``guidekit`` app: the core commands, the trainers, the plugins' commands, and
:func:`main`, which turns every user mistake into one line and exit status 2."""

from __future__ import annotations

import contextlib
import errno
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from guidekit import __version__
from guidekit.cli.convert import register as register_convert
from guidekit.cli.lazy import LazyCommands, epilog_command_class, lazy_group_class
from guidekit.cli.params import (
    EXTRA_ARGS,
    Classes,
    ClassPerRow,
    Clip,
    ClipOrder,
    Device,
    Eta,
    Guidances,
    GuidanceSchedules,
    JSONOut,
    Respacing,
    SamplerName,
    SampleSteps,
    Scales,
    Spacing,
    Variance,
    echo_json,
    plain_console,
    requests_from_cli,
)
from guidekit.cli.params import trainer_command as make_trainer_command
from guidekit.errors import GuidekitError, PluginError
from guidekit.options import check_seed, describe_options
from guidekit.plugins import CORE_NAME, Registry, get_manager, get_registry

err = plain_console(stderr=True)
CORE_COMMANDS = ("train", "sample", "plugins", "quickstart", "convert")
# click's exception base, as whichever click typer runs on (typer >= 0.26 ships its own copy)
_ClickException: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _say(line: str) -> None:
    # literal: a message holding "[bold]" or ":a:" (a schedule spec) prints as written
    err.print(line, highlight=False, markup=False, emoji=False, soft_wrap=True)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def sample_command(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., help="A ddpm checkpoint directory."),
    sampler: SamplerName = "ddim",
    steps: SampleSteps = 50,
    spacing: Spacing = None,
    respacing: Respacing = None,
    n: int = typer.Option(16, help="Number of images."),
    seed: int = typer.Option(0, help="Seed of x_T and the sampling noise."),
    eta: Eta = 0.0,
    variance: Variance = None,
    clip: Clip = None,
    clip_order: ClipOrder = "clip-then-guide",
    class_: Classes = (),
    class_per_row: ClassPerRow = False,
    guidance: Guidances = (),
    scale: Scales = (),
    guidance_schedule: GuidanceSchedules = (),
    out: Path = typer.Option(Path("samples.png"), help="PNG grid to write."),
    out_dir: Path = typer.Option(None, help="Also write one PNG per image here."),
    nrow: int = typer.Option(None, help="Images per grid row."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the step math."),
    device: Device = "auto",
    json_out: JSONOut = False,
) -> None:
    """Sample a grid from a trained DPM, optionally guided. Plugin options (e.g.
    --classifier) follow the --guidance that declares them; `guidekit plugins` lists them."""
    from guidekit.data import check_output_dir, check_png_path, save_image_grid, save_images
    from guidekit.ddpm import load_dpm
    from guidekit.lookup import guidance_spec
    from guidekit.sampling import sample

    if respacing is not None and spacing is not None:
        raise GuidekitError("give --spacing (with --steps) or --respacing, not both")
    # what only writing would find out, found before the sampling run
    if nrow is not None and nrow < 1:
        raise GuidekitError(f"--nrow must be >= 1, got {nrow}: give the images per grid row, "
                            "or leave it out")
    check_png_path(out, "--out")
    if out_dir is not None:
        check_output_dir(out_dir, "--out-dir")
    requests = requests_from_cli(guidance, scale, guidance_schedule, ctx.args,
                                 lambda name: guidance_spec(name).options)
    dpm = load_dpm(checkpoint, device)
    x = sample(
        dpm, n, sampler=sampler, steps=steps if respacing is None else respacing, eta=eta,
        guidance=requests, seed=seed, clip_x0=clip, clip_order=clip_order, variance=variance,
        spacing=spacing, classes=class_, class_per_row=class_per_row, compile=compile,
        progress=not json_out,
    )
    grid = save_image_grid(x.cpu(), out, nrow=nrow, scale=max(1, 64 // x.shape[-1]))
    files = save_images(x.cpu(), out_dir) if out_dir is not None else []
    result = {"grid": str(grid), "n": n, "files": [str(f) for f in files],
              "mean": float(x.mean()), "std": float(x.std())}
    if json_out:
        echo_json(result)
    else:
        typer.echo(f"wrote {grid}")


def plugins_command(json_out: JSONOut = False) -> None:
    """List loaded plugins, their versions, the names each registers, and the plugins that
    failed (with why)."""
    reg = get_registry()
    rows = [
        {"name": p.name, "version": p.version, "module": p.module, "registers": p.registers}
        for p in reg.plugins
    ]
    if json_out:
        echo_json({"plugins": rows, "failed": [
            {"name": n, "error": e} for n, e in reg.failures]}, indent=2)
        return
    table = Table("plugin", "version", "module", "registers")
    for r in rows:
        regs = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(r["registers"].items()))
        # Text cells: plugin metadata is third-party text, never markup or emoji codes
        table.add_row(*(Text(str(v)) for v in (r["name"], r["version"], r["module"],
                                               regs or "-")))
    out = plain_console()
    out.print(table)
    for name, error in reg.failures:
        out.print(f"failed {name}: {error}", soft_wrap=True)


def quickstart_command(
    out: Path = typer.Option(Path("runs/quickstart"), help="Where checkpoints and grids go."),
    fast: bool = typer.Option(False, help="Tiny settings (a smoke test, not a result)."),
    seed: int = typer.Option(0, help="Seed of every step."),
    bf16: Optional[bool] = typer.Option(  # noqa: UP045 -- typer reads the annotation
        None, "--bf16/--fp32",
        help="Train the DDPM, PDAE and the latent DPM in bf16 autocast, or in float32. "
        "Default: bf16 where the device computes it natively (a CPU with AMX, a GPU with "
        "bf16)."),
    json_out: JSONOut = False,
) -> None:
    """Train everything on the built-in digits and write grids, tables and report.html."""
    import os

    from guidekit.data import check_output_dir
    from guidekit.quickstart import run_quickstart

    seed = check_seed(seed)
    check_output_dir(out, "--out")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores / 2 and "OMP_NUM_THREADS" not in os.environ:
        # torch's threads wait at every op for one the other job has descheduled
        typer.echo(f"note: the machine is busy (1-minute load {load:.1f} on {cores} cores); "
                   "OMP_NUM_THREADS=1 runs faster beside other jobs", err=True)
    summary = run_quickstart(out, fast=fast, seed=seed, progress=not json_out, bf16=bf16)
    if json_out:
        echo_json(summary, indent=2)
        return
    failed = [c for c in summary["claims"] if not c["holds"]]
    typer.echo(f"claims: {len(summary['claims']) - len(failed)} of {len(summary['claims'])} "
               "hold" + (" (--fast: not expected to)" if fast and failed else ""))
    for c in failed:
        typer.echo(f"  did not hold: {c['claim']} ({c['evidence']})")
    typer.echo(f"report: {summary['report']}")


def plugin_options_help(kind: str, specs: dict) -> str | None:
    """A help epilog listing each plugin's extra options (they follow --{kind} NAME); a
    plugin whose options fail to load (a broken ``Lazy``) says so in its block."""
    blocks = []
    for name, spec in sorted(specs.items()):
        try:
            options = spec.options
        except PluginError as exc:
            blocks.append(f"{kind} {name}: {_one_line(str(exc))}")
            continue
        if options:
            blocks.append(f"{kind} {name}: " + "; ".join(describe_options(options).splitlines()))
    return "\n\n".join(blocks) or None


def _command_names(app: typer.Typer) -> list[str | None]:
    """The top-level names a typer app registers (None: a group without a name)."""
    names: list[str | None] = []
    for info in app.registered_commands:
        callback = info.callback
        names.append(info.name or (typer.main.get_command_name(callback.__name__)
                                   if callback else None))
    for group in app.registered_groups:
        names.append(group.name or group.typer_instance.info.name or None)
    return names


def _add_plugin_commands(app: typer.Typer) -> None:
    """Each plugin adds its commands to an app of its own, merged in only when all its names
    are free, so one broken or colliding plugin costs only its own commands."""
    owners: dict[str, str] = {name: CORE_NAME for name in CORE_COMMANDS}
    failed = {name for name, _ in get_registry().failures}  # left out whole, commands too
    for impl in get_manager().hook.guidekit_commands.get_hookimpls():
        plugin = impl.plugin_name
        if plugin in failed:
            continue
        own = typer.Typer()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                impl.function(cli=own)
            names = _command_names(own)
            if None in names:
                raise GuidekitError("it added a command group without a name: give "
                                    "cli.add_typer(..., name=NAME)")
            taken = [n for n in names if n in owners]
            if taken:
                owner = owners[taken[0]]
                whose = "guidekit's own" if owner == CORE_NAME else f"plugin '{owner}''s"
                raise GuidekitError(f"command '{taken[0]}' is already {whose}: rename it in "
                                    "the plugin")
        except (Exception, SystemExit) as exc:
            reason = str(exc) if isinstance(exc, GuidekitError) else (
                f"{type(exc).__name__}: {exc}".splitlines()[0])
            _say(f"guidekit: plugin '{plugin}' could not add its commands: {reason}")
            continue
        owners.update(dict.fromkeys(names, plugin))  # type: ignore[arg-type]
        app.registered_commands.extend(own.registered_commands)
        app.registered_groups.extend(own.registered_groups)


def _trainer_command(reg: Registry, name: str) -> Any:
    """The click command of ``guidekit train NAME``, built as typer builds a group's. A
    trainer whose options fail to load (a broken ``Lazy``) is still listed: running it says
    why in one line, and the other trainers work."""
    spec = reg.specs["trainer"][name]
    one = typer.Typer()
    try:
        takes_weighting = any(o.name == "weighting" for o in spec.options)
        command = make_trainer_command(spec, lambda w: reg.weighting(w).options)
    except PluginError as exc:
        error = exc

        def command(ctx: typer.Context) -> None:
            raise error

        one.command(name, help=spec.help, context_settings=EXTRA_ARGS,
                    add_help_option=False)(command)
    else:
        one.command(name, help=spec.help, context_settings=EXTRA_ARGS,
                    epilog=plugin_options_help("weighting", reg.specs["weighting"])
                    if takes_weighting else None)(command)
    return typer.main.get_group(one).commands[name]


def build_app() -> typer.Typer:
    """The CLI with every registered trainer and plugin command."""
    app = typer.Typer(
        name="guidekit", help=f"guidekit {__version__}: guided diffusion with plugins.",
        no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    )
    reg = get_registry()
    # A trainer's command, and the plugin options in the help of `sample` and the trainers,
    # are built when that command runs or shows its help: a spec's options may be Lazy (beside
    # torch code), and `guidekit --help` must not load them.
    trainers = lazy_group_class(lambda _: LazyCommands(
        lambda: sorted(reg.specs["trainer"]), lambda name: _trainer_command(reg, name)))
    train = typer.Typer(cls=trainers, help="Train a model: `guidekit train NAME --help`.",
                        no_args_is_help=True)
    app.add_typer(train, name="train")
    app.command("sample", context_settings=EXTRA_ARGS, cls=epilog_command_class(
        lambda: plugin_options_help("guidance", reg.specs["guidance"])))(sample_command)
    app.command("plugins")(plugins_command)
    app.command("quickstart")(quickstart_command)
    register_convert(app)
    _add_plugin_commands(app)
    return app


# What to do about an OSError, by errno; the rest get _OS_HINT.
_OS_HINTS = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check the path's permissions, or write elsewhere",
    errno.EPERM: "check the path's permissions, or write elsewhere",
    errno.EISDIR: "give a file name, not a folder",
    errno.ENOTDIR: "a file stands where a folder is needed: choose another path",
    errno.EEXIST: "something already stands there: choose another path or move it",
    errno.ENOSPC: "free disk space, or write elsewhere",
    getattr(errno, "EDQUOT", errno.ENOSPC): "free disk space (or quota), or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENAMETOOLONG: "use a shorter path",
}
_OS_HINT = "check the path and its permissions, or free disk space"


def _os_error(exc: OSError) -> str:
    """One line for an OSError: what failed, on which path, and what to do."""
    what = exc.strerror or _one_line(str(exc)) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    where = f": {' -> '.join(paths)}" if paths else ""
    return f"{what}{where}; {_OS_HINTS.get(exc.errno or 0, _OS_HINT)}"


def _show_click_error(exc: Exception) -> None:
    """click's usage errors as one plain line: printed by click (or typer's rich copy) they
    are several lines, and rich would read ':a:' or '[bold]' in the value as markup."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, not a mistake
        exc.show()  # type: ignore[attr-defined]
        return
    ctx = getattr(exc, "ctx", None)
    see = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    _say(f"error: {_one_line(exc.format_message())}{see}")  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    """Entry point: a user mistake becomes one line on stderr and exit status 2 (an
    :class:`~guidekit.errors.Interrupted` run: its own status, 130 or 143)."""
    code: Any = 0
    try:
        reg = get_registry()
        for name, error in reg.failures:
            _say(f"guidekit: plugin '{name}' failed to load and was skipped: {error}")
        command = typer.main.get_command(build_app())
        code = command.main(args=argv, prog_name="guidekit", standalone_mode=False)
    except GuidekitError as exc:
        _say(f"error: {_one_line(str(exc))}")
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        code = exc.exit_code
    except _ClickException as exc:
        _show_click_error(exc)
        sys.exit(exc.exit_code)  # type: ignore[attr-defined]
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except OSError as exc:  # a full disk, a read-only folder, a file where a folder goes...
        _say(f"error: {_os_error(exc)}")
        sys.exit(2)
    if code == 130:
        _say("aborted")
    if isinstance(code, int) and code:
        sys.exit(code)
