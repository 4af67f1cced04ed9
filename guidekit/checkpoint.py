"""Checkpoints: a directory with ``config.json`` beside safetensors files. Never pickle.

Atomicity: every save writes new, step-stamped files (``model-0000500.safetensors``, ...)
through temp-file-and-rename, then replaces ``config.json`` (which names the current files
and their SHA-256) the same way, and only then deletes what the previous saves left. A
crash at any point leaves ``config.json`` naming a complete set: the last good checkpoint.
One writer per directory: :func:`writer_lock` holds an advisory lock the OS drops when the
process dies.

A checkpoint is data, never instructions: the file names ``config.json`` lists must be
names :func:`save_checkpoint` writes (no path, no link), only regular files are read (no
hang on a FIFO or device), every file's hash is checked, and a reader opens every listed
file at once, so a concurrent save can never hand it half of one step and half of another.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import re
import stat
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import nn

from guidekit import __version__
from guidekit.errors import CheckpointError, GuidekitError, PluginError
from guidekit.memory import format_bytes, meta_module, state_bytes

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CONFIG",
    "Checkpoint",
    "FORMAT_VERSION",
    "LOCK",
    "atomic_path",
    "atomic_save_tensors",
    "atomic_write_bytes",
    "load_module",
    "load_weights",
    "read_checkpoint",
    "save_checkpoint",
    "strip_prefix",
    "writer_lock",
]


CONFIG = "config.json"
LOCK = ".guidekit.lock"
FORMAT_VERSION = 2  # 2: config.json records each file's SHA-256
_FORMATS = (1, 2)
_MAX_CONFIG = 1 << 26  # 64 MiB: far above any real config.json, far below a memory problem
# The only names a checkpoint's "files" may list: what save_checkpoint writes. A name read
# from config.json is data, so one with a path in it is never opened or deleted.
_NAME = r"[A-Za-z0-9_]{1,64}-\d{7,12}\.safetensors"
_FILE_NAME = re.compile(_NAME)
# atomic_path's temp files of a checkpoint's own files: what a killed save leaves behind
_TEMP_NAME = re.compile(rf"\.(?:{re.escape(CONFIG)}|{_NAME})\.[A-Za-z0-9_]+\.tmp")
_HASH = re.compile(r"[0-9a-f]{64}")
_READ_TRIES = 50  # a reader racing a save re-reads config.json, 0.1 s apart
# POSIX open flags (0 where the OS has none: no link refusal or FIFO guard there)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_held: dict[str, int] = {}  # directories this process holds the writer lock of -> lock fd


def _own_file(d: Path, name: Any) -> Path | None:
    """``d / name`` when ``name`` is a tensor-file name save_checkpoint could have written
    (no directory part, no ``..``, not absolute), else None."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        return None
    return d / name


