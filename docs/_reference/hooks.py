"""The hook reference: each hook of :mod:`guidekit.hookspecs` with its signature and docstring,
the spec dataclasses that hooks return (:mod:`guidekit.specs`), what a guidance receives, and
the pytest fixtures for plugin authors (:mod:`guidekit.pytest_plugin`).

The fixtures are read from the pytest plugin's source, never imported: importing it imports
pytest, which the ``docs`` extra does not install."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .markdown import (
    WIDTH,
    Links,
    docstring,
    escape,
    fields_table,
    inline,
    is_own_doc,
    signature,
)

API_PAGE = "python.md"  # where the names of guidekit.__all__ are documented
PYTEST_PLUGIN = "guidekit.pytest_plugin"
RESULT_CLASS = "CliResult"  # the dataclass the guidekit_cli fixture returns
_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", re.M)  # as markdown.py reads


def hook_functions() -> dict[str, Callable[..., Any]]:
    """Every hook specification, by name, in source order."""
    from guidekit import hookspecs

    marker = f"{hookspecs.PROJECT}_spec"  # the attribute pluggy's HookspecMarker sets
    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if inspect.isfunction(fn) and hasattr(fn, marker)
    }


def spec_classes() -> list[type]:
    """The dataclasses of :mod:`guidekit.specs`, in source order."""
    from guidekit import specs

    return [obj for obj in vars(specs).values()
            if inspect.isclass(obj) and dataclasses.is_dataclass(obj)
            and obj.__module__ == specs.__name__]


def guidance_classes() -> list[type]:
    """What a guidance's callable receives and is: StepInput and the Guidance protocol."""
    from guidekit.guidance import Guidance, StepInput

    return [StepInput, Guidance]


def plugin_source() -> str:
    """The source of :mod:`guidekit.pytest_plugin`, read from its file without importing it."""
    spec = importlib.util.find_spec(PYTEST_PLUGIN)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{PYTEST_PLUGIN} is not installed, so the fixtures are undocumented")
    return Path(spec.origin).read_text(encoding="utf-8")


def fixtures(source: str) -> list[dict[str, Any]]:
    """The ``@pytest.fixture`` functions of a module's ``source``: name, scope, return
    annotation, doc. Read from the source rather than from pytest's wrappers, whose shape
    changes between pytest versions."""
    tree = ast.parse(source)
    found = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            call = deco if isinstance(deco, ast.Call) else None
            target = call.func if call else deco
            if ast.unparse(target) not in ("pytest.fixture", "fixture"):
                continue
            scope = "function"
            for kw in call.keywords if call else []:
                if kw.arg == "scope" and isinstance(kw.value, ast.Constant):
                    scope = kw.value.value
            found.append({
                "name": node.name,
                "scope": scope,
                "value": _fixture_value(node.returns),
                "doc": ast.get_docstring(node) or "",
            })
    return found


def _fixture_value(returns: ast.expr | None) -> str:
    """What a test receives: the annotation, or what a generator fixture yields."""
    if returns is None:
        return ""
    if (isinstance(returns, ast.Subscript)
            and ast.unparse(returns.value) in ("Iterator", "Generator", "Iterable")):
        inner = returns.slice
        return ast.unparse(inner.elts[0] if isinstance(inner, ast.Tuple) else inner)
    return ast.unparse(returns)


def _class_section(cls: type, links: Links, level: str = "###") -> str:
    parts = [f"{level} `{cls.__name__}` {{ #{cls.__name__} }}"]
    if dataclasses.is_dataclass(cls):
        parts.append(f"```python\n{signature(cls.__name__, cls, prefix='class ')}\n```")
    else:
        parts.append(f"```python\nclass {cls.__name__}(Protocol)\n```")
        call = vars(cls).get("__call__")
        if call is not None:
            parts.append(f"```python\n{signature('__call__', call, prefix='def ')}\n```")
    parts.append(docstring(inspect.getdoc(cls) if is_own_doc(cls) else "", links))
    if dataclasses.is_dataclass(cls):
        parts.append(fields_table(cls, links))
    return "\n\n".join(p for p in parts if p)


