"""The documentation: every hook is documented to a standard and tested, the generated
references cover every hook, command and public name, the command lines and imports shown in
the pages exist, and the site builds with warnings as errors."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from guidekit import hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TESTS = Path(__file__).parent
# Pages whose command lines and snippets are checked here; the plugin-authoring guide under
# docs/guide/ shows commands of a package that is not installed everywhere.
PAGES = sorted(DOCS.glob("*.md"))
MIN_WORDS = 40


def hook_names() -> list[str]:
    marker = f"{hookspecs.PROJECT}_spec"
    return [n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, marker)]


HOOKS = hook_names()


@pytest.fixture(scope="module")
def ref() -> types.SimpleNamespace:
    """The docs generators (docs/_reference), imported the way the mkdocs hook imports them."""
    sys.path.insert(0, str(DOCS))
    try:
        modules = {m: importlib.import_module(f"_reference.{m}")
                   for m in ("api", "cli", "hooks", "markdown")}
        package = importlib.import_module("_reference")
    finally:
        sys.path.remove(str(DOCS))
    return types.SimpleNamespace(**modules, builtin_plugins=package.builtin_plugins)


# --------------------------------------------------------------------------- the hook rule


def example_of(doc: str) -> str | None:
    """The literal block (after a paragraph ending in ``::``) that implements the hook."""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if not line.rstrip().endswith("::"):
            continue
        block = []
        for ln in lines[i + 1:]:
            if ln.strip() and not ln.startswith((" ", "\t")):
                break
            block.append(ln)
        code = textwrap.dedent("\n".join(block)).strip("\n")
        if "@hookimpl" in code:
            return code
    return None


def returned_class(hook: str) -> str | None:
    """The spec class a hook returns a list of (``list[GuidanceSpec]`` -> GuidanceSpec)."""
    ret = inspect.signature(getattr(hookspecs, hook)).return_annotation
    m = re.fullmatch(r"list\[(\w+)\]", str(ret))
    return m.group(1) if m else None


def doc_problems(hook: str) -> list[str]:
    """What keeps a hook's docstring from being a reference a newcomer can work from.

    A summary line; at least MIN_WORDS words; what to return (for a hook returning a list:
    "Return" and the spec class; for one returning None: every parameter named as ``name``);
    and an example: a ``::`` literal block that parses and implements the hook with
    ``@hookimpl``.
    """
    fn = getattr(hookspecs, hook)
    doc = inspect.getdoc(fn) or ""
    problems = []
    summary = doc.split("\n\n")[0]
    if "\n" in summary or not summary.endswith("."):
        problems.append("the first line is not a one-line summary ending in '.'")
    if len(doc.split()) < MIN_WORDS:
        problems.append(f"{len(doc.split())} words; a reference needs at least {MIN_WORDS}")
    spec = returned_class(hook)
    if spec and not ("Return" in doc and spec in doc):
        problems.append(f"does not say to return a list of {spec}")
    if not spec:
        params = [p for p in inspect.signature(fn).parameters]
        problems += [f"does not describe its parameter ``{p}``" for p in params
                     if f"``{p}``" not in doc]
    example = example_of(doc)
    if example is None:
        problems.append("has no example (a '::' block with an @hookimpl implementation)")
    else:
        try:
            tree = ast.parse(example)
        except SyntaxError as exc:
            problems.append(f"its example does not parse: {exc}")
        else:
            defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == hook]
            if not defs or not any("hookimpl" in ast.unparse(d) for d in defs[0].decorator_list):
                problems.append(f"its example does not define @hookimpl def {hook}")
    return problems


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_docstring_is_a_complete_reference(hook):
    assert not doc_problems(hook), f"{hook}: " + "; ".join(doc_problems(hook))


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_example_registers_through_the_plugin_manager(hook, guidekit_plugins,
                                                                 monkeypatch):
    """Each docstring's example, loaded as a plugin, registers what it says it does."""
    from guidekit.plugins import KINDS

    example = example_of(inspect.getdoc(getattr(hookspecs, hook)) or "")
    if example is None:
        pytest.fail(f"{hook} has no example")
    name = f"gk_doc_example_{hook}"
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)  # before exec: dataclasses look it up
    exec(compile(example, f"<{hook} example>", "exec"), module.__dict__)
    registry = guidekit_plugins(name)
    if hook in KINDS:
        kind = KINDS[hook][0]
        owned = [n for (k, n), owner in registry.owners.items() if k == kind and owner == name]
        assert owned, f"the {hook} example registered no {kind}"
    else:
        import typer

        from guidekit.cli import build_app

        with_example = set(typer.main.get_command(build_app()).commands)
        guidekit_plugins("guidekit_p2")  # a plugin that adds no commands: the core's alone
        assert with_example - set(typer.main.get_command(build_app()).commands), (
            f"the {hook} example added no command")


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test_of_its_own(hook):
    """A test function named ``test_<hook>...`` somewhere in tests/."""
    names = {
        node.name
        for path in TESTS.glob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }
    assert any(n.startswith(f"test_{hook}") for n in names), f"no test named test_{hook}*"