@contextlib.contextmanager
def writer_lock(directory: str | Path) -> Iterator[None]:
    """Hold ``directory``'s advisory writer lock (re-entrant within a process). A second
    process is refused in one line; the OS releases the lock when its holder dies, so a
    killed run never leaves a stale lock."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(d)
    except OSError as exc:
        raise CheckpointError(f"cannot create {d}: {exc.strerror}; choose another --out"
                              ) from None
    if key in _held or fcntl is None:
        yield
        return
    try:
        fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
    except OSError as exc:
        raise CheckpointError(f"cannot lock {d / LOCK}: {exc.strerror}; choose another --out"
                              ) from None
    try:
        # a POSIX record lock: held by this process alone (a forked worker does not inherit
        # it), dropped by the OS when the process dies
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            raise CheckpointError(f"{d} is in use by another guidekit process (it holds "
                                  f"{LOCK}): wait for it to finish, or choose another --out"
                                  ) from None
        # a filesystem without locks (some NFS, Lustre and FUSE mounts): write unlocked
        warnings.warn(f"cannot lock {d / LOCK} ({exc.strerror}): nothing stops a second "
                      "writer on this folder", stacklevel=3)
        yield
        return
    _held[key] = fd
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The one atomic writer: yields a temp path beside ``path`` to write; on success it is
    synced and renamed over ``path``, so readers see the old file or the new one, never half;
    on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _sync_dir(d: Path) -> None:
    """Make a rename in ``d`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (``metadata``: its string header fields)."""
    atomic_write_bytes(path, save_bytes(_plain(tensors), metadata=metadata))


def _check_finite(tensors: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    for role, flat in tensors.items():
        for key, v in flat.items():
            if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"not saving step {step}: '{role}' tensor '{key}' holds "
                                      "NaN or inf")


def save_checkpoint(
    directory: str | Path,
    config: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]],
    step: int,
) -> Path:
    """Save one checkpoint: ``tensors`` maps a file role ("model", "ema", "state", ...) to a
    flat dict of tensors; ``config`` must hold ``kind``. Returns the directory.

    A tensor holding NaN or inf is a :class:`CheckpointError` before anything is written,
    so the checkpoint on disk stays the last good one. The save then deletes what earlier
    saves left: files of older steps and temp files of killed saves (only names this
    function writes, only regular files, never a link).
    """
    d = Path(directory)
    _check_finite(tensors, step)  # before the folder or its lock exist
    with writer_lock(d):
        files, hashes = {}, {}
        try:
            for role, flat in tensors.items():
                name = f"{role}-{step:07d}.safetensors"
                data = save_bytes(_plain(flat))
                atomic_write_bytes(d / name, data)
                files[role], hashes[role] = name, hashlib.sha256(data).hexdigest()
                del data
        except BaseException:  # a full disk, Ctrl-C: give back the space this save took
            _drop_unlisted(d, files.values())
            raise
        full = {
            **config,
            "format": FORMAT_VERSION,
            "guidekit_version": __version__,
            "step": step,
            "files": files,
            "hashes": hashes,
        }
        atomic_write_bytes(d / CONFIG, json.dumps(full, indent=2, sort_keys=True).encode())
        _clean(d, keep=set(files.values()))
    return d


def _drop_unlisted(d: Path, names: Any) -> None:
    """Delete the files a failed save wrote, unless the checkpoint on disk lists them."""
    try:
        listed = set(_read_config(d).get("files", {}).values())
    except (CheckpointError, AttributeError):
        listed = set()
    for name in names:
        if name not in listed:
            with contextlib.suppress(OSError):
                os.unlink(d / name)


def _clean(d: Path, keep: set[str]) -> None:
    """Delete the tensor files and checkpoint temp files a killed or earlier save left in
    ``d`` (called under the writer lock, after config.json names ``keep``)."""
    for entry in os.scandir(d):
        ours = _FILE_NAME.fullmatch(entry.name) or _TEMP_NAME.fullmatch(entry.name)
        if ours and entry.name not in keep and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):  # best effort: the save itself is done
                os.unlink(entry.path)


def diffusers_folder(path: Path) -> bool:
    """Whether ``path`` is a diffusers pipeline or model folder (``model_index.json``, or a
    small ``config.json`` that names a diffusers version) rather than a guidekit checkpoint."""
    if (path / "model_index.json").is_file():
        return True
    cfg = path / CONFIG
    try:
        if not cfg.is_file() or cfg.stat().st_size > 1 << 20:
            return False
        d = json.loads(cfg.read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(d, dict) and "_diffusers_version" in d and "kind" not in d


def _open_regular(path: Path, follow: bool = False) -> int:
    """An fd of ``path`` if it is a regular file; never blocks (a FIFO opens non-blocking
    and is then refused) and, unless ``follow``, never follows a link."""
    flags = os.O_RDONLY | _NONBLOCK | _CLOEXEC | (0 if follow else _NOFOLLOW)
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def _read_fd(fd: int, limit: int | None = None) -> bytes:
    size = os.fstat(fd).st_size
    if limit is not None and size > limit:
        raise OSError(errno.EFBIG, f"larger than {format_bytes(limit)}")
    chunks, offset = [], 0
    os.lseek(fd, 0, os.SEEK_SET)
    while offset < size:
        chunk = os.read(fd, min(size - offset, 1 << 26))
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _read_config(d: Path) -> Any:
    path = d / CONFIG
    try:
        fd = _open_regular(path, follow=True)
        try:
            data = _read_fd(fd, _MAX_CONFIG)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}; it must be a "
                              "regular file of at most 64 MiB") from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {path}: not JSON ({str(exc)[:100]}); the "
                              "checkpoint is damaged: re-train or restore it") from None


def _check_config(d: Path, cfg: Any) -> None:
    """The fields every checkpoint has; each section's own fields are checked where it is
    read (``ConfigMixin.from_dict``)."""
    where = d / CONFIG

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: {what}; the checkpoint is damaged or not guidekit's:"
                               " re-train or restore it")

    if not isinstance(cfg, dict):
        raise bad("not a JSON object")
    if not isinstance(cfg.get("kind"), str):
        raise bad("'kind' must be a string")
    fmt = cfg.get("format", 1)
    if type(fmt) is not int:
        raise bad(f"'format' must be an integer, got {fmt!r}"[:200])
    if fmt < 1:
        raise bad(f"'format' must be >= 1, got {fmt}")
    if fmt not in _FORMATS:
        raise CheckpointError(f"{where} has format {fmt}, which this guidekit "
                              f"{__version__} cannot read (it reads {_FORMATS}): upgrade "
                              "guidekit, or use the version that wrote it")
    step = cfg.get("step", 0)
    if type(step) is not int or step < 0:
        raise bad(f"'step' must be a non-negative integer, got {step!r}"[:200])
    files = cfg.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise bad("'files' must be an object of file names")
    hashes = cfg.get("hashes")
    if (fmt >= 2 or hashes is not None) and not (
            isinstance(hashes, dict) and set(hashes) == set(files)
            and all(isinstance(h, str) and _HASH.fullmatch(h) for h in hashes.values())):
        raise bad("'hashes' must give one SHA-256 per file")


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} {why}; the checkpoint is damaged: re-train or restore it")


@dataclass
class Checkpoint:
    """A loaded checkpoint directory: its config and its tensor files, opened together
    when the checkpoint was read (so they are one consistent step) and loaded on demand."""

    path: Path
    config: dict[str, Any]
    _fds: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the finalizer holds the very dict (not a copy): an fd closed by close() is gone
        # from it, so a later number reuse is never closed twice
        weakref.finalize(self, _close_all, self._fds)

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def step(self) -> int:
        return int(self.config.get("step", 0))

    def section(self, key: str) -> dict[str, Any]:
        """``config.json``'s object ``key``; missing or not an object is one line."""
        value = self.config.get(key)
        if not isinstance(value, dict):
            raise CheckpointError(f"{self.path / CONFIG}: '{key}' must be an object, got "
                                  f"{type(value).__name__ if value is not None else 'none'};"
                                  " the checkpoint is damaged: re-train or restore it")
        return value

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Interpret this checkpoint's config: a config error raised inside (a bad field of
        a section) becomes a :class:`CheckpointError` naming config.json."""
        try:
            yield
        except (CheckpointError, PluginError):  # already naming the file, or a plugin
            raise
        except GuidekitError as exc:
            raise CheckpointError(f"{self.path / CONFIG}: {exc}") from None

    def has(self, role: str) -> bool:
        return role in self.config.get("files", {})

    def file_size(self, role: str) -> int:
        """Bytes of the ``role`` tensor file."""
        return os.fstat(self._fd(role)).st_size

    def module_tensors(self, role: str, name: str) -> dict[str, torch.Tensor]:
        """The state dict of trained module ``name`` within the ``role`` file."""
        return strip_prefix(self.tensors(role), name)

    def _fd(self, role: str) -> int:
        if role not in self._fds:
            name = self.config.get("files", {}).get(role)
            if name is None:
                raise CheckpointError(f"checkpoint {self.path} has no '{role}' weights")
            self._fds[role] = _open_listed(self.path, role, name)
        return self._fds[role]

    def tensors(self, role: str) -> dict[str, torch.Tensor]:
        """Every tensor of the ``role`` file, its SHA-256 checked against config.json's."""
        fd = self._fd(role)
        path = self.path / self.config["files"][role]
        expected = self.config.get("hashes", {}).get(role)
        try:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:  # hashed without a copy
                digest = hashlib.sha256(mm).hexdigest()
        except (OSError, ValueError) as exc:  # ValueError: an empty file
            raise _damaged(path, f"cannot be read ({exc})") from None
        if expected is not None and digest != expected:
            raise _damaged(path, "does not match the SHA-256 config.json records")
        opened = f"/dev/fd/{fd}"  # the opened file itself, even if a save has unlinked it
        try:
            return load_file(opened) if os.path.exists(opened) else load_bytes(_read_fd(fd))
        except SafetensorError as exc:
            raise _damaged(path, f"is not a safetensors file ({str(exc)[:100]})") from None

    def close(self) -> None:
        """Close the opened tensor files (a later :meth:`tensors` opens them again): a
        loader calls this once it holds its weights, so a long-lived model does not keep a
        replaced step's files on disk."""
        _close_all(self._fds)


def _close_all(fds: dict[str, int]) -> None:
    """Close and forget every fd in ``fds`` (so closing twice is harmless)."""
    while fds:
        _, fd = fds.popitem()
        with contextlib.suppress(OSError):
            os.close(fd)


def _open_listed(d: Path, role: str, name: Any) -> int:
    """An fd of the tensor file config.json lists as ``role``; FileNotFoundError passes
    through (a concurrent save may have replaced the step)."""
    path = _own_file(d, name)
    if path is None:
        raise CheckpointError(f"{d / CONFIG} lists '{str(name)[:80]}' as its '{role}' file, "
                              "which is not a checkpoint file name; the checkpoint is damaged "
                              "or crafted: re-train or restore it")
    try:
        return _open_regular(path)
    except FileNotFoundError:
        raise
    except OSError as exc:  # a link, FIFO, device or directory: never read
        raise _damaged(path, f"is not a regular file ({exc.strerror or exc})") from None


def _snapshot(d: Path) -> Checkpoint:
    """config.json and every file it lists, opened together; a file missing because a save
    replaced the step meanwhile means reading the new config.json again."""
    for _ in range(_READ_TRIES):
        cfg = _read_config(d)
        _check_config(d, cfg)
        fds: dict[str, int] = {}
        try:
            for role, name in cfg["files"].items():
                fds[role] = _open_listed(d, role, name)
        except FileNotFoundError as exc:
            _close_all(fds)
            if _read_config(d) == cfg:  # nobody is saving: the file is really gone
                raise _damaged(Path(exc.filename or d), "is missing") from None
            time.sleep(0.1)
            continue
        except BaseException:
            _close_all(fds)
            raise
        return Checkpoint(d, cfg, fds)
    raise CheckpointError(f"{d} kept changing while it was read (a training run is saving "
                          "it very often): try again, or copy the checkpoint first")


def strip_prefix(flat: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix.``, with the prefix removed."""
    p = prefix + "."
    return {k[len(p) :]: v for k, v in flat.items() if k.startswith(p)}


def read_checkpoint(path: str | Path, kind: str | tuple[str, ...] | None = None) -> Checkpoint:
    """Open a checkpoint directory and check its kind.

    Raises :class:`CheckpointError` with the fix when the path is missing, is not a guidekit
    checkpoint, is of another kind, or its ``config.json`` lacks the fields every checkpoint
    has.
    """
    d = Path(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    what = f"a '{kinds[0]}' checkpoint" if kinds and len(kinds) == 1 else "a checkpoint"
    if not d.exists():
        hint = f" (train one with `guidekit train {kinds[0]} --out {d}`)" if kinds else ""
        raise CheckpointError(f"no checkpoint at {d}{hint}")
    if d.is_dir() and diffusers_folder(d):
        raise CheckpointError(f"{d} is a diffusers model folder: convert it once with "
                              f"`guidekit convert diffusers {d} --out DIR`, then give DIR")
    if not d.is_dir() or not (d / CONFIG).exists():
        raise CheckpointError(
            f"{d} is not a guidekit checkpoint (no {CONFIG}); expected {what} directory"
        )
    ckpt = _snapshot(d)
    if kinds and ckpt.kind not in kinds:
        raise CheckpointError(
            f"{d} is a '{ckpt.kind}' checkpoint, but {what} is needed here"
        )
    return ckpt


def load_module(
    ckpt: Checkpoint, role: str, name: str, build: Callable[[], nn.Module]
) -> nn.Module:
    """Build the module ``build()`` describes (from the checkpoint's config) and load its
    weights, trained module ``name`` of the ``role`` file.

    The config is untrusted: the module is first built on the meta device, and one that
    would need more memory than the whole weights file holds is refused before anything is
    allocated (a 200 KB checkpoint cannot make guidekit allocate gigabytes).
    """
    where = f"{ckpt.path / CONFIG}"
    try:
        need = state_bytes(meta_module(build))
    except (PluginError, CheckpointError):  # an unknown model name; a bad section: as is
        raise
    except GuidekitError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{where} describes a model that cannot be built "
                              f"({type(exc).__name__}: {str(exc)[:100]}); the checkpoint is "
                              "damaged or crafted: re-train or restore it") from None
    have = ckpt.file_size(role)
    if need > have:
        raise CheckpointError(f"{where} describes a model of {format_bytes(need)}, but its "
                              f"'{role}' weights file holds {format_bytes(have)}; the "
                              "checkpoint is damaged or crafted: re-train or restore it")
    module = build()
    load_weights(module, ckpt.module_tensors(role, name), str(ckpt.path))
    return module


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, explaining the first mismatches in one line: a missing,
    unexpected or differently shaped tensor, one of another dtype, or one holding NaN."""
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    extra = [k for k in tensors if k not in own]
    wrong = [
        f"'{k}' is {tuple(tensors[k].shape)} in the file but {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    wrong += [
        f"'{k}' is {tensors[k].dtype} in the file but {v.dtype} in the model"
        for k, v in own.items()
        if k in tensors and tensors[k].dtype != v.dtype
    ]
    problems = wrong[:2] + [f"'{k}' is missing" for k in missing[:2]]
    problems += [f"'{k}' is unexpected" for k in extra[:2]]
    if problems:
        raise CheckpointError(
            f"weights in {source} do not match the model built from its config: "
            + "; ".join(problems)
            + " (was the checkpoint written by another architecture or version?)"
        )
    bad = next((k for k, v in tensors.items()
                if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise CheckpointError(f"weights in {source}: '{bad}' holds NaN or inf; the "
                              "checkpoint is damaged: re-train or restore it")
    module.load_state_dict(tensors)
