"""Property tests: hostile input never gets past guidekit's one-line errors.

Hypothesis crafts a trained checkpoint's config.json (a field replaced by any JSON value or
deleted; the whole file replaced by junk, a link, a FIFO...) and fuzzes the numbers and words
of ``guidekit sample`` and ``guidekit train ddpm``. Every run, in-process, must

- end with exit status 0 or 2 (any other exception, or any other status, is a failure),
- on status 2 print exactly one ``error: …`` line on stderr and no traceback,
- write nothing outside the output paths it was given, and
- delete nothing guidekit did not write (a user's notes.txt, a foreign .png and a subfolder
  inside the checkpoint folder, victim files beside and above it).

``GUIDEKIT_FUZZ_EXAMPLES=N`` sets every property's example count; the ``slow`` variants run
300 each.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from guidekit.checkpoint import CONFIG, LOCK
from guidekit.data import MAX_IMAGE_SIZE, save_image_grid
from guidekit.lookup import load_dataset
from guidekit.testing import make_tiny_dpm, tiny_unet_config
from guidekit.training import MAX_BATCH, MAX_STEPS, METRICS

_EXAMPLES = int(os.environ.get("GUIDEKIT_FUZZ_EXAMPLES", "0"))
SLOW_EXAMPLES = 300
TINY_STEPS = 4  # the step of the fixture checkpoint; resumes train to TINY_STEPS + 1
TIMESTEPS = 100


def fuzz(examples: int) -> Callable:
    """Hypothesis settings of these tests: ``examples`` (or GUIDEKIT_FUZZ_EXAMPLES), no
    deadline (a run loads torch models), and no example database, so a run leaves nothing in
    the working tree."""
    return settings(
        max_examples=_EXAMPLES or examples, deadline=None, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------------------------------------
# Running the CLI and watching the file system


@dataclass
class Result:
    code: int
    out: str
    err: str


# No tiny run here takes more than a few seconds; one past this limit is a hang (a size
# that no bound checked before the work began).
RUN_LIMIT_S = 60


class RanTooLong(BaseException):
    """A BaseException, so no ``except Exception`` on the way swallows it."""


def _too_long(signum: int, frame: Any) -> None:
    raise RanTooLong(f"the command ran past {RUN_LIMIT_S} s")


def run_guidekit(*args: str) -> Result:
    """``guidekit ARGS`` in this process. Only SystemExit (or a normal return) may end it:
    any other exception propagates and fails the property, traceback and all, and so does a
    run past RUN_LIMIT_S."""
    from guidekit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    previous = signal.signal(signal.SIGALRM, _too_long)
    signal.setitimer(signal.ITIMER_REAL, RUN_LIMIT_S)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code if exc.code is not None else 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return Result(code, out.getvalue(), err.getvalue())


def assert_clean_exit(r: Result) -> None:
    """Status 0, or 2 with one ``error:`` line; never a traceback, never 130 or another code."""
    if currently_in_test_context():
        event(f"exit {r.code}")
    assert r.code in (0, 2), f"exit status {r.code!r}\nstderr: {r.err}"
    assert "Traceback" not in r.err + r.out, r.err
    if r.code == 2:
        lines = [ln for ln in r.err.splitlines() if ln.strip()]
        assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{r.err}"
        assert lines[0].startswith("error: "), r.err


Snapshot = dict[str, tuple]


def snapshot(*roots: Path) -> Snapshot:
    """Every path under ``roots`` (links not followed) with what it is: a file's size, mtime
    and SHA-256, a link's target. FIFOs and devices are never opened."""
    seen: Snapshot = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            seen[dirpath] = ("dir",)
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st_ = os.lstat(p)
                if stat.S_ISLNK(st_.st_mode):
                    seen[p] = ("link", os.readlink(p))
                elif stat.S_ISREG(st_.st_mode):
                    with open(p, "rb") as f:
                        digest = hashlib.sha256(f.read()).hexdigest()
                    seen[p] = ("file", st_.st_size, st_.st_mtime_ns, digest)
                elif not stat.S_ISDIR(st_.st_mode):
                    seen[p] = ("other", stat.S_IFMT(st_.st_mode))
    return seen


def changes(before: Snapshot, after: Snapshot) -> tuple[set[str], set[str]]:
    """(paths created or modified, paths deleted)."""
    written = {p for p, v in after.items() if before.get(p) != v}
    deleted = set(before) - set(after)
    return written, deleted


# What guidekit writes into a checkpoint folder, and so may replace or delete there.
_OWNED = re.compile(r"config\.json|metrics\.jsonl|\.guidekit\.lock|samples\.png|"
                    r"[A-Za-z0-9_]{1,64}-\d{7,12}\.safetensors|\..+\.tmp")
