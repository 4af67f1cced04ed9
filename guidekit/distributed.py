"""torch.distributed set-up for ``torchrun``: gloo on CPU, NCCL on GPU; rank 0 writes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from guidekit.errors import GuidekitError

if TYPE_CHECKING:  # torch loads on first use: `guidekit --help` must not import it
    import torch

__all__ = [
    "DEFAULT_DEVICE",
    "DistInfo",
    "agree",
    "is_main_process",
    "resolve_device",
    "setup",
    "teardown",
]



def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=_cpu)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` launch, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


DEFAULT_DEVICE = "auto"


def resolve_device(device: str | torch.device | None = DEFAULT_DEVICE) -> torch.device:
    """The one reading of ``--device``: ``auto`` (or None) is this rank's GPU when CUDA is
    available, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` are taken as given, once
    checked. Anything else is a one-line error."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device is not None and not isinstance(device, str):
        raise GuidekitError(f"device must be a name like cpu or cuda:0, got {device!r}")
    if device is not None and not device.strip():
        # typer hands `--device ''` over as ''; reading it as auto would hide the mistake
        raise GuidekitError("--device is empty: use auto, cpu, cuda or cuda:N")
    spec = (device or DEFAULT_DEVICE).strip().lower()
    if spec == "auto":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise GuidekitError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GuidekitError(f"--device {device} was asked for, but no CUDA GPU is "
                                "available: use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise GuidekitError(f"--device {device}: there are only {count} CUDA GPUs: use "
                                f"cuda:0..cuda:{count - 1}")
    return dev


def setup(device: str | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def agree(info: DistInfo, value: torch.Tensor) -> bool:
    """True when every rank holds the same ``value`` (a small tensor, e.g. a checksum)."""
    import torch
    import torch.distributed as dist

    if not info.enabled:
        return True
    lo, hi = value.clone(), value.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def teardown(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
