"""guidekit's DDIM sampler against diffusers' DDIMPipeline on the same UNet2DModel weights.

A diffusers ``UNet2DModel`` of google/ddpm-cifar10-32's shape (35.7M parameters) is built with
seeded random weights beside a ``DDPMScheduler(num_train_timesteps=1000,
beta_schedule="linear")``, saved as a ``DDPMPipeline`` folder, converted with
``guidekit.convert_diffusers`` and loaded with ``guidekit.ddpm.load_dpm``. Both sides then
sample DDIM (η = 0, clipped x̂_0) from the same initial noise:

- guidekit: ``dpm.sampler(steps=respacing("ddim", K), clip_x0=True).ddim(x_T)``, its samples
  mapped as the pipeline maps its own, ``(x / 2 + 0.5).clamp(0, 1)`` to a NHWC numpy array;
- diffusers: ``DDIMPipeline(unet, DDIMScheduler.from_config(...))`` called as users call it,
  ``pipe(batch_size=B, generator=..., num_inference_steps=K, eta=0.0,
  use_clipped_model_output=True, output_type="np")``: the pipeline's own ``__call__`` is timed.

It prints, all measured in one run:

1. images/s of each side, eager, and the ratio guidekit / diffusers;
2. the same with ``torch.compile``: guidekit's compiled step ops (``compile=True``) and a
   compiled UNet, and the pipeline with ``torch.compile(unet)``; compilation is done and timed
   before the timed rounds. The variants alternate A B C D in every round; medians;
3. host syncs per step of each side, eager: device→host reads counted with a
   ``TorchDispatchMode`` over one sampling run (see ``HostReadCounter``);
4. max |guidekit − diffusers| of the final samples (FAILED and exit status 1 above ``--tol``).

    python benchmarks/bench_diffusers.py                   # the CIFAR-10 model, batch 16, DDIM-50
    python benchmarks/bench_diffusers.py --tiny            # smoke run: small UNet, 10 steps
    python benchmarks/bench_diffusers.py --repeats 3 --no-diffusers-compile --json > df.json
    python benchmarks/bench_diffusers.py --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_step import cuda_missing, machine_info  # this folder is on sys.path when run as a script
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode

# diffusers is imported lazily, after this: a local folder only, never the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"

# google/ddpm-cifar10-32's unet/config.json, the fields that shape the network.
CIFAR10_UNET = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": None,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
}
# --tiny: two levels (attention on the second), one ResNet per level, 16×16.
TINY_UNET = {
    **CIFAR10_UNET,
    "sample_size": 16,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}
# (batch, steps, repeats) when not given; repeats None: as many rounds as --budget-s allows.
DEFAULTS = {"full": (16, 50, None), "tiny": (4, 10, 3)}
MAX_AUTO_ROUNDS = 3
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL_FP32, TOL_HALF = 1e-4, 5e-2
VARIANTS = ("guidekit eager", "diffusers eager", "guidekit compiled", "diffusers compiled")
SEED_WEIGHTS, SEED_NOISE = 0, 1


# --------------------------------------------------------------------------- sync counting


class HostReadCounter(TorchDispatchMode):
    """Counts the ATen calls that read a tensor's value back to the host.

    ``aten._local_scalar_dense`` is what ``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``,
    ``if t:`` and indexing with a 0-dim tensor dispatch to; ``aten.nonzero`` (and
    ``torch.where(mask)``), ``aten.index`` with a boolean mask and ``aten.masked_select``
    must learn their output size; ``aten.equal`` and ``aten.is_nonzero`` return Python
    values. On CUDA each such read of a CUDA tensor waits for the GPU; a read of a CPU tensor
    does not, so the tensor's device is recorded with each count. Copies between the CPU and
    a device are counted too: ``d2h copy`` (device to CPU) and ``h2d copy`` (a blocking
    CPU-to-device copy, ``.to(device)`` of a CPU tensor, which torch follows with a stream
    synchronisation); a CPU run has none. Each count also records the innermost Python frame
    outside torch that made it.
    """

    OPS = ("_local_scalar_dense", "nonzero", "equal", "is_nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self._packets = {getattr(torch.ops.aten, name): name for name in self.OPS}
        self._copies = (torch.ops.aten._to_copy, torch.ops.aten.copy_)

    @staticmethod
    def _site() -> str:
        here = os.path.abspath(__file__)
        for frame in reversed(traceback.extract_stack()[:-3]):
            path = frame.filename.replace(os.sep, "/")
            if "/torch/" in path or os.path.abspath(frame.filename) == here:
                continue
            return f"{'/'.join(path.split('/')[-2:])}:{frame.lineno} ({frame.name})"
        return "?"

    def _record(self, name: str, device: torch.device | None) -> None:
        key = f"{name} [{'?' if device is None else device.type}]"
        self.counts[key] += 1
        self.sites[f"{key} at {self._site()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        name = self._packets.get(packet)
        if name is not None:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self._record(name, None if first is None else first.device)
        elif packet is torch.ops.aten.index and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in (args[1] if len(args) > 1 else ())
        ):  # boolean-mask indexing: its nonzero runs inside the kernel, unseen here
            self._record("index (bool mask)", args[0].device)
        elif packet is torch.ops.aten.masked_select:
            self._record("masked_select", args[0].device)
        elif packet in self._copies:
            if packet is torch.ops.aten._to_copy:
                src, dst = args[0], kwargs.get("device")
                non_blocking = kwargs.get("non_blocking", False)
            else:
                src, dst = args[1], args[0].device
                non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            if isinstance(src, torch.Tensor) and dst is not None:
                dst = torch.device(dst)
                if src.device.type != "cpu" and dst.type == "cpu":
                    self._record("d2h copy", src.device)
                elif src.device.type == "cpu" and dst.type != "cpu" and not non_blocking:
                    self._record("h2d copy", dst)
        return func(*args, **kwargs)


def count_syncs(run: Callable[[], Any], steps: int, batch: int) -> dict[str, Any]:
    """Host reads during one call of ``run`` (a sampling run of ``steps`` steps)."""
    t0 = time.perf_counter()
    with HostReadCounter() as counter:
        run()
    total = sum(counter.counts.values())
    return {
        "batch": batch,
        "steps": steps,
        "total": total,
        "per_step": total / steps,
        "by_op": dict(sorted(counter.counts.items())),
        "sites": [{"site": s, "count": n} for s, n in counter.sites.most_common()],
        "run_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- building


def build_models(unet_cfg: dict[str, Any], folder: Path, device: torch.device) -> tuple:
    """(diffusers UNet2DModel, its DDPMScheduler, guidekit DPM) on the same weights: the
    UNet is saved as a DDPMPipeline folder, which guidekit converts and loads."""
    import diffusers

    from guidekit.convert_diffusers import convert_diffusers
    from guidekit.ddpm import load_dpm

    torch.manual_seed(SEED_WEIGHTS)
    unet = diffusers.UNet2DModel(**unet_cfg).eval()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder / "pipe")
    convert_diffusers(folder / "pipe", folder / "guidekit", force=True)
    dpm = load_dpm(folder / "guidekit", device=device)
    unet.to(device).requires_grad_(False)
    return unet, scheduler, dpm


def ddim_pipeline(unet, scheduler) -> Any:
    import diffusers

    pipe = diffusers.DDIMPipeline(
        unet=unet, scheduler=diffusers.DDIMScheduler.from_config(scheduler.config)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddim_timesteps(scheduler, steps: int) -> torch.Tensor:
    """The timesteps DDIMPipeline walks (in its order) for ``steps`` steps."""
    import diffusers

    ddim = diffusers.DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    return ddim.timesteps


# --------------------------------------------------------------------------- the runs


def initial_noise(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """What the pipeline draws from ``torch.Generator().manual_seed(SEED_NOISE)`` (a CPU
    generator: drawn on the CPU, then moved to the device)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(SEED_NOISE)).to(device)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """guidekit's samples mapped as DDIMPipeline maps its own (output_type="np")."""
    return (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()


def guidekit_call(engine, shape, device, autocast) -> Callable[[], np.ndarray]:
    """One guidekit sampling run as a user would write it: noise, ddim(), to numpy."""

    def run() -> np.ndarray:
        with autocast():
            return to_numpy(engine.ddim(initial_noise(shape, device)))

    return run


def diffusers_call(pipe, batch: int, steps: int, autocast) -> Callable[[], np.ndarray]:
    """One call of the pipeline (it draws the noise and returns numpy itself)."""

    def run() -> np.ndarray:
        with autocast():
            return pipe(
                batch_size=batch,
                generator=torch.Generator().manual_seed(SEED_NOISE),
                num_inference_steps=steps,
                eta=0.0,
                use_clipped_model_output=True,
                output_type="np",
            ).images

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:300]


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def compile_guidekit(dpm, spec, shape, device, autocast) -> tuple[Callable, dict[str, float]]:
    """guidekit with compiled step ops and a compiled UNet, compiled here (not in a timed run).

    The compiled module forwards ``down``/``middle_up`` to the eager UNet, so the Sampler gets
    a plain callable, which it calls whole. The UNet is compiled by one forward call; the
    step ops by one sampling run in which a stand-in returns zeros as ε (no UNet cost), of the
    dtype the UNet returns, so the timed runs meet the same shapes and dtypes.
    """
    from guidekit.engine import Sampler

    net = torch.compile(dpm.model, dynamic=False)
    slot: list[Callable] = [net]
    engine = Sampler(lambda x, t: slot[0](x, t), dpm.schedule, steps=spec, clip_x0=True,
                     compile=True)
    x = initial_noise(shape, device)
    k = torch.full((shape[0],), engine.num_steps - 1, dtype=torch.long)
    t = engine.schedule.timesteps.cpu()[k].to(device)
    with torch.no_grad(), autocast():  # as Sampler.ddim calls it (grad mode is guarded)
        unet_s, eps = timed(lambda: net(x, t), device)
    slot[0] = lambda x, t: torch.zeros_like(x, dtype=eps.dtype)
    try:
        with autocast():
            steps_s, _ = timed(lambda: engine.ddim(x), device)
    finally:
        slot[0] = net
    return guidekit_call(engine, shape, device, autocast), {
        "compile_unet_s": unet_s, "compile_steps_s": steps_s, "compile_s": unet_s + steps_s}