_TENSOR_FILE = re.compile(r"[A-Za-z0-9_]{1,64}-\d{7,12}\.safetensors")


@dataclass
class Workspace:
    """One example's folders: ``ckpt`` (a copy of the trained checkpoint, holding a user's
    notes.txt, a foreign .png and a subfolder), victims beside and above it, ``cwd`` (the
    working directory of the run) and ``out`` (where outputs may go)."""

    top: Path  # the test's tmp_path: holds victim.txt, reachable as ckpt/../../victim.txt
    root: Path
    ckpt: Path
    cwd: Path
    out: Path

    @property
    def placeholders(self) -> dict[str, str]:
        """Strings a crafted config may hold that stand for this example's absolute paths."""
        return {"{victim}": str(self.root / "victim.txt"),
                "{top_victim}": str(self.top / "victim.txt"),
                "{notes}": str(self.ckpt / "notes.txt"),
                "{sibling}": str(self.root / "sibling" / "file.txt"),
                "{ckpt}": str(self.ckpt)}


@contextlib.contextmanager
def workspace(top: Path, source: Path | None) -> Iterator[Workspace]:
    """A fresh example folder under ``top`` (deleted afterwards), the process inside its
    ``cwd`` meanwhile, so a relative path a run makes up lands where it is watched."""
    victim = top / "victim.txt"
    if not victim.exists():
        victim.write_text("above the checkpoint: keep me\n")
    root = Path(tempfile.mkdtemp(dir=top, prefix="ex-"))
    ws = Workspace(top, root, root / "ckpt", root / "cwd", root / "out")
    (root / "victim.txt").write_text("beside the checkpoint: keep me\n")
    (root / "sibling").mkdir()
    (root / "sibling" / "file.txt").write_text("a sibling folder's file: keep me\n")
    ws.cwd.mkdir()
    ws.out.mkdir()
    if source is not None:
        shutil.copytree(source, ws.ckpt)
        (ws.ckpt / "notes.txt").write_text("the user's notes: keep me\n")
        (ws.ckpt / "foreign.png").write_bytes(b"\x89PNG\r\n\x1a\n not guidekit's")
        (ws.ckpt / "sub").mkdir()
        (ws.ckpt / "sub" / "keep.txt").write_text("keep me\n")
    cwd = os.getcwd()
    os.chdir(ws.cwd)  # contextlib.chdir is Python 3.11+
    try:
        yield ws
    finally:
        os.chdir(cwd)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained DDPM checkpoint (step TINY_STEPS), read-only for the tests: each
    example works on a copy."""
    return make_tiny_dpm(tmp_path_factory.mktemp("property") / "ddpm", steps=TINY_STEPS,
                         timesteps=TIMESTEPS)


@pytest.fixture(scope="module")
def reference_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An input image for the inpaint guidance (the one guidance that needs no checkpoint)."""
    return save_image_grid(torch.zeros(1, 1, 16, 16), tmp_path_factory.mktemp("ref") / "ref.png")


def tiny_model_args() -> list[str]:
    """The ``guidekit train ddpm`` options of :func:`make_tiny_dpm`'s model."""
    cfg = tiny_unet_config(load_dataset("digits", "train"))
    return ["--data", "digits", "--model-channels", str(cfg.model_channels),
            "--channel-mult", ",".join(f"{m:g}" for m in cfg.channel_mult),
            "--num-res-blocks", str(cfg.num_res_blocks),
            "--attention", ",".join(map(str, cfg.attention_resolutions)),
            "--num-heads", str(cfg.num_heads), "--timesteps", str(TIMESTEPS),
            "--batch-size", "16", "--samples", "0"]


def resume_args(ckpt: Path) -> list[str]:
    return ["train", "ddpm", "--resume", "--out", str(ckpt), "--steps", str(TINY_STEPS + 1),
            "--save-every", "1", "--log-every", "1", *tiny_model_args()]


# ---------------------------------------------------------------------------------------------
# Strategies: JSON values and crafted config.json files

BIG_INTS = [0, -1, 1, 2, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**12,
            10**100]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, -0.0, 0.5, 1e12]
