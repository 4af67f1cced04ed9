"""The CLI reference: every command of ``guidekit`` with its help, usage and options, read from
the command tree that typer builds (so it cannot drift from ``--help``), and the options that
guidance and weighting plugins declare, read from their guidekit ``Option`` declarations.

The command objects are click's, and typer >= 0.26 builds them with a private copy of click,
so this module never imports click: it reads the objects by their attributes alone."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from typing import Any

from .markdown import escape, inline

_BRACKETS = re.compile(r"\s*\[(default: .*?|required)\]")
# typer >= 0.26 writes metavars as <str>, <list[int]>, ...; click as TEXT, INTEGER, ...: the
# reference spells them click's way, so it reads the same whichever typer built the tree
_TYPER_METAVAR = re.compile(r"<(?:list\[)?(\w+)\]?>")
_CLICK_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH"}


def _metavar(names: str) -> str:
    return _TYPER_METAVAR.sub(lambda m: _CLICK_NAMES.get(m.group(1), m.group(1).upper()), names)


def current_command() -> Any:
    """The ``guidekit`` command group with the plugins loaded now, as ``guidekit`` itself
    builds it (``typer.main.get_command(build_app())``). A plugin whose commands fail to load
    is an error: the reference would lack them."""
    import typer

    from guidekit.cli import build_app

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):  # where build_app reports a failing plugin
        command = typer.main.get_command(build_app())
    if stderr.getvalue().strip():
        raise RuntimeError(f"the CLI did not build cleanly: {stderr.getvalue().strip()}")
    return command


def builtin_command() -> Any:
    """The ``guidekit`` command group with the core and guidekit's own plugins."""
    from . import builtin_plugins

    with builtin_plugins():
        return current_command()


def walk(command: Any, path: tuple[str, ...] = ("guidekit",),
         parent: Any = None) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """(path, command, context) of ``command`` and every visible subcommand, depth first, in
    the order ``--help`` lists them."""
    ctx = command.make_context(path[-1], [], parent=parent, resilient_parsing=True)
    yield path, command, ctx
    names = command.list_commands(ctx) if hasattr(command, "list_commands") else []
    for name in names:
        sub = command.get_command(ctx, name)
        if sub is not None and not sub.hidden:
            yield from walk(sub, (*path, name), ctx)


def anchor(path: tuple[str, ...]) -> str:
    return "-".join(path)


def help_markdown(text: str | None) -> str:
    """Click help text as Markdown paragraphs (``\\f`` cuts it, ``\\b`` lines are markers)."""
    text = (text or "").split("\f")[0]
    paragraphs = re.split(r"\n\s*\n", text.strip())
    out = []
    for para in paragraphs:
        lines = [ln.strip() for ln in para.splitlines() if ln.strip() != "\b"]
        if lines:
            out.append(inline(" ".join(lines)))
    return "\n\n".join(out)


def _first_line(text: str | None) -> str:
    text = (text or "").split("\f")[0].strip()
    return text.split("\n\n")[0].replace("\n", " ")


def options_table(command: Any, ctx: Any) -> str:
    """A Markdown table of the command's options and arguments, as ``--help`` shows them."""
    rows = []
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False) or "--help" in getattr(param, "opts", ()):
            continue
        record = param.get_help_record(ctx)
        if record is None:  # click arguments have no help record
            record = (param.human_readable_name, getattr(param, "help", None) or "")
        names, text = record
        names = _metavar(names)
        extras = _BRACKETS.findall(text)
        text = _BRACKETS.sub("", text).strip()
        default = next((e[len("default: "):] for e in extras if e.startswith("default")), "")
        if "required" in extras:
            default = "required"
        default = f"`{default}`" if default and default != "required" else default
        rows.append(f"| `{names}` | {inline(text)} | {default} |")
    if not rows:
        return ""
    return "| option | description | default |\n| --- | --- | --- |\n" + "\n".join(rows)


