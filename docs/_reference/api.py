"""The Python API reference: every name in ``guidekit.__all__`` (and in the ``__all__`` of
guidekit's own plugin packages) with its signature and docstring. The core's names are grouped
by the module that defines them."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from importlib import metadata
from typing import Any

from .markdown import Links, annotation, docstring, fields_table, inline, is_own_doc, signature

CORE = "guidekit"


def packages() -> list[str]:
    """The core, then each of guidekit's own plugin packages that declares ``__all__``."""
    from guidekit.plugins import ENTRY_POINT_GROUP

    from . import own_plugins

    eps = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    found = [CORE]
    for name in own_plugins():
        module = eps[name].value.split(":")[0]
        if hasattr(importlib.import_module(module), "__all__"):
            found.append(module)
    return found


def public(package: str) -> dict[str, Any]:
    """A package's ``__all__``: name -> object."""
    module = importlib.import_module(package)
    return {name: getattr(module, name) for name in module.__all__}


def anchor(package: str, name: str) -> str:
    """The core's names keep their bare name as anchor; a plugin's are qualified."""
    return name if package == CORE else f"{package}.{name}"


def home_module(name: str, obj: Any) -> str:
    """The module that defines ``obj``; for an instance, the module that assigns ``name``."""
    module = getattr(obj, "__module__", None)
    if (inspect.isclass(obj) or inspect.isfunction(obj)) and module:
        return module
    assigns = re.compile(rf"^{re.escape(name)}\s*[:=]", re.M)
    for mod_name, mod in sorted(sys.modules.items()):
        if not mod_name.startswith(f"{CORE}.") or getattr(mod, name, None) is not obj:
            continue
        try:
            if assigns.search(inspect.getsource(mod)):
                return mod_name
        except (OSError, TypeError):
            continue
    return CORE


def undocumented() -> list[str]:
    """Public callables and classes without a docstring of their own."""
    return [
        f"{package}.{name}"
        for package in packages()
        for name, obj in public(package).items()
        if (inspect.isclass(obj) or callable(obj)) and not is_own_doc(obj)
    ]


def _members(cls: type) -> list[tuple[str, Any]]:
    """Public methods and properties defined on ``cls`` itself (and ``__call__``)."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    out = []
    for name, value in vars(cls).items():
        if name in fields or (name.startswith("_") and name != "__call__"):
            continue
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        if isinstance(value, property) or inspect.isfunction(value):
            out.append((name, value))
    return out


def _member_section(owner: str, name: str, value: Any, links: Links) -> str:
    if isinstance(value, property):
        ret = inspect.signature(value.fget).return_annotation if value.fget else None
        kind = f": {annotation(ret)}" if ret not in (None, inspect.Signature.empty) else ""
        head = f"property {name}{kind}"
        doc = inspect.getdoc(value.fget) if value.fget else None
    else:
        head = signature(name, value, prefix="def ", skip_self=True)
        doc = inspect.getdoc(value)
    parts = [f"#### `{owner.rsplit('.', 1)[-1]}.{name}` {{ #{owner}.{name} }}",
             f"```python\n{head}\n```", docstring(doc, links)]
    return "\n\n".join(p for p in parts if p)


def object_section(name: str, obj: Any, links: Links, anchor_id: str | None = None) -> str:
    """One public name: heading, signature, docstring, fields and members."""
    anchor_id = anchor_id or name
    parts = [f"### `{name}` {{ #{anchor_id} }}"]
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            bases = ", ".join(b.__name__ for b in obj.__bases__)
            parts.append(f"```python\nclass {name}({bases})\n```")
        elif getattr(obj, "_is_protocol", False):
            parts.append(f"```python\nclass {name}(Protocol)\n```")
        else:
            parts.append(f"```python\n{signature(name, obj, prefix='class ')}\n```")
    elif inspect.isfunction(obj):
        parts.append(f"```python\n{signature(name, obj, prefix='def ')}\n```")
    elif callable(obj):
        parts.append(f"```python\n{name}: {type(obj).__module__}.{type(obj).__qualname__}\n```")
    else:
        parts.append(f"```python\n{name} = {obj!r}\n```")
    if inspect.isclass(obj) or callable(obj):
        parts.append(docstring(inspect.getdoc(obj) if is_own_doc(obj) else "", links))
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        parts.append(fields_table(obj, links))
    if inspect.isclass(obj):
        parts.extend(_member_section(anchor_id, m, v, links) for m, v in _members(obj))
    return "\n\n".join(p for p in parts if p)


def page_links(hooks_page: str = "hooks.md") -> dict[str, str]:
    """Public names link within the page (a plugin's by its qualified name, and by its bare
    name where no other package uses it); hook names link to the hook reference."""
    from guidekit import hookspecs

    links: dict[str, str] = {}
    for package in reversed(packages()):  # the core's bare names win
        for name in public(package):
            links[f"{package}.{name}"] = f"#{anchor(package, name)}"
            links[name] = f"#{anchor(package, name)}"
    links.update({n: f"{hooks_page}#{n}" for n in vars(hookspecs) if n.startswith("guidekit_")})
    return links


def _summary(module_name: str) -> str:
    mod = sys.modules.get(module_name) or importlib.import_module(module_name)
    return (inspect.getdoc(mod) or "").split("\n\n")[0].replace("\n", " ")


def api_markdown(links: Links | None = None) -> str:
    """The API page body: the core by defining module, then each plugin package."""
    links = links if links is not None else page_links()
    parts = []
    core: dict[str, list[str]] = {}
    names = public(CORE)
    for name, obj in names.items():
        core.setdefault(home_module(name, obj), []).append(name)
    for module in sorted(core):
        parts.append(f"## `{module}`")
        parts.append(inline(_summary(module), links))
        parts.extend(object_section(n, names[n], links) for n in core[module])
    for package in packages()[1:]:
        parts.append(f"## `{package}` (plugin)")
        parts.append(inline(_summary(package), links))
        parts.extend(object_section(n, obj, links, anchor(package, n))
                     for n, obj in public(package).items())
    return "\n\n".join(p for p in parts if p) + "\n"