SPECIAL_STRINGS = [
    "", " ", "..", ".", "/", "../x", "../victim.txt", "../../victim.txt",
    "../sibling/file.txt", "notes.txt", "foreign.png", "sub", "sub/keep.txt", "/etc/passwd",
    "/dev/zero", "config.json", LOCK, METRICS, "ema-0000004.safetensors",
    "model-0000004.safetensors", "state-0000004.safetensors", "model-0000005.safetensors",
    "model-0000004.safetensors/../../victim.txt", "a" * 300, "ddpm", "unet", "digits",
    "shapes", "linear", "cosine", "classifier", "pdae", "small", "large", "learned",
    "leading", "trailing", "linspace", "cuda", "meta", "cpu", "[bold]x[/bold]", ":smile:",
    "line\nbreak", "\x00", "\u202e", "0" * 64, "f" * 64, "{victim}", "{top_victim}",
    "{notes}", "{sibling}", "{ckpt}",
]

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-10, max_value=300),
    st.integers(),
    st.sampled_from(BIG_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(SPECIAL_FLOATS),
    st.text(max_size=20),
    st.sampled_from(SPECIAL_STRINGS),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=10) | st.sampled_from(SPECIAL_STRINGS), inner,
                      max_size=4),
    max_leaves=12,
)
# long lists: a bound on a tuple's length (β lists, channel_mult, optimizer params)
long_lists = st.builds(lambda n, v: [v] * n, st.sampled_from([5, 1000, 70_000]),
                       st.sampled_from([0, 1, 0.01, 2, None, "x"]))


def neighbours(value: Any) -> list[Any]:
    """Values close to a real one: the same number as another type, one off, far off."""
    out: list[Any] = [None, [value], {"value": value}, str(value)]
    if isinstance(value, bool):
        out += [not value, int(value), float(value), str(value).lower()]
    elif isinstance(value, int):
        out += [value + 1, value - 1, -value, 0, float(value), value + 0.5, value * 10**6,
                value * 10**12, bool(value), 2**64 + value]
    elif isinstance(value, float):
        out += [-value, value * 1e6, math.nan, math.inf, int(value), value + 1e-7, 0.0]
        if value in (0.0, 1.0):
            out.append(bool(value))
    elif isinstance(value, str):
        out += ["", value.upper(), value + "x", "../" + value, "/" + value, value * 100]
    elif isinstance(value, list):
        out += [[], value + value, value[:1], value[::-1], [str(v) for v in value],
                [float(v) if isinstance(v, int) else v for v in value]]
        if len(value) <= 10:
            out.append(value * 10_000)
    elif isinstance(value, dict):
        out += [{}, list(value), {**value, "extra": 1}]
    return out