def compile_diffusers(unet, scheduler, shape, steps, device, autocast
                      ) -> tuple[Callable, dict[str, float]]:
    """The pipeline with ``torch.compile(unet)``, compiled by one forward call with what the
    pipeline passes (its noise's shape and dtype, a 0-dim timestep from its scheduler)."""
    net = torch.compile(unet, dynamic=False)
    pipe = ddim_pipeline(net, scheduler)
    x = initial_noise(shape, device).to(unet.dtype)
    t = ddim_timesteps(scheduler, steps)[0]
    with torch.no_grad(), autocast():  # as the pipeline calls it (grad mode is guarded)
        unet_s, _ = timed(lambda: net(x, t), device)
    return diffusers_call(pipe, shape[0], steps, autocast), {
        "compile_unet_s": unet_s, "compile_s": unet_s}


def dynamo_graphs() -> int:
    """Graphs dynamo has compiled so far in this process."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# --------------------------------------------------------------------------- reporting


def load_warnings(m: dict[str, Any]) -> list[str]:
    out = []
    # Before the run the load is others'; by the end it includes this run's own threads.
    for when, limit in (("start", 0.5), ("end", 1.0)):
        load = m.get(f"loadavg_{when}")
        if load is not None and m["cpus"] and load > limit * m["cpus"]:
            out.append(
                f"warning: 1-min load average {load} at {when} on {m['cpus']} CPUs: other "
                "processes compete for the cores and the timings are unreliable"
            )
    return out


def fmt(x: float | None, spec: str = ".3f", suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def print_tables(console: Console, result: dict[str, Any]) -> None:
    m, c = result["machine"], result["config"]
    console.print(
        f"guidekit DDIM vs diffusers DDIMPipeline — torch {m['torch']}, diffusers "
        f"{m['diffusers']}, device {m['device']}" + (f" ({m['gpu']})" if "gpu" in m else "")
        + f", {m['threads']} torch threads on {m['cpus']} CPUs ({m['processor']}), load "
        f"average {m.get('loadavg_start')} at start, {m.get('loadavg_end')} at end",
        markup=False, style="bold",
    )
    console.print(
        f"model {c['model']} ({c['params']:,} params, random weights seed {SEED_WEIGHTS}), "
        f"batch {c['batch']}, DDIM-{c['steps']} (eta 0, clipped x̂_0), {c['dtype']}"
        f"{' under autocast' if c['dtype'] != 'float32' else ''}, {c['rounds']} round(s) "
        f"({c['rounds_rule']}), conversion {c['convert_s']:.1f} s, wall {result['wall_s']:.0f} s",
        markup=False,
    )
    for w in load_warnings(m):
        console.print(w, style="yellow", markup=False)

    t = Table(title="images/s of one sampling run (median over rounds; variants alternate in "
                    "every round)")
    for col in ("variant", "images/s", "s per run", "runs (s)", "compile s", "vs diffusers eager"):
        t.add_column(col, justify="left" if col in ("variant", "runs (s)") else "right")
    for name in VARIANTS:
        v = result["variants"].get(name)
        if v is None:
            continue
        if "error" in v or "skipped" in v:
            t.add_row(name, "", "", escape(v.get("error") or v["skipped"]), "", "",
                      style="red" if "error" in v else "dim")
            continue
        t.add_row(
            name,
            f"{v['images_per_s']:.2f}",
            f"{v['median_s']:.2f}",
            ", ".join(f"{s:.1f}" for s in v["seconds"]),
            fmt(v.get("compile_s"), ".1f"),
            fmt(v.get("vs_diffusers_eager"), ".2f", "x"),
        )
    console.print(t)
    r = result["ratios"]
    console.print(
        "ratios of images/s, this run: "
        + ("; ".join(f"{k} {v:.2f}x" for k, v in r.items()) or "none (a variant failed)"),
        markup=False,
    )
    console.print(
        "compile s: guidekit: first call of the compiled UNet (one forward) + one sampling run "
        "with a zero ε stand-in (compiles the step ops); diffusers: first call of the compiled "
        f"UNet (one forward). Not in images/s. Graphs compiled during the timed rounds: "
        f"{result['graphs_compiled_in_rounds']} (0: no recompilation was timed).",
        markup=False,
    )

    st = Table(title="host syncs, eager: TorchDispatchMode count over one sampling run")
    for col in ("side", "batch", "steps", "total", "per step", "by op [tensor's device]"):
        st.add_column(escape(col), justify="right" if col in (
            "batch", "steps", "total", "per step") else "left")
    for side, s in result["syncs"].items():
        if "error" in s:
            st.add_row(side, "", "", "", "", escape(s["error"]), style="red")
            continue
        ops = ", ".join(f"{k} × {n}" for k, n in s["by_op"].items()) or "none"
        st.add_row(side, str(s["batch"]), str(s["steps"]), str(s["total"]),
                   f"{s['per_step']:.2f}", escape(ops))
    console.print(st)
    for side, s in result["syncs"].items():
        for row in s.get("sites", [])[:8]:
            console.print(f"  {side}: {row['count']:>4} × {row['site']}", markup=False)

    a = result["agreement"]
    console.print(
        f"agreement: max |guidekit − diffusers| of the final samples in [0, 1] (eager, batch "
        f"{c['batch']}) = {fmt(a.get('max_abs_diff'), '.2e')} (tolerance {a['tol']:g})",
        markup=False,
    )
    for k, v in a.get("other", {}).items():
        console.print(f"  {k}: {v:.2e}", markup=False)
    for s in result["skipped"]:
        console.print(f"skipped: {s}", markup=False)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="a small UNet (block_out_channels 32,64, one ResNet per level, 16x16) "
                        "and, unless given, batch 4, 10 steps, 3 rounds: a smoke run")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 16; tiny 4)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; tiny 10)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds, every variant once per round (default: one, then more "
                        f"while the next round fits in --budget-s, at most {MAX_AUTO_ROUNDS}; "
                        "tiny 3)")
    p.add_argument("--budget-s", type=float, default=600.0,
                   help="wall-time budget for the default round count (default 600: a "
                        "2-core CPU fits one round)")
    p.add_argument("--no-compile", action="store_true", help="skip both compiled variants")
    p.add_argument("--no-diffusers-compile", action="store_true",
                   help="skip the pipeline with torch.compile(unet)")
    p.add_argument("--sync-batch", type=int, default=1,
                   help="batch of the sync-counting runs (default 1: the counts do not "
                        "depend on the batch, and a run at 1 costs a fraction of one at 16)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="float16 / bfloat16 run both sides under torch.autocast (weights "
                        "stay float32)")
    p.add_argument("--tol", type=float, default=None,
                   help=f"agreement tolerance (default {TOL_FP32:g} in float32, {TOL_HALF:g} "
                        "under autocast)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (tables go to stderr)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if cuda_missing(args.device):
        return 2
    try:
        import diffusers
    except ImportError:
        print("diffusers is not installed: `pip install -e .[bench]`", file=sys.stderr)
        return 2
    diffusers.utils.logging.set_verbosity_error()
    from guidekit.engine import respacing

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    d_batch, d_steps, d_repeats = DEFAULTS["tiny" if args.tiny else "full"]
    batch, steps = args.batch or d_batch, args.steps or d_steps
    repeats = args.repeats or d_repeats  # None: rounds while they fit in the budget
    tol = args.tol if args.tol is not None else (TOL_FP32 if dtype == torch.float32
                                                 else TOL_HALF)

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    console = Console(stderr=args.json, width=150)
    t_start = time.perf_counter()

    def elapsed() -> float:
        return time.perf_counter() - t_start

    def say(msg: str) -> None:
        console.print(f"{elapsed():6.0f} s  {msg}", style="dim", markup=False)

    unet_cfg = TINY_UNET if args.tiny else CIFAR10_UNET
    result: dict[str, Any] = {"machine": machine_info(device), "skipped": [], "failures": []}
    skipped, failures = result["skipped"], result["failures"]

    say("building the UNet2DModel, saving it as a DDPMPipeline folder, converting it ...")
    with tempfile.TemporaryDirectory(prefix="bench_diffusers_") as tmp:
        t0 = time.perf_counter()
        unet, scheduler, dpm = build_models(unet_cfg, Path(tmp), device)
        convert_s = time.perf_counter() - t0
    spec = respacing("ddim", steps)
    shape = (batch, unet_cfg["in_channels"], unet_cfg["sample_size"], unet_cfg["sample_size"])
    engine = dpm.sampler(steps=spec, clip_x0=True)
    pipe = ddim_pipeline(unet, scheduler)
    result["config"] = {
        "model": "tiny" if args.tiny else "google/ddpm-cifar10-32 shape",
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in unet_cfg.items()},
        "params": sum(p.numel() for p in unet.parameters()),
        "batch": batch, "steps": steps, "dtype": args.dtype, "device": str(device),
        "convert_s": convert_s, "sync_batch": args.sync_batch, "guidekit_spec": spec,
    }

    ours = sorted(int(t) for t in engine.schedule.timesteps)
    theirs = sorted(int(t) for t in ddim_timesteps(scheduler, steps))
    result["grid"] = {"guidekit": ours, "diffusers": theirs}
    if ours != theirs:
        failures.append(f"timestep grids differ: guidekit {ours}, diffusers {theirs}")

    # 3. host syncs, eager, one sampling run each (also warms every eager code path up)
    result["syncs"] = {}
    sync_shape = (args.sync_batch, *shape[1:])
    for side, run in (
        ("guidekit", guidekit_call(engine, sync_shape, device, autocast)),
        ("diffusers", diffusers_call(pipe, args.sync_batch, steps, autocast)),
    ):
        say(f"counting host syncs: {side}, batch {args.sync_batch}, {steps} steps ...")
        try:
            result["syncs"][side] = count_syncs(run, steps, args.sync_batch)
        except Exception as exc:  # noqa: BLE001 -- report it, carry on with the timing
            result["syncs"][side] = {"error": one_line(exc)}

    calls: dict[str, Callable[[], np.ndarray]] = {
        "guidekit eager": guidekit_call(engine, shape, device, autocast),
        "diffusers eager": diffusers_call(pipe, batch, steps, autocast),
    }
    variants: dict[str, dict[str, Any]] = {}
    compile_info: dict[str, dict[str, float]] = {}

    # 2. compiled variants, compiled before the timed rounds; a failure is reported
    makers: dict[str, Callable[[], tuple]] = {}
    if args.no_compile:
        skipped.append("compiled variants (--no-compile)")
    else:
        makers["guidekit compiled"] = lambda: compile_guidekit(dpm, spec, shape, device,
                                                               autocast)
        if args.no_diffusers_compile:
            skipped.append("diffusers compiled (--no-diffusers-compile)")
        else:
            makers["diffusers compiled"] = lambda: compile_diffusers(unet, scheduler, shape,
                                                                     steps, device, autocast)
    for name, make in makers.items():
        say(f"compiling {name} ...")
        try:
            calls[name], compile_info[name] = make()
        except Exception as exc:  # noqa: BLE001 -- a compile failure is a finding, not a crash
            variants[name] = {"error": one_line(exc)}
            say(f"{name} failed to compile: {one_line(exc)}")

    # 1. timed rounds, the variants alternating in each
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    outputs: dict[str, np.ndarray] = {}
    drift: dict[str, float] = {}
    graphs_before = dynamo_graphs()
    rounds_started, t_rounds, longest = 0, elapsed(), 0.0
    while calls:
        if repeats is not None and rounds_started >= repeats:
            break
        if repeats is None and rounds_started and (
            rounds_started >= MAX_AUTO_ROUNDS or elapsed() + longest > args.budget_s
        ):
            break
        rounds_started += 1
        t_round = elapsed()
        for name in list(calls):
            say(f"round {rounds_started}: {name} ...")
            try:
                s, out = timed(calls[name], device)
            except Exception as exc:  # noqa: BLE001 -- e.g. a recompilation that fails
                variants[name] = {"error": one_line(exc)}
                del calls[name]
                continue
            seconds[name].append(s)
            if name in outputs:  # DDIM at eta 0 from the same noise: the same samples
                drift[name] = max(drift.get(name, 0.0), max_diff(out, outputs[name]))
            else:
                outputs[name] = out
        longest = max(longest, elapsed() - t_round)
    result["graphs_compiled_in_rounds"] = dynamo_graphs() - graphs_before
    result["config"]["rounds"] = rounds_started
    result["config"]["rounds_rule"] = (
        f"--repeats {repeats}" if repeats is not None else
        f"default: more while the next fits in {args.budget_s:g} s, at most {MAX_AUTO_ROUNDS}")
    result["config"]["rounds_s"] = elapsed() - t_rounds

    for name in calls:
        med = statistics.median(seconds[name])
        variants[name] = {"seconds": seconds[name], "median_s": med,
                          "images_per_s": batch / med, **compile_info.get(name, {})}
    base = variants.get("diffusers eager", {}).get("images_per_s")
    for v in variants.values():
        if base and "images_per_s" in v:
            v["vs_diffusers_eager"] = v["images_per_s"] / base
    result["variants"] = variants

    def ratio(a: str, b: str) -> float | None:
        va, vb = variants.get(a, {}), variants.get(b, {})
        if "images_per_s" in va and "images_per_s" in vb:
            return va["images_per_s"] / vb["images_per_s"]
        return None

    pairs = {
        "guidekit/diffusers (eager)": ("guidekit eager", "diffusers eager"),
        "guidekit/diffusers (compiled)": ("guidekit compiled", "diffusers compiled"),
        "guidekit compiled/eager": ("guidekit compiled", "guidekit eager"),
        "diffusers compiled/eager": ("diffusers compiled", "diffusers eager"),
    }
    result["ratios"] = {k: x for k, (a, b) in pairs.items() if (x := ratio(a, b)) is not None}

    # 4. agreement of the final samples
    agreement: dict[str, Any] = {"tol": tol, "other": {}}
    ref = outputs.get("diffusers eager")
    if ref is not None and "guidekit eager" in outputs:
        diff = max_diff(outputs["guidekit eager"], ref)
        agreement["max_abs_diff"], agreement["ok"] = diff, diff <= tol
        if not diff <= tol:
            failures.append(f"max |guidekit − diffusers| = {diff:.3e} > {tol:g} (eager)")
        for name in ("guidekit compiled", "diffusers compiled"):
            if name in outputs:
                own = name.replace("compiled", "eager")
                agreement["other"][f"max |{name} − {own}|"] = max_diff(outputs[name],
                                                                       outputs[own])
                agreement["other"][f"max |{name} − diffusers eager|"] = max_diff(
                    outputs[name], ref)
    else:
        failures.append("no eager samples of both sides to compare (a run failed)")
    for name, d in drift.items():
        agreement["other"][f"max |{name} − its own first round|"] = d
    result["agreement"] = agreement
    for name, v in variants.items():
        if "error" in v and "eager" in name:
            failures.append(f"{name}: {v['error']}")

    if hasattr(os, "getloadavg"):
        result["machine"]["loadavg_end"] = round(os.getloadavg()[0], 2)
    result["wall_s"] = elapsed()
    print_tables(console, result)
    for failure in failures:
        console.print(f"FAILED: {failure}", style="red", markup=False)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
