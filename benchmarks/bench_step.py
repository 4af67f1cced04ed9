"""Benchmark guidekit's per-step sampling math against references measured in the same run.

1. ``guidekit.ops.ddim_step`` / ``ddpm_step`` (non-zero guidance g, clip on and off) called
   eagerly vs ``torch.compile(fn, fullgraph=True)``: median µs per call, speedup, the
   compiled-equals-eager check, and dynamo's graph / graph-break count.
2. guidekit's DDIM update vs diffusers' ``DDIMScheduler.step`` on the same tensors: numerical
   agreement over every timestep of a 50-step schedule, and the time ratio diffusers /
   guidekit (eager and compiled). Skipped with a message when diffusers is not installed
   (``pip install -e .[bench]``).

Every figure is a ratio against a reference timed in the same process on the same tensors.

    python benchmarks/bench_step.py                 # 64×1×16×16, 64×3×32×32, 64×3×64×64
    python benchmarks/bench_step.py --json > out.json   # tables go to stderr, JSON to stdout
    python benchmarks/bench_step.py --device cuda --batch 16 --channels 3 --image-size 256
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from guidekit import ops
from guidekit.schedule import NoiseSchedule, ScheduleConfig

NUM_TRAIN_TIMESTEPS = 1000
NUM_STEPS = 50
SPEC = f"ddim{NUM_STEPS}"
# (channels, image size): the quickstart's digits, then CIFAR-sized and a larger image.
DEFAULT_SHAPES = [(1, 16), (3, 32), (3, 64)]
BLOCKS = 10  # timing blocks per measurement; the median block is reported
WARMUP = 3
MAX_MEASURE_S = 3.0  # cap on one measurement's timed calls (matters on a loaded machine)
RTOL, ATOL = 1e-5, 1e-5  # compiled vs eager (the same float32 math, possibly re-associated)
# guidekit vs diffusers: diffusers takes ᾱ as a float32 cumprod of 1000 betas, guidekit a
# float64 one rounded to float32, so ᾱ differs in the last few float32 ulps.
PEER_RTOL, PEER_ATOL = 1e-4, 1e-5
DIFFUSERS_MISSING = (
    "diffusers is not installed: part 2 skipped (`pip install -e .[bench]` enables it)"
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_us(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Median over BLOCKS blocks of the mean time per call, in µs (after a short warm-up).

    ``iters`` calls in all, fewer where that would take over MAX_MEASURE_S.
    """
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(WARMUP):
        fn()
    _sync(device)
    est = (time.perf_counter() - t0) / WARMUP
    per_block = max(1, min(iters, int(MAX_MEASURE_S / max(est, 1e-9))) // BLOCKS)
    times = []
    for _ in range(BLOCKS):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(per_block):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / per_block)
    return statistics.median(times) * 1e6


def max_abs_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def max_rel_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    """max |a − b| relative to the reference's largest magnitude, per output, worst output."""
    return max(
        float((x - y).abs().max() / y.abs().max().clamp(min=1e-30))
        for x, y in zip(a, b, strict=True)
    )


def all_close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], rtol, atol) -> bool:
    return all(torch.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(a, b, strict=True))


def make_inputs(batch: int, channels: int, size: int, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    shape = (batch, channels, size, size)

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device)

    x, eps, noise = randn(), randn(), randn()
    g = 0.5 * randn()
    k = torch.randint(0, NUM_STEPS, (batch,), generator=gen)
    k[0] = 0  # include the last step (no noise in DDPM, ᾱ_prev = 1 in DDIM)
    return {"x": x, "eps": eps, "g": g, "noise": noise, "k": k.to(device)}


def step_cases(tab: dict[str, torch.Tensor], inp: dict[str, Any]) -> list[tuple]:
    """(op name, clip, function, args, kwargs) for every eager/compiled comparison."""
    x, k, eps, g, noise = inp["x"], inp["k"], inp["eps"], inp["g"], inp["noise"]
    var, log_var = ops.variance(tab, k, x, "small")
    cases = []
    for clip in (False, True):
        ddim_args = (tab, x, k, eps, g, noise)
        cases.append(("ddim_step", clip, ops.ddim_step, ddim_args, {"eta": 0.0, "clip": clip}))
        cases.append(
            (
                "ddpm_step",
                clip,
                ops.ddpm_step,
                (tab, x, k, eps, var, log_var, g, noise),
                {"clip": clip},
            )
        )
    return cases