def config_paths(cfg: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into the config: keys of objects, and list items (only the first of a long
    list such as the optimizer's parameter indices)."""
    paths = [prefix] if prefix else []
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            paths += config_paths(v, (*prefix, k))
    elif isinstance(cfg, list):
        for i, v in enumerate(cfg[: 4 if len(cfg) <= 4 else 1]):
            paths += config_paths(v, (*prefix, i))
    return paths


# Paths a config may hold but the fixture's does not: a converted model's sampling defaults,
# unknown keys, a schedule given as β values.
EXTRA_PATHS: list[tuple] = [
    ("sampling",), ("sampling", "clip_x0"), ("sampling", "variance"), ("sampling", "spacing"),
    ("sampling", "unknown"), ("model", "config", "unknown"), ("unknown",),
    ("schedule", "betas", 0), ("data", "unknown"), ("optimizer", "state"),
    ("optimizer", "param_groups", 1), ("files", "extra"), ("hashes", "extra"),
]


def lookup(cfg: Any, path: tuple) -> Any:
    for k in path:
        try:
            cfg = cfg[k]
        except (KeyError, IndexError, TypeError):
            return None
    return cfg


def apply(cfg: Any, path: tuple, op: str, value: Any = None) -> Any:
    """``cfg`` with the item at ``path`` set to ``value`` or deleted (containers on the way
    are created where missing or replaced where not containers)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(head, int):
        node = list(cfg) if isinstance(cfg, list) else []
        if head < len(node):
            if op == "delete" and not rest:
                del node[head]
            else:
                node[head] = apply(node[head], rest, op, value)
        elif op == "set":
            node.append(apply(None, rest, op, value))
        return node
    node = dict(cfg) if isinstance(cfg, dict) else {}
    if op == "delete" and not rest:
        node.pop(head, None)
    elif head in node or op == "set":
        node[head] = apply(node.get(head), rest, op, value)
    return node


def substitute(value: Any, ws: Workspace) -> Any:
    """Placeholders such as ``{victim}`` replaced by this example's absolute paths."""
    if isinstance(value, str):
        for k, v in ws.placeholders.items():
            value = value.replace(k, v)
        return value
    if isinstance(value, list):
        return [substitute(v, ws) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, ws) for k, v in value.items()}
    return value


def _sparse(size: int) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            f.truncate(size)
    return write


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


def _json_text(encoding: str, bom: bytes = b"") -> Callable[[Path], None]:
    def write(p: Path) -> None:
        p.write_bytes(bom + p.read_text().encode(encoding))
    return write


def _link(target: str) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        dest = target.replace("{victim}", str(p.parent.parent / "victim.txt"))
        p.unlink()
        p.symlink_to(dest)
    return write


def _replace(make: Callable[[Path], None]) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        p.unlink()
        make(p)
    return write


def _tensor_file(make: Callable[[Path, Path], None], role: str = "model"
                 ) -> Callable[[Path], None]:
    """A craft of the tensor file config.json lists as ``role`` (config.json left valid)."""
    def write(p: Path) -> None:
        name = json.loads(p.read_text())["files"][role]
        make(p.parent / name, p.parent)
    return write


def _swap_tensors(f: Path, d: Path) -> None:
    f.write_bytes((d / f.name.replace("model", "ema")).read_bytes())


def _truncate_tensors(f: Path, d: Path) -> None:
    f.write_bytes(f.read_bytes()[:100])


def _tensor_link(f: Path, d: Path) -> None:
    f.unlink()
    f.symlink_to(d.parent / "victim.txt")


def _tensor_fifo(f: Path, d: Path) -> None:
    f.unlink()
    os.mkfifo(f)


# Whole-file crafts of config.json (and of what it points at), by name.
WHOLE_FILE: dict[str, Callable[[Path], None]] = {
    "empty": _bytes(b""),
    "not json": _bytes(b"{kind: ddpm"),
    "deep list": _bytes(b"[" * 100_000),
    "deep object": _bytes(b'{"a":' * 100_000),
    "deep closed list": _bytes(b"[" * 5_000 + b"]" * 5_000),
    "json list": _bytes(b'[{"kind": "ddpm"}]'),
    "json string": _bytes(b'"ddpm"'),
    "json null": _bytes(b"null"),
    "json number": _bytes(b"1e999"),
    "pickle": _bytes(pickle.dumps({"kind": "ddpm"}, protocol=4)),
    "pickle header": _bytes(b"\x80\x04"),
    "binary": _bytes(bytes(range(256)) * 4),
    "NUL bytes": _bytes(b"\x00" * 1000),
    "utf-16 json": _json_text("utf-16"),
    "utf-8 bom json": _json_text("utf-8", b"\xef\xbb\xbf"),
    "latin-1 junk": _bytes('{"kind": "ddpm\xe9"}'.encode("latin-1")),
    "over 64 MiB (sparse)": _sparse((1 << 26) + 1),
    "64 MiB of NUL (sparse)": _sparse(1 << 26),
    "link to a victim": _link("{victim}"),
    "link to /dev/zero": _link("/dev/zero"),
    "dangling link": _link("does-not-exist.json"),
    "link loop": _link("config.json"),
    "directory": _replace(lambda p: p.mkdir()),
    "fifo": _replace(os.mkfifo),
    "missing": lambda p: p.unlink(),
    "model file swapped": _tensor_file(_swap_tensors),
    "model file truncated": _tensor_file(_truncate_tensors),
    "model file links out": _tensor_file(_tensor_link),
    "model file is a fifo": _tensor_file(_tensor_fifo),
    "state file truncated": _tensor_file(_truncate_tensors, "state"),
}


@dataclass
class Craft:
    """What an example did to config.json, for the failure report."""

    whole_file: str | None
    mutations: list[tuple[tuple, str, Any]]


def draw_craft(data: st.DataObject, cfg: dict[str, Any]) -> Craft:
    if data.draw(st.integers(0, 5), label="whole file?") == 0:
        return Craft(data.draw(st.sampled_from(sorted(WHOLE_FILE)), label="whole file"), [])
    paths = config_paths(cfg) + EXTRA_PATHS
    mutations = []
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["set", "set", "set", "delete"]), label="op")
        value = None
        if op == "set":
            value = data.draw(st.one_of(st.sampled_from(neighbours(lookup(cfg, path))),
                                        json_values, long_lists), label="value")
        mutations.append((path, op, value))
    return Craft(None, mutations)


def write_craft(craft: Craft, ws: Workspace) -> None:
    path = ws.ckpt / CONFIG
    if craft.whole_file is not None:
        WHOLE_FILE[craft.whole_file](path)
        return
    cfg = json.loads(path.read_text())
    for p, op, value in craft.mutations:
        cfg = apply(cfg, p, op, substitute(value, ws))
    # json.dumps writes NaN/Infinity and escapes lone surrogates: JSON as Python reads it
    path.write_text(json.dumps(cfg, indent=1))


def assert_only_owned_changes(before: Snapshot, after: Snapshot, ckpt: Path) -> None:
    """Writes and deletions only of what guidekit writes, directly in the checkpoint folder."""
    written, deleted = changes(before, after)
    for p in sorted(written | deleted):
        inside = Path(p).parent == ckpt
        assert inside and _OWNED.fullmatch(Path(p).name), (
            f"{'deleted' if p in deleted else 'wrote'} {p}, which guidekit does not own")
        if p in deleted:
            assert _TENSOR_FILE.fullmatch(Path(p).name) and before[p][0] == "file", (
                f"deleted {p} ({before[p][0]})")


