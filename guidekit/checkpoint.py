"""Checkpoints: a directory with ``config.json`` beside safetensors files. Never pickle.

Atomicity: every save writes new, step-stamped files (``model-000500.safetensors``, ...)
through temp-file-and-rename, then replaces ``config.json`` (which names the current files)
the same way, and only then deletes the previous step's files. A crash at any point leaves
``config.json`` naming a complete set: the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from guidekit import __version__
from guidekit.errors import CheckpointError

__all__ = [
    "CONFIG",
    "Checkpoint",
    "FORMAT_VERSION",
    "atomic_path",
    "atomic_save_tensors",
    "atomic_write_bytes",
    "load_weights",
    "read_checkpoint",
    "save_checkpoint",
    "strip_prefix",
]


CONFIG = "config.json"
FORMAT_VERSION = 1
# The only names a checkpoint's "files" may list: what save_checkpoint writes. A name read
# from config.json is data, so one with a path in it is never opened or deleted.
_FILE_NAME = re.compile(r"[A-Za-z0-9_]{1,64}-\d{7,12}\.safetensors")


def _own_file(d: Path, name: Any) -> Path | None:
    """``d / name`` when ``name`` is a tensor-file name save_checkpoint could have written
    (no directory part, no ``..``, not absolute), else None."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        return None
    return d / name


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
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (``metadata``: its string header fields)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=metadata)


def save_checkpoint(
    directory: str | Path,
    config: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]],
    step: int,
) -> Path:
    """Save one checkpoint: ``tensors`` maps a file role ("model", "ema", "state", ...) to a
    flat dict of tensors; ``config`` must hold ``kind``. Returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    try:
        old = _read_config(d) if (d / CONFIG).exists() else None
    except CheckpointError:
        old = None  # unreadable: nothing of it is deleted
    files = {}
    for role, flat in tensors.items():
        name = f"{role}-{step:07d}.safetensors"
        atomic_save_tensors(flat, d / name)
        files[role] = name
    full = {
        **config,
        "format": FORMAT_VERSION,
        "guidekit_version": __version__,
        "step": step,
        "files": files,
    }
    atomic_write_bytes(d / CONFIG, json.dumps(full, indent=2, sort_keys=True).encode())
    listed = old.get("files") if isinstance(old, dict) else None
    if isinstance(listed, dict):
        for name in listed.values():
            path = _own_file(d, name)
            # only this checkpoint's own tensor files, never a path the old config names
            if path is not None and name not in files.values() and not path.is_symlink():
                path.unlink(missing_ok=True)
    return d


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


def _read_config(d: Path) -> dict[str, Any]:
    path = d / CONFIG
    try:
        info = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > 1 << 26:
        raise CheckpointError(f"{path} is not a regular file of at most 64 MiB")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"cannot read {d / CONFIG}: {exc}") from None


@dataclass
class Checkpoint:
    """A loaded checkpoint directory: its config and lazily loaded tensor files."""

    path: Path
    config: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.config["kind"]

    @property
    def step(self) -> int:
        return int(self.config.get("step", 0))

    def has(self, role: str) -> bool:
        return role in self.config.get("files", {})

    def module_tensors(self, role: str, name: str) -> dict[str, torch.Tensor]:
        """The state dict of trained module ``name`` within the ``role`` file."""
        return strip_prefix(self.tensors(role), name)

    def tensors(self, role: str) -> dict[str, torch.Tensor]:
        name = self.config.get("files", {}).get(role)
        if name is None:
            raise CheckpointError(f"checkpoint {self.path} has no '{role}' weights")
        path = _own_file(self.path, name)
        if path is None:
            raise CheckpointError(f"{self.path / CONFIG} lists '{str(name)[:80]}' as its "
                                  f"'{role}' file, which is not a checkpoint file name; the "
                                  "checkpoint is damaged or crafted: re-train or restore it")
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            mode = 0
        if not stat.S_ISREG(mode):  # a FIFO, device or link would hang or leave the folder
            raise CheckpointError(f"{path} is missing or not a regular file; the checkpoint "
                                  "is damaged: re-train or restore it")
        try:
            return load_file(path)
        except Exception as exc:
            raise CheckpointError(
                f"cannot read {self.path / name} ({exc}); the checkpoint is damaged: "
                "re-train or restore it"
            ) from None


def strip_prefix(flat: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix.``, with the prefix removed."""
    p = prefix + "."
    return {k[len(p) :]: v for k, v in flat.items() if k.startswith(p)}


def read_checkpoint(path: str | Path, kind: str | tuple[str, ...] | None = None) -> Checkpoint:
    """Open a checkpoint directory and check its kind.

    Raises :class:`CheckpointError` with the fix when the path is missing, is not a guidekit
    checkpoint, or is of another kind.
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
    cfg = _read_config(d)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("kind"), str) or not isinstance(
            cfg.get("files"), dict):
        raise CheckpointError(f"{d / CONFIG} is not a guidekit checkpoint config")
    if kinds and cfg["kind"] not in kinds:
        raise CheckpointError(
            f"{d} is a '{cfg['kind']}' checkpoint, but {what} is needed here"
        )
    return Checkpoint(d, cfg)


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, explaining the first mismatches in one line."""
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    extra = [k for k in tensors if k not in own]
    wrong = [
        f"'{k}' is {tuple(tensors[k].shape)} in the file but {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    problems = wrong[:2] + [f"'{k}' is missing" for k in missing[:2]]
    problems += [f"'{k}' is unexpected" for k in extra[:2]]
    if problems:
        raise CheckpointError(
            f"weights in {source} do not match the model built from its config: "
            + "; ".join(problems)
            + " (was the checkpoint written by another architecture or version?)"
        )
    module.load_state_dict(tensors)