# --------------------------------------------------------------------------- references


@pytest.fixture(scope="module")
def hooks_page(ref) -> str:
    return ref.hooks.builtin_hooks_markdown(list(ref.api.public("guidekit")))


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_in_the_hook_reference(hook, hooks_page, ref):
    fn = getattr(hookspecs, hook)
    assert f"### `{hook}` {{ #{hook} }}" in hooks_page
    assert f"def {hook}(" in hooks_page
    links = ref.hooks.page_links(list(ref.api.public("guidekit")))
    assert ref.markdown.docstring(inspect.getdoc(fn), links) in hooks_page


def test_hook_reference_documents_specs_and_fixtures(hooks_page):
    from guidekit import pytest_plugin, specs

    classes = [n for n, o in vars(specs).items()
               if inspect.isclass(o) and o.__module__ == specs.__name__]
    assert {"GuidanceSpec", "WeightingSpec", "TrainerSpec", "ModelSpec", "DatasetSpec",
            "QuickstartStep"} <= set(classes)
    for name in [*classes, "StepInput", "Guidance", "CliResult"]:
        assert f"{{ #{name} }}" in hooks_page, name
    fixtures = re.findall(r"@pytest\.fixture[^\n]*\ndef (\w+)", inspect.getsource(pytest_plugin))
    assert set(fixtures) == {"guidekit_dpm", "guidekit_plugins", "guidekit_cli"}
    for name in fixtures:
        assert f"### `{name}` {{ #{name} }}" in hooks_page, name


@pytest.fixture(scope="module")
def builtin(ref):
    """The click tree and the CLI reference of guidekit with its own plugins."""
    return ref.cli.builtin_command(), ref.cli.builtin_cli_markdown()


def command_paths(command, path=("guidekit",)):
    """Every visible command of a click tree (walked here, not by the generator)."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if not sub.hidden:
            yield from command_paths(sub, (*path, name))


def test_cli_reference_covers_every_command_and_option(builtin):
    command, page = builtin
    paths = list(command_paths(command))
    assert len(paths) > 15  # train, eval, pdae and their subcommands
    sections = {m.group(1): m.group(2) for m in re.finditer(
        r"^## `([^`]+)` \{ #[\w-]+ \}\n(.*?)(?=^## |\Z)", page, re.S | re.M)}
    for path, cmd in paths:
        name = " ".join(path)
        assert name in sections, f"{name} is missing from the CLI reference"
        for param in cmd.params:
            flags = [*getattr(param, "opts", ()), *getattr(param, "secondary_opts", ())]
            if getattr(param, "hidden", False) or "--help" in flags:
                continue
            assert any(f in sections[name] for f in flags), f"{name}: {flags} undocumented"


def test_cli_reference_lists_every_plugin_option(builtin, ref):
    _, page = builtin
    with ref.builtin_plugins() as registry:
        for kind in ("guidance", "weighting"):
            assert registry.names(kind)
            for spec in registry.specs[kind].values():
                assert f"{{ #{kind}-{spec.name} }}" in page
                for opt in spec.options:
                    assert opt.flag in page, (spec.name, opt.flag)


def test_cli_reference_refuses_a_plugin_whose_commands_fail(ref, guidekit_plugins, monkeypatch):
    """A reference silently missing a plugin's commands would be wrong, not short."""
    monkeypatch.syspath_prepend(str(TESTS / "plugin_fixtures"))
    guidekit_plugins("gk_bad_commands")
    with pytest.raises(RuntimeError, match="gk_bad_commands"):
        ref.cli.current_command()


def test_api_reference_covers_every_public_name(ref):
    page = ref.api.api_markdown()
    for package in ref.api.packages():
        names = importlib.import_module(package).__all__
        for name in names:
            assert f"{{ #{ref.api.anchor(package, name)} }}" in page, f"{package}.{name}"
    assert {"guidekit", "guidekit_classifier", "guidekit_pdae", "guidekit_p2"} <= set(
        ref.api.packages())