# ---------------------------------------------------------------------------------------------
# (a) crafted config.json


def _sample_crafted(tiny_ckpt: Path, top: Path, data: st.DataObject) -> None:
    cfg = json.loads((tiny_ckpt / CONFIG).read_text())
    craft = draw_craft(data, cfg)
    with workspace(top, tiny_ckpt) as ws:
        write_craft(craft, ws)
        before = snapshot(top)
        out = ws.out / "s.png"
        r = run_guidekit("sample", "--checkpoint", str(ws.ckpt), "--out", str(out), "--n", "2",
                         "--steps", "2")
        assert_clean_exit(r)
        written, deleted = changes(before, snapshot(top))
        assert not deleted, f"sample deleted {sorted(deleted)}"
        assert written <= {str(out)}, f"sample wrote {sorted(written - {str(out)})}"
        if r.code == 0:
            assert out.read_bytes().startswith(b"\x89PNG"), r.out


def _resume_crafted(tiny_ckpt: Path, top: Path, data: st.DataObject) -> None:
    cfg = json.loads((tiny_ckpt / CONFIG).read_text())
    craft = draw_craft(data, cfg)
    with workspace(top, tiny_ckpt) as ws:
        write_craft(craft, ws)
        before = snapshot(top)
        r = run_guidekit(*resume_args(ws.ckpt))
        assert_clean_exit(r)
        assert_only_owned_changes(before, snapshot(top), ws.ckpt)


@fuzz(40)
@given(data=st.data())
def test_sample_survives_a_crafted_config(tiny_ckpt: Path, tmp_path: Path,
                                          data: st.DataObject) -> None:
    _sample_crafted(tiny_ckpt, tmp_path, data)


@fuzz(20)
@given(data=st.data())
def test_resume_survives_a_crafted_config(tiny_ckpt: Path, tmp_path: Path,
                                          data: st.DataObject) -> None:
    _resume_crafted(tiny_ckpt, tmp_path, data)


@pytest.mark.slow
@fuzz(SLOW_EXAMPLES)
@given(data=st.data())
def test_sample_survives_a_crafted_config_many(tiny_ckpt: Path, tmp_path: Path,
                                               data: st.DataObject) -> None:
    _sample_crafted(tiny_ckpt, tmp_path, data)


@pytest.mark.slow
@fuzz(SLOW_EXAMPLES)
@given(data=st.data())
def test_resume_survives_a_crafted_config_many(tiny_ckpt: Path, tmp_path: Path,
                                               data: st.DataObject) -> None:
    _resume_crafted(tiny_ckpt, tmp_path, data)


def test_the_uncrafted_copy_samples_and_resumes(tiny_ckpt: Path, tmp_path: Path) -> None:
    """The baseline of the two properties above: without a craft both commands succeed, so
    what the fuzz sees as status 2 is the craft's doing, not a wrong command line."""
    with workspace(tmp_path, tiny_ckpt) as ws:
        before = snapshot(tmp_path)
        r = run_guidekit("sample", "--checkpoint", str(ws.ckpt), "--out", str(ws.out / "s.png"),
                         "--n", "2", "--steps", "2")
        assert r.code == 0, r.err
        r = run_guidekit(*resume_args(ws.ckpt))
        assert r.code == 0, r.err
        assert json.loads((ws.ckpt / CONFIG).read_text())["step"] == TINY_STEPS + 1
        after = snapshot(tmp_path)
        assert_only_owned_changes(before, {p: v for p, v in after.items()
                                           if p != str(ws.out / "s.png")}, ws.ckpt)
        for name in ("notes.txt", "foreign.png", "sub/keep.txt"):
            assert (ws.ckpt / name).is_file()


@pytest.mark.parametrize("craft", ["link to a victim", "model file links out"])
def test_crafted_links_leave_their_targets_alone(tiny_ckpt: Path, tmp_path: Path,
                                                 craft: str) -> None:
    """The two crafts that point out of the folder, each run once for sure (the fuzz draws
    them only now and then)."""
    with workspace(tmp_path, tiny_ckpt) as ws:
        write_craft(Craft(craft, []), ws)
        before = snapshot(tmp_path)
        for args in (["sample", "--checkpoint", str(ws.ckpt), "--out", str(ws.out / "s.png"),
                      "--n", "2", "--steps", "2"], resume_args(ws.ckpt)):
            r = run_guidekit(*args)
            assert r.code == 2, r.out + r.err
            assert_clean_exit(r)
        assert_only_owned_changes(before, snapshot(tmp_path), ws.ckpt)
        assert (ws.root / "victim.txt").read_text() == "beside the checkpoint: keep me\n"


# ---------------------------------------------------------------------------------------------
# (b) the CLI's numbers and words

