"""What CLI commands share, the core's and plugins': the ``--device`` and ``--json``
parameters, guidekit :class:`~guidekit.options.Option` declarations turned into typer
parameters, trainer commands, guidance requests from the command line, scale lists,
printing a result once, as valid JSON or as literal text, and command groups that load
their module on first use (:func:`lazy_group`).
"""

from __future__ import annotations

import inspect
import json
import keyword
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from guidekit.cli.lazy import LazyCommands, lazy_group_class
from guidekit.distributed import DEFAULT_DEVICE, is_main_process
from guidekit.errors import GuidekitError, PluginError
from guidekit.options import Option, parse_option_args, resolve_options
from guidekit.specs import Lazy, StepReport, TrainerContext, TrainerSpec

__all__ = [
    "DEFAULT_DEVICE",
    "EXTRA_ARGS",
    "ClassPerRow",
    "Classes",
    "Clip",
    "ClipOrder",
    "Device",
    "Eta",
    "GuidanceSchedules",
    "Guidances",
    "JSONOut",
    "Respacing",
    "SampleSteps",
    "SamplerName",
    "Scales",
    "Spacing",
    "Variance",
    "echo_json",
    "json_safe",
    "lazy_group",
    "parse_scales",
    "plain_console",
    "report",
    "requests_from_cli",
    "trainer_command",
    "typer_parameters",
]

# Commands whose plugin options (after --guidance NAME, --weighting NAME) arrive in ctx.args.
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}

Device = Annotated[str, typer.Option(
    help="cpu, cuda, cuda:N, or auto (a GPU when there is one, else cpu).")]
JSONOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]

# The sampling parameters of every command that samples a DPM the way `guidekit sample`
# does (defaults go in the signature: "ddim", 50, None, None, 0.0, None, None,
# "clip-then-guide", (), False, (), (), ()).
SamplerName = Annotated[str, typer.Option(help="ddim or ddpm.")]
SampleSteps = Annotated[int, typer.Option(
    help="Sampling steps (respaced from the T training steps).")]
Spacing = Annotated[Optional[str], typer.Option(  # noqa: UP045 -- typer reads the annotation
    help="Where --steps go: leading, linspace or trailing (diffusers' names). Default: the "
    "checkpoint's (a converted diffusers model: its scheduler's), else leading for ddim, "
    "linspace for ddpm.")]
Respacing = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="Explicit respacing, e.g. 'ddim25' or '10,5'.")]
Eta = Annotated[float, typer.Option(help="DDIM η (0: deterministic).")]
Variance = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="DDPM Σ when fixed: small (β̃) or large (β). Default: the checkpoint's, else small.")]
Clip = Annotated[Optional[bool], typer.Option(  # noqa: UP045
    "--clip/--no-clip", help="Clip x̂_0 to [-1, 1] in each step. Default: the checkpoint's "
    "(a converted diffusers model: its clip_sample), else on.")]
ClipOrder = Annotated[str, typer.Option(
    help="Guided DDIM with --clip: clip-then-guide (guided-diffusion's order, the published "
    "results') or guide-then-clip.")]
Classes = Annotated[list[int], typer.Option(
    "--class", help="Class of every sample (repeat to cycle): conditions a class-conditional "
    "DPM and steers class guidances.")]
ClassPerRow = Annotated[bool, typer.Option(
    "--class-per-row", help="Class r for the r-th block of n / num_classes samples.")]
Guidances = Annotated[list[str], typer.Option(
    "--guidance", help="Guidance plugin name (repeatable).")]
Scales = Annotated[list[float], typer.Option(
    "--scale", help="Guidance scale (one, or one per --guidance).")]
GuidanceSchedules = Annotated[list[str], typer.Option(
    "--guidance-schedule", help="When guidance is on: constant, snr:LO:HI or t:LO:HI.")]


def _param_name(name: str) -> str:
    return f"{name}_" if keyword.iskeyword(name) else name


def typer_parameters(options: Sequence[Option]) -> list[inspect.Parameter]:
    """typer parameters (keyword-only, ``Annotated``) of guidekit option declarations."""
    params = []
    for opt in options:
        kind: Any = opt.type
        if opt.multiple:
            kind = list[opt.type]  # type: ignore[name-defined]
        elif opt.default is None and not opt.is_flag:
            kind = Optional[opt.type]  # noqa: UP045 (typer reads typing.Optional everywhere)
        flags = [f"{opt.flag}/--no-{opt.flag[2:]}"] if opt.is_flag else [opt.flag]
        help_text = opt.help
        if opt.choices:
            help_text = f"{help_text.rstrip('.')} (one of: {', '.join(opt.choices)})."
        default: Any = ... if opt.required else (
            list(opt.default) if opt.multiple else opt.default)
        params.append(inspect.Parameter(
            _param_name(opt.name), inspect.Parameter.KEYWORD_ONLY, default=default,
            annotation=Annotated[kind, typer.Option(*flags, help=help_text)],
        ))
    return params


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) replaced by None, recursively in
    dicts, lists and tuples, numpy/torch values as Python numbers and paths as strings:
    what strict JSON can hold (json.dumps would write NaN, which JSON parsers refuse)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and hasattr(value, "ndim"):  # numpy or torch, any shape
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def echo_json(value: Any, indent: int | None = None) -> None:
    """Print ``value`` as strict JSON on stdout (see :func:`json_safe`): every ``--json``."""
    # default=str: an odd value a plugin reports is shown, not a traceback
    typer.echo(json.dumps(json_safe(value), indent=indent, allow_nan=False, default=str))


def plain_console(stderr: bool = False) -> Console:
    """A console that prints text as given: no markup (``[bold]``), no emoji codes
    (``:a:``), no highlighting; errors and results hold paths and user text."""
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False)