def graph_check(tab: dict[str, torch.Tensor], inp: dict[str, Any]) -> list[dict[str, Any]]:
    """dynamo's explain() on each step op: one graph and no break is what fullgraph needs."""
    rows = []
    for name, clip, fn, args, kwargs in step_cases(tab, inp):
        torch._dynamo.reset()
        out = torch._dynamo.explain(fn)(*args, **kwargs)
        rows.append(
            {
                "op": name,
                "clip": clip,
                "graph_count": out.graph_count,
                "graph_break_count": out.graph_break_count,
                "break_reasons": [
                    (str(r.reason).strip().splitlines() or [""])[0] for r in out.break_reasons
                ],
            }
        )
    torch._dynamo.reset()
    return rows


def bench_step_math(
    tab: dict[str, torch.Tensor], inp: dict[str, Any], device: torch.device, iters: int
) -> tuple[list[dict[str, Any]], Callable | None]:
    """Eager vs compiled for each case; returns the rows and the compiled ddim_step (None if
    it failed to compile)."""
    rows = []
    compiled_ddim = None
    for name, clip, fn, args, kwargs in step_cases(tab, inp):
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        eager_call = functools.partial(fn, *args, **kwargs)
        compiled_call = functools.partial(compiled, *args, **kwargs)
        _sync(device)
        t0 = time.perf_counter()
        try:
            out_c = compiled_call()  # compiles (outside the timed region)
        except Exception as e:  # a graph break under fullgraph=True lands here
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            rows.append({"op": name, "clip": clip, "error": f"{type(e).__name__}: {first_line}"})
            continue
        _sync(device)
        compile_s = time.perf_counter() - t0
        out_e = eager_call()
        eager = median_us(eager_call, device, iters)
        comp = median_us(compiled_call, device, iters)
        rows.append(
            {
                "op": name,
                "clip": clip,
                "eager_us": eager,
                "compiled_us": comp,
                "speedup": eager / comp,
                "compile_s": compile_s,
                "allclose": all_close(out_e, out_c, RTOL, ATOL),
                "max_abs_diff": max_abs_diff(out_e, out_c),
                "max_rel_diff": max_rel_diff(out_c, out_e),
            }
        )
        if name == "ddim_step" and not clip:
            compiled_ddim = compiled
    return rows, compiled_ddim


def make_diffusers_scheduler(device: torch.device, clip_sample: bool = False):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=clip_sample,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )
    sched.set_timesteps(NUM_STEPS, device=device)
    return sched