JUNK = ["", " ", "-", "--", "1e3", "0x10", "1_000", "\u0663", "+3", " 7 ", "3.0", "true",
        "none", "null", "nan", "inf", "../x", "/etc/passwd", "[1]", "{}", ":", "a:b:c",
        "[bold]x", ":smile:", "\u202e", "9" * 400]
# argv cannot hold NUL, and what the OS decodes is never a lone surrogate outside
# surrogateescape: the text a real command line can carry
argv_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                    max_size=30)
junk = st.one_of(argv_text, st.sampled_from(JUNK))
int_text = st.one_of(
    st.integers(-5, 120).map(str), st.integers().map(str), st.sampled_from(BIG_INTS).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr), junk)
float_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e999", "-1e999",
                     "1e-320", "0", "-0", "1", "0.999", "1.0"]),
    st.integers().map(str), st.sampled_from(BIG_INTS).map(str), junk)


def as_int(text: str) -> int | None:
    """What click makes of ``text`` for an INTEGER option (it calls int())."""
    try:
        return int(text)
    except ValueError:
        return None


def costly(low: int, high: int) -> Callable[[str], bool]:
    """A valid value that would start a long or huge run: ``low <= int(text) <= high``. These
    are left out; invalid values (outside guidekit's bounds) are fuzzed in full."""
    def check(text: str) -> bool:
        v = as_int(text)
        return v is not None and low <= v <= high
    return check


def costly_list(low: int, high: int) -> Callable[[str], bool]:
    """Like :func:`costly`, for a comma-separated list: its largest item (8 base channels
    times a multiplier of 9 or more is a wide UNet)."""
    def check(text: str) -> bool:
        items = [as_int(v) for v in text.split(",") if v.strip()]
        ints = [v for v in items if v is not None]
        return bool(ints) and len(ints) == len(items) and low <= max(ints) <= high
    return check


def never(text: str) -> bool:
    return False


@dataclass(frozen=True)
class Fuzzed:
    option: str
    values: st.SearchStrategy[str]
    costly: Callable[[str], bool] = never
    extra: tuple[str, ...] = ()  # options this one needs to mean anything


CHOICES = {
    "spacing": ["leading", "linspace", "trailing", "Leading", "both"],
    "variance": ["small", "large", "learned", "fixed_small", "SMALL"],
    "device": ["cpu", "auto", "cuda", "cuda:0", "cuda:-1", "cuda:99", "cuda:" + "9" * 30,
               "cpu:0", "cpu:1", "mps", "meta", "xla", "cuda:0:1", "gpu"],
    "sampler": ["ddim", "ddpm", "DDIM", "plms"],
}
respacings = st.one_of(
    st.builds("ddim{}".format, int_text), st.builds("ddpm{}".format, int_text),
    st.lists(int_text, min_size=1, max_size=4).map(",".join),
    st.lists(st.integers(0, 120).map(str), min_size=1, max_size=4).map(",".join), junk)
int_lists = st.one_of(
    st.lists(st.integers(-2, 20).map(str), max_size=6).map(",".join),
    st.lists(int_text, min_size=1, max_size=4).map(",".join), junk)
schedules = st.one_of(
    st.sampled_from(["constant", "snr:0:1", "t:0:50", "snr:1:0", "t:50:0"]),
    st.builds("{}:{}:{}".format, st.sampled_from(["snr", "t", "x", ""]), float_text,
              float_text),
    junk)


def choice(option: str) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(CHOICES[option]), junk)


def sample_fuzzed(reference: Path) -> dict[str, Fuzzed]:
    guided = ("--guidance", "inpaint", "--image", str(reference), "--mask", "center")
    return {f.option: f for f in [
        Fuzzed("n", int_text, costly(33, 10**8)),  # above 10**8 the memory bound refuses
        Fuzzed("seed", int_text),
        Fuzzed("steps", int_text),  # at most T = 100 steps are valid: all cheap
        Fuzzed("eta", float_text),
        Fuzzed("scale", float_text, extra=guided),
        Fuzzed("guidance-schedule", schedules, extra=guided),
        Fuzzed("nrow", int_text),
        Fuzzed("spacing", choice("spacing")),
        Fuzzed("respacing", respacings),
        Fuzzed("variance", choice("variance"), extra=("--sampler", "ddpm")),
        Fuzzed("sampler", choice("sampler")),
        Fuzzed("device", choice("device")),
    ]}