def report(result: StepReport | dict[str, Any], json_out: bool) -> None:
    """Print a command's result once (on the main process): its figures as JSON with
    ``--json``; else its tables, its text and its title, for a person."""
    if not is_main_process():
        return
    report_ = result if isinstance(result, StepReport) else StepReport("", metrics=result)
    if json_out:
        echo_json(report_.metrics)
        return
    console = plain_console()
    for title, rows in report_.tables.items():
        # Text cells stay literal whatever console prints the table
        table = Table(*(Column(Text(str(k))) for k in (rows[0] if rows else ())),
                      title=Text(title))
        for row in rows:
            table.add_row(*(Text(str(v)) for v in row.values()))
        console.print(table)
    for line in [*report_.text.splitlines(), report_.title]:
        if line:
            console.print(line, highlight=False, markup=False, emoji=False, soft_wrap=True)


def trainer_command(spec: TrainerSpec, weighting: Callable[[str], Sequence[Option]]) -> Callable:
    """The typer command of a trainer: its options as parameters, plus ``--json``, plus the
    options of the chosen ``--weighting`` (``weighting(name)`` gives them) when it declares a
    ``weighting`` option."""
    takes_weighting = any(o.name == "weighting" for o in spec.options)

    def command(ctx: typer.Context, **values: Any) -> None:
        json_out = values.pop("json_out")
        values = {o.name: values[_param_name(o.name)] for o in spec.options}
        weighting_values: dict[str, Any] = {}
        if takes_weighting:
            name = values["weighting"]
            what = f"weighting '{name}'"
            own = weighting(name)
            (given,) = parse_option_args([(what, own)], ctx.args)
            weighting_values = resolve_options(own, given, what)
        elif ctx.args:
            raise GuidekitError(f"unexpected argument(s): {' '.join(ctx.args)}")
        options = resolve_options(spec.options, values, f"trainer '{spec.name}'")
        if isinstance(options.get("out"), Path):  # the checkpoint folder: fail before training
            from guidekit.data import check_output_dir

            check_output_dir(options["out"], "--out")
        result = spec.train(TrainerContext(options, weighting_values, progress=not json_out))
        report(result, json_out)

    ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                  annotation=typer.Context)
    json_param = inspect.Parameter("json_out", inspect.Parameter.KEYWORD_ONLY, default=False,
                                   annotation=JSONOut)
    params = [ctx_param, *typer_parameters(spec.options), json_param]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = inspect.getdoc(spec.train) or spec.help
    command.__name__ = spec.name.replace("-", "_")
    return command


def requests_from_cli(
    names: Sequence[str], scales: Sequence[float], schedules: Sequence[str],
    args: Sequence[str], options: Callable[[str], Sequence[Option]],
) -> list:
    """Pair repeated --guidance/--scale/--guidance-schedule flags and parse each guidance's
    plugin options from ``args`` (``options(name)`` gives a guidance's declarations).

    One --scale (or schedule) applies to every guidance; otherwise give one per guidance.
    """
    from guidekit.sampling import GuidanceRequest

    names = list(names)
    if not names:
        if scales or schedules:
            raise GuidekitError("--scale/--guidance-schedule need a --guidance NAME")
        if args:
            raise GuidekitError(f"unexpected argument(s): {' '.join(args)}")
        return []
    scale_list = _per_guidance(list(scales) or [1.0], len(names), "--scale")
    schedule_list = _per_guidance(list(schedules) or ["constant"], len(names),
                                  "--guidance-schedule")
    owners = [(f"guidance '{n}'", options(n)) for n in names]
    given = parse_option_args(owners, args)
    return [
        GuidanceRequest(n, sc, sh, values)
        for n, sc, sh, values in zip(names, scale_list, schedule_list, given, strict=True)
    ]


def _per_guidance(values: list, n: int, flag: str) -> list:
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise GuidekitError(f"give one {flag} for all guidances or one per guidance ({n})")
    return values


def parse_scales(text: str, flag: str = "--scales") -> list[float]:
    """The one reading of a scale list: ``"0,1,2.5"`` → ``[0.0, 1.0, 2.5]`` (finite numbers,
    at least one); anything else is a one-line error naming ``flag``."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise GuidekitError(f"{flag} must be comma-separated finite numbers like 0,1,2,4, "
                            f"got '{text}'")
    return values


def lazy_group(target: str, help: str) -> typer.Typer:
    """A command group for ``cli.add_typer(lazy_group(...), name=NAME)`` in a plugin's
    ``guidekit_commands``, whose commands are those of the ``typer.Typer`` at ``target``
    (``"module:attribute"``), imported only when the group runs or lists its commands.
    ``guidekit --help`` shows NAME with ``help`` without importing that module, so a command
    module that needs torch to declare its options keeps the CLI's start fast.

    The group is ``help`` with the target's commands and groups: the target's own help,
    callback and settings are not used (a bare ``guidekit NAME`` prints the group's help).
    A target that fails to load is a one-line :class:`~guidekit.errors.PluginError`.
    """
    ref = Lazy(target)  # a malformed target fails here, in the plugin's hook

    def commands(name: str) -> LazyCommands:
        loaded: list[Any] = []

        def group() -> Any:
            if not loaded:
                try:
                    loaded.append(typer.main.get_group(ref.load()))
                except (Exception, SystemExit) as exc:
                    reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                    raise PluginError(
                        f"the '{name}' commands ({target}) failed to load: {reason}; the "
                        "plugin has a bug: report it to its authors or uninstall it") from None
            return loaded[0]

        return LazyCommands(lambda: list(group().commands), lambda n: group().commands[n])

    return typer.Typer(cls=lazy_group_class(commands), help=help, no_args_is_help=True)
