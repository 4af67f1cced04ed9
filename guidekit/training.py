"""The training loop every trainer shares: AdamW, EMA, grad clipping, bf16 autocast,
atomic resumable checkpoints, a JSONL metrics log, a rich progress bar, and torchrun.

Randomness is a pure function of (seed, rank, step): the batch order comes from a per-epoch
permutation and the noise from a per-step generator, so ``--resume`` continues the very same
streams and a resumed run matches an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from guidekit import distributed
from guidekit.checkpoint import (
    CONFIG,
    load_weights,
    read_checkpoint,
    save_checkpoint,
    strip_prefix,
    writer_lock,
)
from guidekit.data import ImageData
from guidekit.distributed import resolve_device
from guidekit.errors import CheckpointError, GuidekitError, Interrupted
from guidekit.memory import check_fits, meta_module, state_bytes
from guidekit.options import check_seed

__all__ = [
    "FitResult",
    "METRICS",
    "Task",
    "TrainConfig",
    "batch_indices",
    "check_trainable",
    "ema_decay_at",
    "ema_update",
    "fit",
    "make_adamw",
    "native_bf16",
]


METRICS = "metrics.jsonl"
MAX_STEPS = 10**9
MAX_BATCH = 1 << 16
# Bytes a trained parameter costs: the weights, their EMA, the gradient, AdamW's two moments.
_TRAIN_COPIES = 5
# What --resume may change, applied from the step it resumes at (recorded in the metrics
# log); the rest of the run (seed, batch size, ...) must match the first run's.
RESUMABLE = ("steps", "lr", "weight_decay", "ema_decay", "grad_clip", "bf16", "compile",
             "log_every", "save_every", "device")


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
        for name, high in (("steps", MAX_STEPS), ("batch_size", MAX_BATCH),
                           ("log_every", MAX_STEPS), ("save_every", MAX_STEPS)):
            v = getattr(self, name)
            if not 1 <= v <= high:
                raise GuidekitError(f"--{name.replace('_', '-')} must be in 1..{high}, got {v}")
        check_seed(self.seed)
        # beyond these, AdamW's float32 step arithmetic overflows: no run means them
        if not 0 <= self.lr <= 1e3:
            raise GuidekitError(f"--lr must be a number in [0, 1000], got {self.lr}")
        if not 0 <= self.weight_decay <= 1e3:
            raise GuidekitError(f"--weight-decay must be a number in [0, 1000], got "
                                f"{self.weight_decay}")
        if not self.grad_clip > 0:  # inf is allowed: no clipping
            raise GuidekitError(f"--grad-clip must be > 0 (inf: no clipping), got "
                                f"{self.grad_clip}")
        if not 0 <= self.ema_decay < 1:
            raise GuidekitError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")


class Task(Protocol):
    """What a trainer supplies to :func:`fit`. A task with frozen networks in its loss may
    also define ``compile_frozen()``, which ``compile=True`` calls to compile them."""

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


_ADAMW_STATE = frozenset({"step", "exp_avg", "exp_avg_sq"})  # per parameter, amsgrad off


def _load_optimizer(opt: torch.optim.Optimizer, flat: dict[str, Tensor]) -> None:
    """Load AdamW's per-parameter state. Its hyperparameters (lr, betas, eps, ...) are this
    run's, never config.json's: a crafted param group would reach ``opt.step()`` unchecked.
    """
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    params = [p for group in opt.param_groups for p in group["params"]]
    for i, st in state.items():  # load_state_dict checks no shapes: a wrong one fails later
        if not 0 <= i < len(params) or set(st) != _ADAMW_STATE:
            raise ValueError(f"optimizer state {i} is not AdamW's for the model's parameters")
        step = st["step"]
        if step.numel() != 1 or not bool(torch.isfinite(step).all()) or float(step) < 0:
            raise ValueError(f"optimizer state {i} has a bad step count")
        if st["exp_avg"].shape != params[i].shape or st["exp_avg_sq"].shape != params[i].shape:
            raise ValueError(f"optimizer state {i} does not fit the model's parameters")
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def ema_decay_at(decay: float, n_averaged: int) -> float:
    """The EMA decay of update number ``n_averaged``: min(decay, (1+n)/(10+n)).

    The warm-up keeps short runs from averaging in their random initial weights: with a flat
    0.99 over 200 steps, 13% of a model would still be its initialisation.
    """
    return min(decay, (1 + n_averaged) / (10 + n_averaged))


def make_adamw(params: list[Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where torch has one for these tensors (float
    parameters on CPU or CUDA): the per-tensor loop costs ~8 ms a step on a 1.4M-parameter
    UNet on two CPU cores. Its state is the same, so checkpoints and resumes don't change."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (a CUDA GPU with bf16, a CPU with AMX), so
    bf16 autocast speeds training up rather than emulating bf16 in float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu" and hasattr(torch.cpu, "get_capabilities"):
        return bool(torch.cpu.get_capabilities().get("amx_bf16", False))
    return False


def ema_update(decay: float):
    """``multi_avg_fn`` for :class:`AveragedModel`: ema ← ema + (1−d)(param − ema)."""

    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], n_averaged: Tensor) -> None:
        # ema_decay_at on the device's counter: no host sync in the training loop
        d = ((1 + n_averaged) / (10 + n_averaged)).clamp(max=decay).to(ema_params[0].dtype)
        torch._foreach_lerp_(ema_params, params, 1 - d)

    return update


def check_trainable(build: Callable[[], nn.Module], config: TrainConfig, what: str,
                    fix: str) -> None:
    """Refuse, before anything is allocated, a network ``build()`` makes that could not be
    trained on the run's device: its weights, EMA, gradients and AdamW moments must fit."""
    need = _TRAIN_COPIES * state_bytes(meta_module(build))
    check_fits(need, resolve_device(config.device), f"training {what}", fix)