def bench_vs_diffusers(
    schedule: NoiseSchedule,
    inp: dict[str, Any],
    compiled_ddim: Callable | None,
    device: torch.device,
    iters: int,
) -> dict[str, Any]:
    """Agreement at every timestep, then timing at the middle one, on the same batch."""
    tab = schedule.tables
    sched = make_diffusers_scheduler(device)
    sched_clip = make_diffusers_scheduler(device, clip_sample=True)
    x, eps, g, noise = inp["x"], inp["eps"], inp["g"], inp["noise"]
    batch = x.shape[0]
    ours = schedule.timesteps.tolist()
    theirs = [int(t) for t in sched.timesteps]
    stride = NUM_TRAIN_TIMESTEPS // NUM_STEPS
    if sorted(ours) != sorted(theirs):
        raise SystemExit(f"timestep grids differ: guidekit {ours}, diffusers {theirs}")

    # name -> [max abs diff, max relative diff, allclose] over all timesteps
    checks = {name: [0.0, 0.0, True] for name in ("eta0_g0", "eta0_g", "eta1", "clip")}
    abar_rel = 0.0
    for t in theirs:
        kk = torch.full((batch,), ours.index(t), device=device, dtype=torch.long)
        abar_t = sched.alphas_cumprod[t]
        prev = t - stride
        abar_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        ab_ours = tab["alphas_cumprod"][ours.index(t)].cpu()
        abp_ours = tab["alphas_cumprod_prev"][ours.index(t)].cpu()
        abar_rel = max(
            abar_rel,
            float(((ab_ours - abar_t) / abar_t).abs()),
            float(((abp_ours - abar_prev) / abar_prev).abs()),
        )
        s1m = (1 - abar_t).sqrt().to(device)
        pairs = {
            # plain DDIM, the timed case
            "eta0_g0": (
                ops.ddim_step(tab, x, kk, eps, None, None, eta=0.0),
                sched.step(eps, t, x, eta=0.0, return_dict=False),
            ),
            # guidance in score form: diffusers sees ε̂ = ε − √(1−ᾱ_t)·g as the model output
            "eta0_g": (
                ops.ddim_step(tab, x, kk, eps, g, None, eta=0.0),
                sched.step(eps - s1m * g, t, x, eta=0.0, return_dict=False),
            ),
            # stochastic DDIM with the same noise
            "eta1": (
                ops.ddim_step(tab, x, kk, eps, None, noise, eta=1.0),
                sched.step(eps, t, x, eta=1.0, variance_noise=noise, return_dict=False),
            ),
            # clipped x̂_0, ε re-derived from it (diffusers' use_clipped_model_output)
            "clip": (
                ops.ddim_step(tab, x, kk, eps, None, None, eta=0.0, clip=True),
                sched_clip.step(
                    eps, t, x, eta=0.0, use_clipped_model_output=True, return_dict=False
                ),
            ),
        }
        for name, (a, b) in pairs.items():
            checks[name][0] = max(checks[name][0], max_abs_diff(a, tuple(b)))
            checks[name][1] = max(checks[name][1], max_rel_diff(a, tuple(b)))
            checks[name][2] = checks[name][2] and all_close(a, tuple(b), PEER_RTOL, PEER_ATOL)

    # time one step in the middle of the schedule
    t = theirs[len(theirs) // 2]
    kk = torch.full((batch,), ours.index(t), device=device, dtype=torch.long)
    calls = {
        "diffusers": functools.partial(sched.step, eps, t, x, eta=0.0, return_dict=False),
        "eager": functools.partial(ops.ddim_step, tab, x, kk, eps, None, None, eta=0.0),
    }
    if compiled_ddim is not None:
        calls["compiled"] = functools.partial(
            compiled_ddim, tab, x, kk, eps, None, None, eta=0.0
        )
    us = {name: median_us(call, device, iters) for name, call in calls.items()}
    reference = tuple(calls["diffusers"]())
    if compiled_ddim is not None:
        compiled_ok: bool | None = all_close(calls["compiled"](), reference, PEER_RTOL, PEER_ATOL)
    else:
        compiled_ok = None
    return {
        "t": t,
        "k": ours.index(t),
        "diffusers_us": us["diffusers"],
        "eager_us": us["eager"],
        "compiled_us": us.get("compiled"),
        "diffusers_over_eager": us["diffusers"] / us["eager"],
        "diffusers_over_compiled": us["diffusers"] / us["compiled"] if "compiled" in us else None,
        "compiled_matches_diffusers": compiled_ok,
        "abar_max_rel_diff": abar_rel,
        "checks": {
            name: {"max_abs_diff": d, "max_rel_diff": r, "allclose": ok}
            for name, (d, r, ok) in checks.items()
        },
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_missing(device: str) -> bool:
    """``--device cuda`` without CUDA: says so in one line on stderr (the caller exits 2)."""
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available in this torch build", file=sys.stderr)
        return True
    return False


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    return info


def print_tables(console: Console, result: dict[str, Any]) -> None:
    m = result["machine"]
    console.print(
        f"[bold]guidekit step benchmark[/] — torch {m['torch']}, device {m['device']}"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f", torch threads {m['threads']} on {m['cpus']} CPUs ({m['processor']}), "
        f"diffusers {m['diffusers']}"
    )
    # Before the run the load is others'; by the end it includes this run's own threads.
    for when, limit in (("start", 0.5), ("end", 1.0)):
        load = m.get(f"loadavg_{when}")
        if load is not None and m["cpus"] and load > limit * m["cpus"]:
            console.print(
                f"[yellow]warning: 1-min load average {load} at {when} on {m['cpus']} CPUs: other "
                "processes compete for the cores and timings (OpenMP-parallel kernels most) are "
                "unreliable[/]"
            )

    gt = Table(title="graph check: torch._dynamo.explain (need 1 graph, 0 breaks)")
    for col in ("op", "clip", "graphs", "breaks"):
        gt.add_column(col)
    for r in result["graph_check"]:
        ok = r["graph_count"] == 1 and r["graph_break_count"] == 0
        style = "" if ok else "red"
        gt.add_row(
            r["op"],
            str(r["clip"]),
            str(r["graph_count"]),
            str(r["graph_break_count"]),
            style=style,
        )
    console.print(gt)

    st = Table(title="step math: eager vs torch.compile(fullgraph=True), median µs per call")
    for col in ("shape", "op", "clip", "eager µs", "compiled µs", "speedup", "compile s", "equal"):
        st.add_column(col, justify="right" if col.endswith(("µs", "speedup", " s")) else "left")
    for size in result["sizes"]:
        for r in size["step_math"]:
            if "error" in r:
                st.add_row(size["shape"], r["op"], str(r["clip"]), "", "", "", "", r["error"])
                continue
            equal = f"{'yes' if r['allclose'] else 'NO'} ({r['max_abs_diff']:.1e})"
            st.add_row(
                size["shape"],
                r["op"],
                str(r["clip"]),
                f"{r['eager_us']:.1f}",
                f"{r['compiled_us']:.1f}",
                f"{r['speedup']:.2f}x",
                f"{r['compile_s']:.1f}",
                equal,
            )
    console.print(st)

    if "skipped" in result["sizes"][0]["diffusers"]:
        console.print(result["sizes"][0]["diffusers"]["skipped"], markup=False)
        return
    dt = Table(
        title="DDIM step (eta=0): diffusers DDIMScheduler.step vs guidekit ops.ddim_step "
        "(eager, compiled); ratio > 1: guidekit faster"
    )
    cols = (
        "shape",
        "t",
        "diffusers µs",
        "eager µs",
        "compiled µs",
        "diffusers/eager",
        "diffusers/compiled",
    )
    for col in cols:
        dt.add_column(col, justify="left" if col == "shape" else "right")
    for size in result["sizes"]:
        d = size["diffusers"]
        dt.add_row(
            size["shape"],
            str(d["t"]),
            f"{d['diffusers_us']:.1f}",
            f"{d['eager_us']:.1f}",
            "n/a" if d["compiled_us"] is None else f"{d['compiled_us']:.1f}",
            f"{d['diffusers_over_eager']:.2f}x",
            "n/a"
            if d["diffusers_over_compiled"] is None
            else f"{d['diffusers_over_compiled']:.2f}x",
        )
    console.print(dt)

    agree = Table(
        title="agreement with diffusers over all 50 timesteps: "
        "max |Δ| of x_prev and x̂_0 / the same relative to max |diffusers|"
    )
    agree.add_column("shape")
    for name in result["sizes"][0]["diffusers"]["checks"]:
        agree.add_column(name, justify="right")
    agree.add_column("compiled", justify="right")
    agree.add_column("max rel Δ ᾱ", justify="right")
    for size in result["sizes"]:
        d = size["diffusers"]
        cells = [
            f"{'ok' if c['allclose'] else 'MISMATCH'} "
            f"{c['max_abs_diff']:.0e}/{c['max_rel_diff']:.0e}"
            for c in d["checks"].values()
        ]
        compiled = {True: "ok", False: "MISMATCH", None: "n/a"}[d["compiled_matches_diffusers"]]
        agree.add_row(size["shape"], *cells, compiled, f"{d['abar_max_rel_diff']:.1e}")
    console.print(agree)
    console.print(
        "eta0_g0: plain DDIM; eta0_g: guidance folded into diffusers' model_output as "
        "ε − √(1−ᾱ_t)·g; eta1: same variance_noise; clip: clip_sample + "
        "use_clipped_model_output; compiled: the compiled ddim_step at the timed t. allclose at "
        f"rtol={PEER_RTOL:g}, atol={PEER_ATOL:g}."
    )


def failures(result: dict[str, Any]) -> list[str]:
    """Correctness checks that failed: a graph break, compiled != eager, guidekit != diffusers."""
    out = [
        f"{r['op']}(clip={r['clip']}): {r['graph_count']} graphs, "
        f"{r['graph_break_count']} breaks {r['break_reasons']}"
        for r in result["graph_check"]
        if r["graph_count"] != 1 or r["graph_break_count"] != 0
    ]
    for size in result["sizes"]:
        for r in size["step_math"]:
            if "error" in r:
                out.append(f"{size['shape']} {r['op']}(clip={r['clip']}): {r['error']}")
            elif not r["allclose"]:
                out.append(
                    f"{size['shape']} {r['op']}(clip={r['clip']}): compiled != eager "
                    f"(max |Δ| {r['max_abs_diff']:.1e})"
                )
        d = size["diffusers"]
        if "skipped" in d:
            continue
        for name, c in d["checks"].items():
            if not c["allclose"]:
                out.append(
                    f"{size['shape']} ddim_step vs diffusers ({name}): "
                    f"max |Δ| {c['max_abs_diff']:.1e}"
                )
        if d["compiled_matches_diffusers"] is False:
            out.append(f"{size['shape']} compiled ddim_step vs diffusers: mismatch")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="run one size only (with --channels, default 1); default: 16, 32 and 64",
    )
    p.add_argument(
        "--channels",
        type=int,
        default=None,
        help="run one size only (with --image-size, default 16); default: 1, 3 and 3",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=200,
        help=f"calls timed per measurement, in {BLOCKS} blocks; capped so that one "
        f"measurement takes at most ~{MAX_MEASURE_S:g} s (default 200)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the run (default: torch's default)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object of all figures on stdout (tables go to stderr)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if cuda_missing(args.device):
        return 2
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.image_size is None and args.channels is None:
        shapes = DEFAULT_SHAPES
    else:
        shapes = [(args.channels or 1, args.image_size or 16)]

    try:
        import diffusers  # noqa: F401

        have_diffusers = True
    except ImportError:
        have_diffusers = False

    schedule = NoiseSchedule.from_config(ScheduleConfig()).respace(SPEC).to(device)
    tab = schedule.tables
    result: dict[str, Any] = {
        "machine": machine_info(device),
        "schedule": f"linear 1e-4..0.02, T={NUM_TRAIN_TIMESTEPS}, respaced {SPEC}",
        "iters": args.iters,
        "sizes": [],
    }
    console = Console(stderr=args.json, width=120)
    with torch.no_grad():
        first = make_inputs(args.batch, *shapes[0], device)
        result["graph_check"] = graph_check(tab, first)
        for channels, size in shapes:
            shape = f"{args.batch}x{channels}x{size}x{size}"
            console.print(f"[dim]measuring {shape} ...[/]")
            torch._dynamo.reset()  # compile each size from scratch, static shapes
            inp = make_inputs(args.batch, channels, size, device)
            rows, compiled_ddim = bench_step_math(tab, inp, device, args.iters)
            entry: dict[str, Any] = {"shape": shape, "step_math": rows}
            if have_diffusers:
                entry["diffusers"] = bench_vs_diffusers(
                    schedule, inp, compiled_ddim, device, args.iters
                )
            else:
                entry["diffusers"] = {"skipped": DIFFUSERS_MISSING}
            result["sizes"].append(entry)

    if hasattr(os, "getloadavg"):
        result["machine"]["loadavg_end"] = round(os.getloadavg()[0], 2)
    result["failures"] = failures(result)
    print_tables(console, result)
    for failure in result["failures"]:
        console.print(f"FAILED: {failure}", style="red", markup=False)
    if args.json:
        print(json.dumps(result, indent=2))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
