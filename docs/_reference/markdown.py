"""Markdown from Python objects: escaped text, signatures, and docstrings written in the
project's style (reST inline markup, ``::`` literal blocks, Google-style ``Args:`` sections)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

# Characters that Python-Markdown would read as markup in prose (``|`` splits table cells).
_SPECIAL = re.compile(r"([\\*_\[\]|])")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")
_SECTION = re.compile(
    r"^(Args|Arguments|Parameters|Attributes|Raises|Returns|Yields|Examples?|Notes?):\s*$"
)
_LIST_SECTIONS = {"Args", "Arguments", "Parameters", "Attributes", "Raises"}
_ENTRY = re.compile(r"^(\*{0,2}[\w.]+)(?:\s*\(([^)]*)\))?:\s*(.*)$")
WIDTH = 88  # signatures longer than this go one parameter per line

Links = Mapping[str, str]  # a name as written in docstrings -> its URL


def escape(text: str) -> str:
    """``text`` as literal prose: markup characters escaped, except inside code spans."""
    out, pos = [], 0
    for m in _CODE_SPAN.finditer(text):
        out.append(_escape_plain(text[pos : m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_escape_plain(text[pos:]))
    return "".join(out)


def _escape_plain(text: str) -> str:
    text = _SPECIAL.sub(r"\\\1", text)
    return text.replace("<", "&lt;").replace(">", "&gt;")


def code(text: str, links: Links | None = None) -> str:
    """An inline code span, linked when ``links`` knows the name."""
    name = text.split("(")[0]
    span = f"`{text}`" if "`" not in text else f"`` {text} ``"
    target = (links or {}).get(name) or (links or {}).get(name.rsplit(".", 1)[-1])
    return f"[{span}]({target})" if target else span


def inline(text: str, links: Links | None = None) -> str:
    """One paragraph of docstring prose as Markdown: ``x`` and :role:`x` become code spans
    (linked when known), everything else is escaped."""
    text = re.sub(r"``(.+?)``", r"`\1`", text, flags=re.S)
    parts, pos = [], 0
    for m in _ROLE.finditer(text):
        parts.append(escape(text[pos : m.start()]))
        short, target = m.group(1), m.group(2)
        parts.append(code(target.rsplit(".", 1)[-1] if short else target, links))
        pos = m.end()
    parts.append(escape(text[pos:]))
    return "".join(parts)


def docstring(doc: str | None, links: Links | None = None) -> str:
    """A cleaned docstring as Markdown blocks."""
    if not doc:
        return ""
    lines = inspect.cleandoc(doc).splitlines()
    blocks: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        section = _SECTION.match(lines[i])
        if section:
            body, i = _indented(lines, i + 1)
            blocks.append(_section(section.group(1), body, links))
            continue
        if lines[i].lstrip().startswith(">>>"):
            para, i = _paragraph(lines, i)
            blocks.append(_fence(para, "pycon"))
            continue
        if lines[i].startswith((" ", "\t")):  # indented prose keeps its layout
            body, i = _indented(lines, i)
            blocks.append(_fence(body, "text"))
            continue
        para, i = _paragraph(lines, i)
        text = "\n".join(para)
        if text.rstrip().endswith("::"):
            lead = text.rstrip()[:-2].rstrip()
            if lead:
                blocks.append(inline(lead + ":", links))
            body, i = _indented(lines, i)
            blocks.append(_fence(body, _language(body)))
            continue
        blocks.append(_prose(para, links))
    return "\n\n".join(b for b in blocks if b)


def _prose(para: list[str], links: Links | None) -> str:
    """A paragraph, or a bulleted list whose items may wrap onto indented lines."""
    if not para[0].lstrip().startswith(("- ", "* ")):
        return inline(" ".join(ln.strip() for ln in para), links)
    items: list[str] = []
    for ln in para:
        stripped = ln.strip()
        if stripped.startswith(("- ", "* ")):
            items.append(stripped[2:])
        elif items:
            items[-1] += " " + stripped
    return "\n".join(f"- {inline(item, links)}" for item in items)


def _paragraph(lines: list[str], i: int) -> tuple[list[str], int]:
    start = i
    while i < len(lines) and lines[i].strip() and not _SECTION.match(lines[i]):
        i += 1
    return lines[start:i], i


def _indented(lines: list[str], i: int) -> tuple[list[str], int]:
    """The block of indented (or blank) lines from ``i``, dedented."""
    while i < len(lines) and not lines[i].strip():
        i += 1
    start = i
    while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
        i += 1
    body = textwrap.dedent("\n".join(lines[start:i])).strip("\n")
    return body.splitlines(), i


def _language(lines: list[str]) -> str:
    """The language of a literal block: TOML tables, shell commands, else Python."""
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    if first.startswith("["):
        return "toml"
    if first.startswith(("$ ", "pip ", "guidekit ", "pytest")):
        return "bash"
    return "python"


def _fence(lines: list[str], lang: str) -> str:
    body = "\n".join(lines).rstrip()
    return f"```{lang}\n{body}\n```" if body else ""


def _section(name: str, body: list[str], links: Links | None) -> str:
    title = {"Arguments": "Args", "Parameters": "Args", "Example": "Examples",
             "Note": "Notes"}.get(name, name)
    if title in _LIST_SECTIONS:
        items: list[list[str]] = []  # [head, description]
        for ln in body:
            m = _ENTRY.match(ln) if not ln.startswith((" ", "\t")) else None
            if m:
                kind = f" ({m.group(2)})" if m.group(2) else ""
                items.append([code(m.group(1), links) + escape(kind), m.group(3)])
            elif items:
                items[-1][1] += " " + ln.strip()
        rows = "\n".join(f"- {head}: {inline(text, links)}" for head, text in items)
        return f"**{title}**\n\n{rows}"
    if title == "Examples" and any(ln.lstrip().startswith(">>>") for ln in body):
        return f"**{title}**\n\n" + _fence(body, "pycon")
    return f"**{title}**\n\n" + docstring("\n".join(body), links)


def annotation(value: Any) -> str:
    """An annotation as source text (string annotations stay as written)."""
    if isinstance(value, str):
        return value
    return inspect.formatannotation(value)


def signature(name: str, obj: Callable[..., Any], *, prefix: str = "",
              skip_self: bool = False) -> str:
    """``prefix name(params) -> ret`` as source text, one parameter per line when long."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{prefix}{name}(...)"
    factories = _factories(obj)
    params, marker = [], None
    for p in sig.parameters.values():
        if skip_self and p.name in ("self", "cls") and not params:
            continue
        if p.kind is p.KEYWORD_ONLY and marker is None:
            params.append("*")
        marker = marker or p.kind is p.KEYWORD_ONLY or p.kind is p.VAR_POSITIONAL
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {annotation(p.annotation)}"
        if p.default is not p.empty:
            default = factories.get(p.name, repr(p.default))
            text += f" = {default}" if p.annotation is not p.empty else f"={default}"
        params.append(text)
    shown = sig.return_annotation is not sig.empty and not inspect.isclass(obj)
    ret = f" -> {annotation(sig.return_annotation)}" if shown else ""
    one_line = f"{prefix}{name}({', '.join(params)}){ret}"
    if len(one_line) <= WIDTH or not params:
        return one_line
    body = "".join(f"    {p},\n" for p in params)
    return f"{prefix}{name}(\n{body}){ret}"


def _factories(obj: Any) -> dict[str, str]:
    """Dataclass fields with a default factory, shown as the factory call."""
    if not (inspect.isclass(obj) and dataclasses.is_dataclass(obj)):
        return {}
    return {
        f.name: f"{getattr(f.default_factory, '__name__', 'factory')}()"
        for f in dataclasses.fields(obj)
        if f.default_factory is not dataclasses.MISSING
    }


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each annotated attribute in a class body."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", source, flags=re.M)
    return dict(found)


def fields_table(cls: type, links: Links | None = None) -> str:
    """A table of a dataclass's fields: name, type, default and the field's comment."""
    comments = field_comments(cls)
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f"`{f.default!r}`"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"`{getattr(f.default_factory, '__name__', 'factory')}()`"
        else:
            default = "required"
        rows.append(f"| `{f.name}` | `{annotation(f.type)}` | {default} | "
                    f"{inline(comments.get(f.name, ''), links)} |")
    return "\n".join(rows)


def is_own_doc(obj: Any) -> bool:
    """Whether ``obj`` has a docstring of its own, not dataclass's generated signature."""
    doc = inspect.getdoc(obj)
    if not doc:
        return False
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        return not doc.startswith(f"{obj.__name__}(")
    return True
