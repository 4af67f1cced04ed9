"""The training loop every trainer shares: AdamW, EMA, grad clipping, bf16 autocast,
atomic resumable checkpoints, a JSONL metrics log, a rich progress bar, and torchrun.

Randomness is a pure function of (seed, rank, step): the batch order comes from a per-epoch
permutation and the noise from a per-step generator, so ``--resume`` continues the very same
streams and a resumed run matches an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from guidekit import distributed
from guidekit.checkpoint import load_weights, read_checkpoint, save_checkpoint, strip_prefix
from guidekit.data import ImageData
from guidekit.errors import CheckpointError, GuidekitError

__all__ = [
    "FitResult",
    "METRICS",
    "Task",
    "TrainConfig",
    "batch_indices",
    "ema_decay_at",
    "ema_update",
    "fit",
]


METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    """How to train: optimiser, EMA, precision, checkpoint and log cadence, device, seed."""
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    bf16: bool = False
    compile: bool = False
    seed: int = 0
    log_every: int = 50
    save_every: int = 500
    device: str | None = "auto"  # auto (or None): this rank's GPU if there is one, else CPU

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise GuidekitError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise GuidekitError("--ema-decay must be in [0, 1)")


class Task(Protocol):
    """What a trainer supplies to :func:`fit`."""

    kind: str  # the checkpoint kind ("ddpm", "classifier", ...)

    def trainable(self) -> dict[str, nn.Module]:
        """The modules to optimise, average (EMA) and save, by name."""
        ...

    def loss(
        self, nets: dict[str, nn.Module], x0: Tensor, labels: Tensor | None, gen: torch.Generator
    ) -> Tensor:
        """The scalar loss of one batch; ``nets`` may be DDP-wrapped; draw noise from ``gen``."""
        ...

    def config(self) -> dict[str, Any]:
        """What config.json records (architecture, schedule, data, method options)."""
        ...


@dataclass
class FitResult:
    step: int
    loss: float
    seconds: float
    images_per_second: float
    checkpoint: Path
    is_main: bool = True  # rank 0 (or a single process): the one that writes
    history: list[dict[str, float]] = field(default_factory=list)


def _mix(*xs: int) -> int:
    """A 63-bit seed from several integers (splitmix64-style), so streams never collide."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> Tensor:
    """The global batch of ``step``: a slice of this epoch's seeded permutation."""
    per_epoch = max(n // batch_size, 1)
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))
    if n < batch_size:  # tiny datasets: repeat the permutation to fill a batch
        perm = perm.repeat(math.ceil(batch_size / n))
    return perm[j * batch_size : (j + 1) * batch_size]


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    flat = {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items()}
    return flat, {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, flat: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def ema_decay_at(decay: float, n_averaged: int) -> float:
    """The EMA decay of update number ``n_averaged``: min(decay, (1+n)/(10+n)).

    The warm-up keeps short runs from averaging in their random initial weights: with a flat
    0.99 over 200 steps, 13% of a model would still be its initialisation.
    """
    return min(decay, (1 + n_averaged) / (10 + n_averaged))


def ema_update(decay: float):
    """``multi_avg_fn`` for :class:`AveragedModel`: ema ← ema + (1−d)(param − ema)."""

    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], n_averaged: Tensor) -> None:
        # ema_decay_at on the device's counter: no host sync in the training loop
        d = ((1 + n_averaged) / (10 + n_averaged)).clamp(max=decay).to(ema_params[0].dtype)
        torch._foreach_lerp_(ema_params, params, 1 - d)

    return update