TRAIN_FUZZED: dict[str, Fuzzed] = {f.option: f for f in [
    Fuzzed("steps", int_text, costly(4, MAX_STEPS)),
    Fuzzed("batch-size", int_text, costly(65, MAX_BATCH), extra=("--steps", "1")),
    Fuzzed("lr", float_text),
    Fuzzed("weight-decay", float_text),
    Fuzzed("grad-clip", float_text),
    Fuzzed("ema-decay", float_text),
    Fuzzed("seed", int_text),
    Fuzzed("timesteps", int_text),  # T ≤ 100 000 is valid: tables of that size are cheap
    # past 10**6 the memory check refuses any machine; below, a wide UNet trains for minutes
    Fuzzed("model-channels", int_text, costly(65, 10**6), extra=("--steps", "1")),
    Fuzzed("image-size", int_text, costly(33, MAX_IMAGE_SIZE), extra=("--steps", "1")),
    Fuzzed("save-every", int_text),
    Fuzzed("log-every", int_text),
    # blocks are built one by one: every valid count above a few is a slow build
    Fuzzed("num-res-blocks", int_text, costly(4, 10**100), extra=("--steps", "1")),
    Fuzzed("num-heads", int_text),
    Fuzzed("dropout", float_text),
    Fuzzed("channel-mult", int_lists, costly_list(9, 10**5), extra=("--steps", "1")),
    Fuzzed("attention", int_lists),
]}


def draw_options(data: st.DataObject, fuzzed: dict[str, Fuzzed]) -> list[str]:
    """1–3 fuzzed options as ``--name=value`` (so a value starting with '-' stays a value),
    valid-but-costly values left out."""
    names = data.draw(st.lists(st.sampled_from(sorted(fuzzed)), min_size=1, max_size=3,
                               unique=True), label="options")
    argv: list[str] = []
    for name in names:
        f = fuzzed[name]
        value = data.draw(f.values.filter(lambda v, f=f: not f.costly(v)), label=name)
        argv += [*f.extra, f"--{name}={value}"]
    return argv


def _sample_cli(tiny_ckpt: Path, reference: Path, top: Path, data: st.DataObject) -> None:
    options = draw_options(data, sample_fuzzed(reference))
    with workspace(top, None) as ws:
        before = snapshot(top, tiny_ckpt, reference.parent)
        out = ws.out / "s.png"
        # the later of a repeated option wins: the fuzzed values come after the defaults
        r = run_guidekit("sample", "--checkpoint", str(tiny_ckpt), "--out", str(out),
                         "--n", "2", "--steps", "2", *options)
        assert_clean_exit(r)
        written, deleted = changes(before, snapshot(top, tiny_ckpt, reference.parent))
        assert not deleted, f"sample deleted {sorted(deleted)}"
        assert written <= {str(out)}, f"sample wrote {sorted(written - {str(out)})}"


def _train_cli(top: Path, data: st.DataObject) -> None:
    options = draw_options(data, TRAIN_FUZZED)
    with workspace(top, None) as ws:
        before = snapshot(top)
        run = ws.out / "run"
        r = run_guidekit("train", "ddpm", "--out", str(run), *tiny_model_args(),
                         "--batch-size", "4", "--steps", "2", "--log-every", "1", *options)
        assert_clean_exit(r)
        written, deleted = changes(before, snapshot(top))
        assert not deleted, f"train deleted {sorted(deleted)}"
        outside = {p for p in written if not (p == str(run) or p.startswith(f"{run}/"))}
        assert not outside, f"train wrote {sorted(outside)}"


@fuzz(50)
@given(data=st.data())
def test_sample_options_never_crash(tiny_ckpt: Path, reference_png: Path, tmp_path: Path,
                                    data: st.DataObject) -> None:
    _sample_cli(tiny_ckpt, reference_png, tmp_path, data)


@fuzz(25)
@given(data=st.data())
def test_train_options_never_crash(tmp_path: Path, data: st.DataObject) -> None:
    _train_cli(tmp_path, data)


@pytest.mark.slow
@fuzz(SLOW_EXAMPLES)
@given(data=st.data())
def test_sample_options_never_crash_many(tiny_ckpt: Path, reference_png: Path,
                                         tmp_path: Path, data: st.DataObject) -> None:
    _sample_cli(tiny_ckpt, reference_png, tmp_path, data)


@pytest.mark.slow
@fuzz(SLOW_EXAMPLES)
@given(data=st.data())
def test_train_options_never_crash_many(tmp_path: Path, data: st.DataObject) -> None:
    _train_cli(tmp_path, data)


def test_the_fuzzed_commands_succeed_with_their_defaults(tiny_ckpt: Path, reference_png: Path,
                                                         tmp_path: Path) -> None:
    """The baselines the CLI fuzz varies from: both exit 0, guided sampling included."""
    pytest.importorskip("guidekit_inpaint", reason="the guided baseline uses the example "
                        "plugin guidekit-inpaint")
    guided = sample_fuzzed(reference_png)["scale"].extra
    r = run_guidekit("sample", "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path / "s.png"),
                     "--n", "2", "--steps", "2", *guided, "--scale=1")
    assert r.code == 0, r.err
    r = run_guidekit("train", "ddpm", "--out", str(tmp_path / "run"), *tiny_model_args(),
                     "--batch-size", "4", "--steps", "2", "--log-every", "1")
    assert r.code == 0, r.err