def command_markdown(path: tuple[str, ...], command: Any, ctx: Any, registry: Any = None) -> str:
    """One command's section: heading, help, usage, subcommands or options, plugin options."""
    name = " ".join(path)
    parts = [f"## `{name}` {{ #{anchor(path)} }}", help_markdown(command.help)]
    usage = " ".join([name, *command.collect_usage_pieces(ctx)])
    parts.append(f"```text\n{usage}\n```")
    subs = getattr(command, "commands", None)
    if subs:
        items = [
            f"- [`{name} {sub}`](#{anchor((*path, sub))}): {inline(_first_line(cmd.help))}"
            for sub, cmd in ((s, command.get_command(ctx, s)) for s in command.list_commands(ctx))
            if cmd is not None and not cmd.hidden
        ]
        parts.append("Commands:\n\n" + "\n".join(items))
    table = options_table(command, ctx)
    if table:
        parts.append(table)
    if command.epilog:
        parts.append(epilog_markdown(command.epilog, registry))
    return "\n\n".join(p for p in parts if p)


def epilog_markdown(epilog: str, registry: Any = None) -> str:
    """The plugins' options that a command's help lists after its own: links to their tables
    (``guidance NAME: ...`` blocks, as guidekit's CLI writes them), or the text itself."""
    blocks = [" ".join(b.split()) for b in epilog.split("\n\n") if b.strip()]
    items = []
    for block in blocks:
        m = re.match(r"(guidance|weighting) ([\w-]+): ", block)
        if registry is not None and m and m.group(2) in registry.specs[m.group(1)]:
            kind, name = m.groups()
            items.append(f"- [`--{kind} {name}`](#{kind}-{name})")
        else:
            items.append(f"- {escape(block)}")
    return ("Plugins add options to this command; each follows the `--guidance` or "
            "`--weighting` that selects its plugin:\n\n" + "\n".join(items))


# how the plugin-option tables name each guidekit Option type (`Option.type`)
_TYPE_NAMES = {"str": "text", "int": "integer", "float": "number", "bool": "flag",
               "Path": "path"}


def option_row(opt: Any) -> str:
    """One guidekit ``Option`` declaration as a table row: flag, type (or its choices),
    default and help (read by attribute, so any declaration of that shape renders)."""
    flag = f"`{opt.flag}`/`--no-{opt.flag[2:]}`" if opt.is_flag else f"`{opt.flag}`"
    kind = _TYPE_NAMES.get(opt.type.__name__, opt.type.__name__)
    if opt.choices:
        kind = "one of " + ", ".join(f"`{c}`" for c in opt.choices)
    if opt.multiple:
        kind += ", repeatable"
    if opt.required:
        default = "required"
    elif opt.default in (None, ()) or (opt.is_flag and opt.default is False):
        default = ""
    else:
        values = opt.default if opt.multiple else (opt.default,)
        default = "`" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v)
                                  for v in values) + "`"
    return f"| {flag} | {kind} | {default} | {inline(opt.help)} |"


def declared_options_table(options: Any) -> str:
    """A Markdown table of guidekit ``Option`` declarations (a plugin's ``spec.options``)."""
    rows = [option_row(opt) for opt in options]
    return "| option | type | default | description |\n| --- | --- | --- | --- |\n" + "\n".join(
        rows)


def plugin_options_markdown(registry: Any) -> str:
    """Tables of the options each guidance and weighting plugin declares (``spec.options``)."""
    parts = ["## Plugin options { #plugin-options }",
             "A guidance or weighting may declare options of its own. They go after the "
             "`--guidance NAME` (of `guidekit sample`) or `--weighting NAME` (of a trainer) "
             "that selects it."]
    for kind, flag in (("guidance", "--guidance"), ("weighting", "--weighting")):
        for spec_name, spec in sorted(registry.specs[kind].items()):
            parts.append(f"### `{flag} {spec_name}` {{ #{kind}-{spec_name} }}")
            parts.append(inline(spec.help) or "")
            if not spec.options:
                parts.append("No options of its own.")
                continue
            parts.append(declared_options_table(spec.options))
    return "\n\n".join(p for p in parts if p)


def cli_markdown(command: Any, registry: Any = None) -> str:
    """The whole reference: a section per command, then the plugins' options."""
    sections = [command_markdown(path, cmd, ctx, registry) for path, cmd, ctx in walk(command)]
    if registry is not None:
        sections.append(plugin_options_markdown(registry))
    return "\n\n".join(sections) + "\n"


def builtin_cli_markdown() -> str:
    """The CLI reference of guidekit with its own plugins."""
    from . import builtin_plugins

    with builtin_plugins() as registry:
        return cli_markdown(current_command(), registry)
