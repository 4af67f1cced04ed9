"""Memory checks made before anything large is allocated: a model's size from its config
(built on the meta device, so nothing is allocated), the memory a device has, and the one
refusal when a request does not fit."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from guidekit.errors import GuidekitError

__all__ = [
    "available_bytes",
    "check_fits",
    "format_bytes",
    "meta_module",
    "state_bytes",
]


def meta_module(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device: the module's shapes, with no memory behind them. A
    size torch cannot even represent (2**31 channels) is a one-line error."""
    try:
        with torch.device("meta"):
            return build()
    except (RuntimeError, TypeError, OverflowError, ValueError) as exc:
        raise GuidekitError(f"a model of these sizes cannot be built ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:100]}): choose smaller sizes") from None


def state_bytes(module: nn.Module) -> int:
    """Bytes of the module's state dict (parameters and persistent buffers)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def available_bytes(device: torch.device | str) -> int:
    """The memory a device has in all: physical RAM for the CPU, the GPU's total memory
    for CUDA (what other processes hold is not subtracted: it changes while we run)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: no bound
        return 1 << 62


def format_bytes(n: float) -> str:
    """``3.3 GB``, ``200 KB``: a size for a message."""
    if n >= 10**18:  # beyond any machine (and beyond a float, for a fuzzed --n)
        return "over a million TB"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def check_fits(need: int, device: torch.device | str, what: str, fix: str) -> None:
    """Refuse, in one line, a request whose ``need`` bytes exceed the device's memory."""
    have = available_bytes(device)
    if need > have:
        raise GuidekitError(f"{what} needs about {format_bytes(need)}, more than the "
                            f"{format_bytes(have)} of {torch.device(device).type} memory "
                            f"here: {fix}")