# ---------------------------------------------------------------------------------------------
# Minimal failing examples the fuzz has found, kept as plain tests so they run every time.

FOUND_CRAFTS = {
    "amsgrad=[False]": [(("optimizer", "param_groups", 0, "amsgrad"), "set", [False])],
    "betas=[[0.9,0.999]]": [(("optimizer", "param_groups", 0, "betas"), "set", [[0.9, 0.999]])],
    "betas=null": [(("optimizer", "param_groups", 0, "betas"), "set", None)],
    "no betas": [(("optimizer", "param_groups", 0, "betas"), "delete", None)],
    "betas=['0.9','0.999']": [(("optimizer", "param_groups", 0, "betas"), "set",
                               ["0.9", "0.999"])],
    "eps=null": [(("optimizer", "param_groups", 0, "eps"), "set", None)],
    "capturable=[False]": [(("optimizer", "param_groups", 0, "capturable"), "set", [False])],
    "foreach=[None],eps=[1e-08]": [(("optimizer", "param_groups", 0, "foreach"), "set", [None]),
                                   (("optimizer", "param_groups", 0, "eps"), "set", [1e-8])],
    "differentiable=[False],fused=[None]": [
        (("optimizer", "param_groups", 0, "differentiable"), "set", [False]),
        (("optimizer", "param_groups", 0, "fused"), "set", [None])],
}


@pytest.mark.parametrize("mutations", FOUND_CRAFTS.values(), ids=FOUND_CRAFTS.keys())
def test_found_crafted_configs(tiny_ckpt: Path, tmp_path: Path,
                               mutations: list[tuple[tuple, str, Any]]) -> None:
    with workspace(tmp_path, tiny_ckpt) as ws:
        write_craft(Craft(None, mutations), ws)
        before = snapshot(tmp_path)
        for args in (["sample", "--checkpoint", str(ws.ckpt), "--out", str(ws.out / "s.png"),
                      "--n", "2", "--steps", "2"], resume_args(ws.ckpt)):
            assert_clean_exit(run_guidekit(*args))
        after = {p: v for p, v in snapshot(tmp_path).items() if p != str(ws.out / "s.png")}
        assert_only_owned_changes(before, after, ws.ckpt)


FOUND_TRAIN_OPTIONS = [
    ["--model-channels=2147483648", "--steps", "1"],
    ["--model-channels=" + "1" + "0" * 100, "--steps", "1"],
]


@pytest.mark.parametrize("options", FOUND_TRAIN_OPTIONS, ids=lambda o: o[0][:32])
def test_found_train_options(tmp_path: Path, options: list[str]) -> None:
    r = run_guidekit("train", "ddpm", "--out", str(tmp_path / "run"), *tiny_model_args(),
                     "--batch-size", "4", "--steps", "2", "--log-every", "1", *options)
    assert_clean_exit(r)


# A size that is only checked after the model is built (block by block, on the meta device)
# is a hang, not an error: each of these must be refused in one line within HANG_LIMIT_S, in a
# child process so that a hang costs the limit and not the session.
HANG_LIMIT_S = 15
FOUND_HANGS = {
    "config num_res_blocks=10**6": (
        [(("model", "config", "num_res_blocks"), "set", 10**6)], ["sample"]),
    "train --num-res-blocks=100000": (None, ["train", "--num-res-blocks=100000"]),
}


@pytest.mark.parametrize("craft,command", FOUND_HANGS.values(), ids=FOUND_HANGS.keys())
def test_found_sizes_are_refused_before_the_build(
        tiny_ckpt: Path, tmp_path: Path, craft: list[tuple[tuple, str, Any]] | None,
        command: list[str]) -> None:
    with workspace(tmp_path, tiny_ckpt) as ws:
        if craft is not None:
            write_craft(Craft(None, craft), ws)
        if command[0] == "sample":
            args = ["sample", "--checkpoint", str(ws.ckpt), "--out", str(ws.out / "s.png"),
                    "--n", "2", "--steps", "2"]
        else:
            args = ["train", "ddpm", "--out", str(ws.out / "run"), *tiny_model_args(),
                    "--steps", "1", *command[1:]]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        try:
            proc = subprocess.run([sys.executable, "-m", "guidekit", *args], env=env,
                                  capture_output=True, text=True, timeout=HANG_LIMIT_S)
        except subprocess.TimeoutExpired:
            proc = None  # killed by subprocess.run
        assert proc is not None, f"`guidekit {' '.join(args)}` still ran after {HANG_LIMIT_S} s"
        assert_clean_exit(Result(proc.returncode, proc.stdout, proc.stderr))