def test_docstring_markdown_keeps_code_and_escapes_prose(ref):
    md = ref.markdown.docstring(
        "Summary with ``x | y`` and p(y | x_t).\n\nSee :class:`~guidekit.specs.ModelSpec`::\n\n"
        "    def f():\n        return 1\n\nArgs:\n    n: how many.\n        Continued.\n",
        {"ModelSpec": "#ModelSpec"},
    )
    assert "`x | y`" in md and r"p(y \| x\_t)" in md
    assert "See [`ModelSpec`](#ModelSpec):" in md
    assert "```python\ndef f():\n    return 1\n```" in md
    assert "**Args**\n\n- `n`: how many. Continued." in md


# --------------------------------------------------------------------------- the pages


def fenced(lang: str) -> list[tuple[str, str]]:
    """(page name, block) of every fenced block in ``lang`` on the checked pages."""
    found = []
    for page in PAGES:
        for m in re.finditer(rf"^```{lang}\n(.*?)^```", page.read_text(), re.S | re.M):
            found.append((page.name, m.group(1)))
    return found


def command_lines() -> list[tuple[str, list[str]]]:
    lines = []
    for page, block in fenced("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0])
            if words and words[0] == "guidekit":
                lines.append((page, words))
    return lines


def test_pages_show_guidekit_command_lines():
    assert len(command_lines()) >= 5


@pytest.mark.parametrize("page,words", [
    pytest.param(page, words, id=f"{page}:{' '.join(words[1:3])}")
    for page, words in command_lines()
])
def test_command_lines_in_the_docs_exist(page, words, builtin, ref):
    """Each command shown resolves to a real command, and each flag is one of its options
    or one that a guidance or weighting plugin declares."""
    command, _ = builtin
    args = words[1:]
    while args and hasattr(command, "commands") and args[0] in command.commands:
        command = command.commands[args.pop(0)]
    flags = {f for p in command.params
             for f in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
    with ref.builtin_plugins() as registry:
        for kind in ("guidance", "weighting"):
            for spec in registry.specs[kind].values():
                flags |= {o.flag for o in spec.options}
    assert not hasattr(command, "commands") or "--help" in args, f"{page}: {words} is a group"
    if words[1:3] == ["convert", "adm"]:  # openai's flags pass through to their own parser
        args = _openai_flags_checked(args, flags)
    unknown = [a.split("=")[0] for a in args if a.startswith("--")
               and a.split("=")[0] not in flags]
    assert not unknown, f"{page}: {' '.join(words)}: no such option(s) {unknown}"


def _openai_flags_checked(args: list[str], own: set[str]) -> list[str]:
    """guidekit's own options of ``convert adm``, after checking that the rest (bar the
    weights file) parse as openai's flags do."""
    from guidekit.convert import parse_openai_flags

    mine, openai, i = [], [], 0
    while i < len(args):
        width = 1 if args[i] in ("--force", "--json", "--help") or "=" in args[i] else 2
        if args[i] in own:
            mine += args[i:i + width]
        elif args[i].startswith("--"):
            openai += args[i:i + width]
        else:  # the weights file
            width = 1
        i += width
    defaults = mine[mine.index("--defaults") + 1] if "--defaults" in mine else (
        "guided-diffusion")
    parse_openai_flags(openai, defaults)
    return mine


@pytest.mark.parametrize("page,code", [
    pytest.param(page, code, id=f"{page}:{i}") for i, (page, code) in enumerate(fenced("python"))
])
def test_python_snippets_in_the_docs_use_real_names(page, code):
    tree = ast.parse(code)
    import guidekit

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("guidekit"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{page}: {node.module}.{alias.name}"
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "guidekit"):
            assert node.attr in guidekit.__all__, f"{page}: guidekit.{node.attr}"


def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav's files,
    or a public name without a docstring fails it."""
    if importlib.util.find_spec("mkdocs") is None:
        # CI must build the docs; a developer without the docs extra just skips
        if os.environ.get("CI"):
            pytest.fail("mkdocs is not installed: pip install -e '.[docs]'")
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr, done.stderr[-3000:]
    hooks = (tmp_path / "site" / "hooks" / "index.html").read_text()
    assert all(f'id="{hook}"' in hooks for hook in HOOKS)
    assert 'id="guidekit-train-ddpm"' in (tmp_path / "site" / "cli" / "index.html").read_text()