def fit(
    task: Task,
    data: ImageData,
    out: str | Path,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    """Train ``task`` on ``data`` and keep its checkpoint in ``out`` (rank 0 writes)."""
    out = Path(out)
    info = distributed.setup(cfg.device)
    if cfg.batch_size % info.world_size:
        raise GuidekitError(
            f"--batch-size {cfg.batch_size} must be divisible by the {info.world_size} processes"
        )
    nets = {k: m.to(info.device) for k, m in task.trainable().items()}
    ema = {
        k: AveragedModel(m, multi_avg_fn=ema_update(cfg.ema_decay), use_buffers=True)
        for k, m in nets.items()
    }
    params = [p for m in nets.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    config = {**task.config(), "kind": task.kind, "train": asdict(cfg)}

    start = 0
    if (out / "config.json").exists() and not resume:
        raise CheckpointError(
            f"{out} already holds a checkpoint: pass --resume to continue it, or choose "
            "another --out"
        )
    if resume:
        start = _resume(out, task, nets, ema, opt, config)

    run_nets: dict[str, nn.Module] = {
        k: DistributedDataParallel(m) if info.enabled else m for k, m in nets.items()
    }
    if cfg.compile:
        run_nets = {k: torch.compile(m) for k, m in run_nets.items()}
    images = data.images
    labels = data.labels
    local_b = cfg.batch_size // info.world_size
    flag = torch.zeros((), device=info.device)  # set when a loss is not finite; read at log time
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    loss_value = float("nan")
    last_log_t, last_log_step = t0, start
    bar = Progress(
        TextColumn(f"[bold]train {task.kind}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not (progress and info.is_main),
    )
    with bar:
        bar_id = bar.add_task("train", total=cfg.steps, completed=start, loss="-")
        for step in range(start, cfg.steps):
            idx = batch_indices(len(images), cfg.batch_size, cfg.seed, step)
            idx = idx[info.rank * local_b : (info.rank + 1) * local_b]
            x0 = images[idx].to(info.device, non_blocking=True)
            y = labels[idx].to(info.device) if labels is not None else None
            gen = torch.Generator(info.device).manual_seed(_mix(cfg.seed, info.rank, step, 1))
            torch.manual_seed(_mix(cfg.seed, info.rank, step, 2))  # dropout and the like
            for m in run_nets.values():
                m.train()
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = task.loss(run_nets, x0, y, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            for k in ema:
                ema[k].update_parameters(nets[k])
            flag = torch.maximum(flag, (~torch.isfinite(loss.detach())).float())
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps or done % cfg.save_every == 0:
                if flag.item() > 0:
                    raise GuidekitError(
                        f"loss became NaN/inf by step {done}: lower --lr or enable "
                        f"--grad-clip; the last good checkpoint in {out} is kept "
                        "(continue it with --resume)"
                    )
                loss_value = float(loss.detach())
                now = time.perf_counter()
                rate = (done - last_log_step) * cfg.batch_size / max(now - last_log_t, 1e-9)
                last_log_t, last_log_step = now, done
                rec = {
                    "step": done,
                    "loss": loss_value,
                    "grad_norm": float(grad_norm),
                    "lr": cfg.lr,
                    "images_per_s": rate,
                    "time": now - t0,
                }
                history.append(rec)
                if info.is_main:
                    out.mkdir(parents=True, exist_ok=True)
                    with open(out / METRICS, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                bar.update(bar_id, completed=done, loss=f"{loss_value:.4f}")
            if (done % cfg.save_every == 0 or done == cfg.steps) and info.is_main:
                _save(out, config, nets, ema, opt, done)
    seconds = time.perf_counter() - t0
    _check_ranks_agree(info, nets)
    distributed.teardown(info)
    return FitResult(
        step=cfg.steps,
        loss=loss_value,
        seconds=seconds,
        images_per_second=(cfg.steps - start) * cfg.batch_size / max(seconds, 1e-9),
        checkpoint=out,
        is_main=info.is_main,
        history=history,
    )


def _save(out: Path, config: dict, nets: dict, ema: dict, opt, step: int) -> None:
    optim_flat, optim_meta = _optimizer_tensors(opt)
    tensors: dict[str, dict[str, Tensor]] = {"model": {}, "ema": {}, "state": {}}
    for k, m in nets.items():
        tensors["model"].update({f"{k}.{n}": v for n, v in m.state_dict().items()})
        tensors["ema"].update({f"{k}.{n}": v for n, v in ema[k].module.state_dict().items()})
        tensors["state"][f"ema_n_averaged.{k}"] = ema[k].n_averaged
    tensors["state"].update({f"optim.{n}": v for n, v in optim_flat.items()})
    save_checkpoint(out, {**config, "optimizer": optim_meta}, tensors, step)


def _resume(out: Path, task: Task, nets: dict, ema: dict, opt, config: dict) -> int:
    if not (out / "config.json").exists():
        raise CheckpointError(f"nothing to resume in {out}: no checkpoint there yet")
    ckpt = read_checkpoint(out, task.kind)
    for key in config:
        if key not in ("train",) and ckpt.config.get(key) != config[key]:
            raise CheckpointError(
                f"cannot resume {out}: its '{key}' settings differ from this run's; use the "
                "same options as the first run, or another --out"
            )
    model, avg, state = ckpt.tensors("model"), ckpt.tensors("ema"), ckpt.tensors("state")
    for k, m in nets.items():
        load_weights(m, strip_prefix(model, k), str(out))
        load_weights(ema[k].module, strip_prefix(avg, k), str(out))
        ema[k].n_averaged.copy_(state[f"ema_n_averaged.{k}"])
    _load_optimizer(opt, strip_prefix(state, "optim"), ckpt.config["optimizer"])
    return ckpt.step


def _check_ranks_agree(info: distributed.DistInfo, nets: dict[str, nn.Module]) -> None:
    if not info.enabled:
        return
    checksum = torch.stack(
        [p.detach().double().sum() for m in nets.values() for p in m.parameters()]
    )
    if not distributed.agree(info, checksum):
        raise GuidekitError("ranks disagree on the trained weights: please report this bug")