def source_dataclass_section(source: str, name: str, links: Links) -> str:
    """Dataclass ``name`` of a module's ``source``, laid out as :func:`_class_section` lays
    out an imported one: signature, docstring, and its fields (type, default, comment)."""
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.ClassDef) and n.name == name)
    comments = dict(_FIELD_COMMENT.findall(ast.get_source_segment(source, node) or ""))
    params, rows = [], ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        field, kind = stmt.target.id, ast.unparse(stmt.annotation)
        default = None if stmt.value is None else ast.unparse(stmt.value)
        params.append(f"{field}: {kind}" + ("" if default is None else f" = {default}"))
        shown = "required" if default is None else f"`{default}`"
        rows.append(f"| `{field}` | `{kind}` | {shown} | "
                    f"{inline(comments.get(field, ''), links)} |")
    sig = f"class {name}({', '.join(params)})"
    if len(sig) > WIDTH:
        sig = f"class {name}(\n" + "".join(f"    {p},\n" for p in params) + ")"
    parts = [f"### `{name}` {{ #{name} }}", f"```python\n{sig}\n```",
             docstring(ast.get_docstring(node) or "", links), "\n".join(rows)]
    return "\n\n".join(p for p in parts if p)


def _implementers(name: str) -> list[str]:
    """The plugins (with their modules) that implement hook ``name`` right now."""
    from guidekit.plugins import get_manager, get_registry

    modules = {p.name: p.module for p in get_registry().plugins}
    impls = getattr(get_manager().hook, name).get_hookimpls()
    return [f"`{i.plugin_name}` (`{modules.get(i.plugin_name, '?')}`)" for i in impls]


def hook_section(name: str, fn: Callable[..., Any], links: Links,
                 implementers: list[str] | None = None) -> str:
    """One hook: its signature as an implementation would write it, docstring, implementers."""
    sig = signature(name, fn, prefix="@hookimpl\ndef ")
    parts = [f"### `{name}` {{ #{name} }}", f"```python\n{sig}\n```",
             docstring(inspect.getdoc(fn), links)]
    if implementers:
        parts.append("Implemented in guidekit by: " + ", ".join(implementers) + ".")
    return "\n\n".join(p for p in parts if p)


def page_links(api_names: list[str], api_page: str = API_PAGE) -> dict[str, str]:
    """Names this page documents link to their anchor; other public names to the API page."""
    links = {n: f"{api_page}#{n}" for n in api_names}
    local = [*hook_functions(), *(c.__name__ for c in spec_classes()),
             *(c.__name__ for c in guidance_classes()),
             *(f["name"] for f in fixtures(plugin_source())), RESULT_CLASS]
    links.update({n: f"#{n}" for n in local})
    return links


def hooks_markdown(links: Links | None = None, with_implementers: bool = True) -> str:
    """The whole hook reference page body."""
    import guidekit
    from guidekit import hookspecs

    plugin = plugin_source()

    links = links if links is not None else page_links(list(guidekit.__all__))
    hooks = hook_functions()
    # the module's summary line is for readers of the source; the page has its own title
    intro = (inspect.getdoc(hookspecs) or "").split("\n\n", 1)[-1]
    parts = [docstring(intro, links), "## Hooks"]
    parts.append("\n".join(
        f"- [`{n}`](#{n}): {inline(inspect.getdoc(fn).splitlines()[0], links)}"
        for n, fn in hooks.items()
    ))
    for name, fn in hooks.items():
        parts.append(hook_section(name, fn, links,
                                  _implementers(name) if with_implementers else None))
    parts.append("## What hooks return")
    parts.extend(_class_section(cls, links) for cls in spec_classes())
    parts.append("## What a guidance receives")
    parts.extend(_class_section(cls, links) for cls in guidance_classes())
    parts.append("## Test fixtures for plugins { #fixtures }")
    parts.append(docstring(ast.get_docstring(ast.parse(plugin)), links))
    for fx in fixtures(plugin):
        parts.append(f"### `{fx['name']}` {{ #{fx['name']} }}")
        value = f", value `{fx['value']}`" if fx["value"] else ""
        parts.append(f"Scope `{fx['scope']}`{escape(value)}.")
        parts.append(docstring(fx["doc"], links))
    parts.append(source_dataclass_section(plugin, RESULT_CLASS, links))
    return "\n\n".join(p for p in parts if p) + "\n"


def builtin_hooks_markdown(api_names: list[str], api_page: str = API_PAGE) -> str:
    """The hook reference, naming guidekit's own plugins as the implementers."""
    from . import builtin_plugins

    with builtin_plugins():
        return hooks_markdown(page_links(api_names, api_page))