def fit(
    task: Task,
    data: ImageData,
    out: str | Path,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    """Train ``task`` on ``data`` and keep its checkpoint in ``out`` (rank 0 writes).

    Rank 0 holds ``out``'s writer lock for the whole run, so a second run on the same
    ``out`` is refused. Ctrl-C or SIGTERM stops at once with :class:`Interrupted`, whose
    message names the step of the checkpoint kept; nothing is ever half-written.
    """
    out = Path(out)
    info = distributed.setup(cfg.device)
    if cfg.batch_size % info.world_size:
        raise GuidekitError(
            f"--batch-size {cfg.batch_size} must be divisible by the {info.world_size} processes"
        )
    lock = writer_lock(out) if info.is_main else contextlib.nullcontext()
    with lock, _signals_interrupt():
        try:
            return _fit(task, data, out, cfg, info, resume, progress)
        except KeyboardInterrupt as exc:  # before the first step: nothing new was saved
            raise Interrupted(f"interrupted before training started; nothing new was written "
                              f"to {out}", exit_code=_exit_code(exc)) from None


def _fit(task: Task, data: ImageData, out: Path, cfg: TrainConfig,
         info: distributed.DistInfo, resume: bool, progress: bool) -> FitResult:
    nets = {k: m.to(info.device) for k, m in task.trainable().items()}
    ema = {
        k: AveragedModel(m, multi_avg_fn=ema_update(cfg.ema_decay), use_buffers=True)
        for k, m in nets.items()
    }
    params = [p for m in nets.values() for p in m.parameters() if p.requires_grad]
    opt = make_adamw(params, cfg.lr, cfg.weight_decay)
    config = {**task.config(), "kind": task.kind, "train": asdict(cfg)}

    start = 0
    if (out / CONFIG).exists() and not resume:
        raise CheckpointError(
            f"{out} already holds a checkpoint: pass --resume to continue it, or choose "
            "another --out"
        )
    if resume:
        start = _resume(out, task, nets, ema, opt, config, cfg, info.is_main)
    saved: int | None = start if resume else None  # the step of the checkpoint on disk

    run_nets: dict[str, nn.Module] = {
        k: DistributedDataParallel(m) if info.enabled else m for k, m in nets.items()
    }
    if cfg.compile:
        run_nets = {k: torch.compile(m) for k, m in run_nets.items()}
        compile_frozen = getattr(task, "compile_frozen", None)
        if compile_frozen is not None:  # a task's frozen networks (PDAE's ε_θ) compile too
            compile_frozen()
    images = data.images
    labels = data.labels
    local_b = cfg.batch_size // info.world_size
    flag = torch.zeros((), device=info.device)  # set when a loss is not finite; read at log time
    history: list[dict[str, float]] = []
    for m in run_nets.values():  # once: a module tree walk per step costs ~2 ms at this size
        m.train()
    t0 = time.perf_counter()
    loss_value = float("nan")
    last_log_t, last_log_step = t0, start
    done = start
    bar = Progress(
        TextColumn(f"[bold]train {task.kind}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not (progress and info.is_main),
    )
    try:
        with bar:
            bar_id = bar.add_task("train", total=cfg.steps, completed=start, loss="-")
            for step in range(start, cfg.steps):
                idx = batch_indices(len(images), cfg.batch_size, cfg.seed, step)
                idx = idx[info.rank * local_b : (info.rank + 1) * local_b]
                x0 = images[idx].to(info.device, non_blocking=True)
                y = labels[idx].to(info.device) if labels is not None else None
                gen = torch.Generator(info.device).manual_seed(
                    _mix(cfg.seed, info.rank, step, 1))
                torch.manual_seed(_mix(cfg.seed, info.rank, step, 2))  # dropout and the like
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
                        raise GuidekitError(f"loss became NaN/inf by step {done}: lower --lr or "
                                            f"--grad-clip; {_kept(out, saved)}")
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
                        _log(out, rec, saved)
                    bar.update(bar_id, completed=done, loss=f"{loss_value:.4f}")
                if done % cfg.save_every == 0 or done == cfg.steps:
                    with _signals_deferred():  # a stop mid-save would misname the kept step
                        if info.is_main:
                            _save(out, config, nets, ema, opt, done, saved)
                        saved = done
    except KeyboardInterrupt as exc:
        raise Interrupted(f"interrupted at step {done} of {cfg.steps}; {_kept(out, saved)}",
                          exit_code=_exit_code(exc)) from None
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


def _kept(out: Path, saved: int | None) -> str:
    """What the user has after a failed or stopped run, for its one-line message."""
    if saved is None:
        return f"no checkpoint was written to {out}"
    return f"the checkpoint of step {saved} in {out} is kept (continue it with --resume)"


def _exit_code(exc: KeyboardInterrupt) -> int:
    """130 for Ctrl-C; 128 + the signal number that :func:`_signals_interrupt` raised."""
    return exc.args[0] if exc.args and isinstance(exc.args[0], int) else 130


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block is done (delivered right after it)."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    mask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        mask(signal.SIG_UNBLOCK, held)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM (``kill``, a job scheduler) stop training, exit status
    130 and 143. Both are set explicitly: a process started in the background of a script
    inherits SIGINT ignored, and Python then never raises KeyboardInterrupt, so a run one
    means to stop would train on and exit 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _log(out: Path, rec: dict[str, Any], saved: int | None) -> None:
    try:
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(rec) + "\n")
    except OSError as exc:
        raise GuidekitError(f"cannot write {out / METRICS}: {exc.strerror}; "
                            f"{_kept(out, saved)}") from None


def _save(out: Path, config: dict, nets: dict, ema: dict, opt, step: int,
          saved: int | None) -> None:
    optim_flat, optim_meta = _optimizer_tensors(opt)
    tensors: dict[str, dict[str, Tensor]] = {"model": {}, "ema": {}, "state": {}}
    for k, m in nets.items():
        tensors["model"].update({f"{k}.{n}": v for n, v in m.state_dict().items()})
        tensors["ema"].update({f"{k}.{n}": v for n, v in ema[k].module.state_dict().items()})
        tensors["state"][f"ema_n_averaged.{k}"] = ema[k].n_averaged
    tensors["state"].update({f"optim.{n}": v for n, v in optim_flat.items()})
    try:
        save_checkpoint(out, {**config, "optimizer": optim_meta}, tensors, step)
    except CheckpointError as exc:  # non-finite weights or optimizer state: never saved
        raise GuidekitError(f"{exc}: lower --lr or --grad-clip; {_kept(out, saved)}"
                            ) from None
    except OSError as exc:  # disk full, folder gone or read-only
        raise GuidekitError(f"cannot save step {step} in {out}: {exc.strerror or exc}: free "
                            f"disk space or fix the folder; {_kept(out, saved)}") from None


def _resume(out: Path, task: Task, nets: dict, ema: dict, opt, config: dict,
            cfg: TrainConfig, is_main: bool) -> int:
    if not (out / CONFIG).exists():
        raise CheckpointError(f"nothing to resume in {out}: no checkpoint there yet")
    ckpt = read_checkpoint(out, task.kind)
    for key in config:
        if key not in ("train",) and ckpt.config.get(key) != config[key]:
            raise CheckpointError(
                f"cannot resume {out}: its '{key}' settings differ from this run's; use the "
                "same options as the first run, or another --out"
            )
    if cfg.steps <= ckpt.step:
        raise GuidekitError(f"{out} is already trained to step {ckpt.step}: give --steps "
                            f"above {ckpt.step} to train it further")
    first = ckpt.config.get("train")
    first = first if isinstance(first, dict) else {}
    now = asdict(cfg)
    fixed = [k for k in now if k not in RESUMABLE and k in first and first[k] != now[k]]
    if fixed:
        k = fixed[0]
        raise CheckpointError(f"cannot resume {out} with --{k.replace('_', '-')} {now[k]}: "
                              f"the first run used {first[k]}, and it shapes the data and "
                              "noise streams; resume with the same, or use another --out")
    try:
        model, avg, state = ckpt.tensors("model"), ckpt.tensors("ema"), ckpt.tensors("state")
        for k, m in nets.items():
            load_weights(m, strip_prefix(model, k), str(out))
            load_weights(ema[k].module, strip_prefix(avg, k), str(out))
            ema[k].n_averaged.copy_(state[f"ema_n_averaged.{k}"])
        _load_optimizer(opt, strip_prefix(state, "optim"))
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume {out}: its optimizer state does not match this "
                              f"run ({type(exc).__name__}: {str(exc)[:100]}); the checkpoint "
                              "is damaged or from another version") from None
    changed = {k: [first.get(k), now[k]] for k in RESUMABLE if first.get(k) != now[k]}
    if changed and is_main:
        _log(out, {"step": ckpt.step, "resumed": True, "changed": changed}, ckpt.step)
    return ckpt.step


def _check_ranks_agree(info: distributed.DistInfo, nets: dict[str, nn.Module]) -> None:
    if not info.enabled:
        return
    checksum = torch.stack(
        [p.detach().double().sum() for m in nets.values() for p in m.parameters()]
    )
    if not distributed.agree(info, checksum):
        raise GuidekitError("ranks disagree on the trained weights: please report this bug")
