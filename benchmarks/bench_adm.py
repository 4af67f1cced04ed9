"""Forward cost of openai's released ADM models rebuilt with guidekit.unet, on random weights.

Three of the guided-diffusion checkpoints (flags from openai/guided-diffusion's README, channel
multipliers from its ``script_util.py``) are built with ``torch.manual_seed(0)`` weights in
float32, ``eval()``, under ``torch.no_grad()``:

- ``64cond``: ``64x64_diffusion.pt``, class-conditional 64×64 ε/Σ UNet (1000 classes);
- ``256uncond``: ``256x256_diffusion_uncond.pt``, unconditional 256×256 ε/Σ UNet;
- ``64clf``: ``64x64_classifier.pt``, the 64×64 noisy classifier (attention pool).

For each it prints the parameter count and the fp32 size it implies (params × 4 bytes), beside
the released file's byte size where a public source gives one, and, at each batch size:

- seconds per image of one forward pass, eager vs ``torch.compile(model, dynamic=False)``
  (default mode; the first call, i.e. the compilation, is timed separately and excluded), and
  torch's ``scaled_dot_product_attention`` vs the written-out einsum/softmax attention
  (``guidekit.unet.set_attention``). The variants alternate A/B/C/A/B/C in one process on the
  same inputs (random timesteps in 0..999, random labels in 0..999 for ``64cond``); medians
  and the ratios compiled/eager and plain/SDPA are printed;
- peak memory of one eager forward, each variant in a fresh child process (this script
  re-invoked with a hidden flag): the peak resident set size during the call minus the
  resident size just before it (the high-water mark is reset through /proc/self/clear_refs
  where Linux allows it, else ``ru_maxrss`` minus the size after building the model).

    python benchmarks/bench_adm.py                        # all three; 20.5 min measured on 2
                                                          # loaded CPU cores (sized for ~12 idle)
    python benchmarks/bench_adm.py --models 64clf,64cond --batches 1,4 --repeats 5
    python benchmarks/bench_adm.py --no-compile --threads 1 --json > adm.json

Defaults are sized for a 2-core CPU: 256uncond (553M parameters, ~17 s per forward there)
gets 2 repeats at batch 1 and is not compiled; at batch 4 only one cold eager SDPA call is
timed (and its memory measured); 64cond is compiled at batch 1 only.
Everything left out is printed with the reason.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from bench_step import cpu_model  # this folder is on sys.path when run as a script
from rich.console import Console
from rich.table import Table

from guidekit.unet import (
    ClassifierConfig,
    EncoderUNet,
    UNet,
    UNetConfig,
    count_parameters,
    set_attention,
)

NUM_CLASSES = 1000
NUM_TIMESTEPS = 1000


@dataclass(frozen=True)
class Spec:
    """One released checkpoint: its guidekit config and this benchmark's default effort."""

    name: str
    file: str
    config: UNetConfig | ClassifierConfig
    repeats: int  # default timing repeats per variant
    compile_batches: tuple[int, ...] | None  # None: compile at every batch
    min_call_s: float  # a timed sample loops the forward until it has run this long
    # Batches where, by default, only eager SDPA is measured, once (time and memory).
    sdpa_only_batches: tuple[int, ...] = ()
    # Bytes of the released file from a public source: (bytes, source), or None.
    released: tuple[int, str] | None = None


# openai/guided-diffusion README, "64x64 model": --attention_resolutions 32,16,8
# --class_cond True --dropout 0.1 --image_size 64 --learn_sigma True --num_channels 192
# --num_head_channels 64 --num_res_blocks 3 --resblock_updown True
# --use_new_attention_order True --use_scale_shift_norm True; script_util: channel_mult
# (1, 2, 3, 4) at 64. guidekit takes attention sizes in pixels (ADM: downsample factors 64 // r).
CFG_64COND = UNetConfig(
    image_size=64, in_channels=3, model_channels=192, channel_mult=(1, 2, 3, 4),
    num_res_blocks=3, attention_resolutions=(32, 16, 8), num_heads=4, dropout=0.1,
    num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
    use_new_attention_order=True, timestep_scale=1.0, learn_sigma=True,
    num_classes=NUM_CLASSES, num_heads_upsample=-1,
)
# README, "256x256 model (unconditional)": --attention_resolutions 32,16,8 --class_cond False
# --image_size 256 --learn_sigma True --num_channels 256 --num_head_channels 64
# --num_res_blocks 2 --resblock_updown True --use_scale_shift_norm True (no dropout flag: 0.0;
# no use_new_attention_order flag: False, the legacy qkv layout); channel_mult
# (1, 1, 2, 2, 4, 4) at 256.
CFG_256UNCOND = UNetConfig(
    image_size=256, in_channels=3, model_channels=256, channel_mult=(1, 1, 2, 2, 4, 4),
    num_res_blocks=2, attention_resolutions=(32, 16, 8), num_heads=4, dropout=0.0,
    num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
    use_new_attention_order=False, timestep_scale=1.0, learn_sigma=True, num_classes=None,
    num_heads_upsample=-1,
)
# README, 64x64 classifier_sample.py line: --classifier_depth 4 only; the rest are
# script_util.classifier_defaults(): classifier_width 128, classifier_attention_resolutions
# 32,16,8, classifier_use_scale_shift_norm True, classifier_resblock_updown True,
# classifier_pool attention. create_classifier: num_head_channels 64, 1000 classes,
# channel_mult (1, 2, 3, 4) at 64, use_new_attention_order left at False.
CFG_64CLF = ClassifierConfig(
    image_size=64, in_channels=3, model_channels=128, channel_mult=(1, 2, 3, 4),
    num_res_blocks=4, attention_resolutions=(32, 16, 8), num_heads=1, dropout=0.0,
    num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
    use_new_attention_order=False, timestep_scale=1.0, num_classes=NUM_CLASSES,
    pool="attention",
)

SPECS = {
    s.name: s
    for s in (
        Spec("64cond", "64x64_diffusion.pt", CFG_64COND, repeats=3, compile_batches=(1,),
             min_call_s=1.0),
        Spec("256uncond", "256x256_diffusion_uncond.pt", CFG_256UNCOND, repeats=2,
             compile_batches=(), min_call_s=0.0, sdpa_only_batches=(4,)),
        Spec("64clf", "64x64_classifier.pt", CFG_64CLF, repeats=5, compile_batches=None,
             min_call_s=1.0),
    )
}
VARIANTS = ("eager sdpa", "eager plain", "compiled sdpa")


# --------------------------------------------------------------------------- building


def fill_zero_layers(model: torch.nn.Module) -> torch.nn.Module:
    """guidekit zero-initialises residual outputs and heads, as ADM does; fill them so the
    outputs are not zero and agreement checks between variants mean something."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 1.0 / max(p[0].numel(), 1) ** 0.5)
    return model


def build(spec: Spec) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = spec.config
    model = UNet(cfg) if isinstance(cfg, UNetConfig) else EncoderUNet(cfg)
    return fill_zero_layers(model).float().eval()


def make_inputs(spec: Spec, batch: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    s = spec.config.image_size
    x = torch.randn(batch, spec.config.in_channels, s, s, generator=gen)
    t = torch.randint(0, NUM_TIMESTEPS, (batch,), generator=gen)
    if isinstance(spec.config, UNetConfig) and spec.config.num_classes is not None:
        return x, t, torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return x, t


# --------------------------------------------------------------------------- memory (child)


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(name: str, batch: int, attention: str) -> dict[str, Any]:
    """One eager forward in this (fresh) process: its peak RSS above the RSS before it."""
    spec = SPECS[name]
    model = set_attention(build(spec), attention == "sdpa")
    inputs = make_inputs(spec, batch)
    gc.collect()
    base_kib = _status_kib("VmRSS")
    if _reset_peak() and base_kib is not None:
        method = "VmHWM after reset via /proc/self/clear_refs, minus VmRSS before the call"
    else:
        base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss minus ru_maxrss after building the model"
    t0 = time.perf_counter()
    with torch.no_grad():
        model(*inputs)
    seconds = time.perf_counter() - t0
    peak_kib = _status_kib("VmHWM") if method.startswith("VmHWM") else None
    if peak_kib is None:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak_kib - base_kib) / 1024, "method": method,
            "rss_before_mib": base_kib / 1024, "first_call_s": seconds}


def memory_in_child(name: str, batch: int, attention: str, threads: int | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory", f"{name},{batch},{attention}"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------- timing


def time_call(fn, args: tuple, min_s: float) -> tuple[float, torch.Tensor]:
    """(seconds per call, last output): the forward repeated until it has run ``min_s``
    (once at least)."""
    n, t0 = 0, time.perf_counter()
    while True:
        out = fn(*args)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return elapsed / n, out


def bench_batch(spec: Spec, model: torch.nn.Module, batch: int, repeats: int,
                variants: list[str], console: Console) -> dict[str, Any]:
    """Time ``variants`` (of VARIANTS) alternately, ``repeats`` rounds, on the same inputs.

    One eager SDPA call first warms the allocator up and gives the reference output (except
    when eager SDPA is timed alone, once: that call is then cold); a compiled variant's first
    call (the compilation) is timed on its own.
    """
    inputs = make_inputs(spec, batch)
    row: dict[str, Any] = {"model": spec.name, "batch": batch, "repeats": repeats}
    calls: dict[str, Any] = {}
    with torch.no_grad():
        set_attention(model, True)
        # Warm-up / reference; skipped for a single eager SDPA call (it is its own reference).
        ref = None if variants == ["eager sdpa"] and repeats == 1 else model(*inputs)
        row["warmed_up"] = ref is not None
        for v in variants:
            if v != "compiled sdpa":
                calls[v] = model
                continue
            torch._dynamo.reset()
            compiled = torch.compile(model, dynamic=False)
            console.print(f"[dim]  compiling {spec.name} at batch {batch} ...[/]")
            t0 = time.perf_counter()
            compiled(*inputs)
            row["compile_s"] = time.perf_counter() - t0
            calls[v] = compiled
        samples: dict[str, list[float]] = {v: [] for v in calls}
        diffs: dict[str, float] = {}
        for r in range(repeats):
            for v, fn in calls.items():
                set_attention(model, v != "eager plain")
                seconds, out = time_call(fn, inputs, spec.min_call_s)
                samples[v].append(seconds / batch)
                if ref is None:
                    ref = out
                diffs.setdefault(v, float((out - ref).abs().max()))
            console.print(f"[dim]  {spec.name} batch {batch}: repeat {r + 1}/{repeats} done[/]")
        set_attention(model, True)
    med = {v: statistics.median(x) for v, x in samples.items()}
    row.update(seconds_per_image=med, samples=samples, max_abs_diff_vs_eager_sdpa=diffs)
    if "eager plain" in med:
        row["plain_over_sdpa"] = med["eager plain"] / med["eager sdpa"]
    if "compiled sdpa" in med:
        row["compiled_over_eager"] = med["compiled sdpa"] / med["eager sdpa"]
    return row


# --------------------------------------------------------------------------- reporting


def fmt_s(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x * 1000:.0f} ms" if x < 10 else f"{x:.1f} s"


def print_tables(console: Console, result: dict[str, Any]) -> None:
    m = result["machine"]
    console.print(f"[bold]guidekit ADM benchmark[/] — torch {m['torch']}, python {m['python']}, "
                  f"{m['threads']} torch threads on {m['cpus']} CPUs ({m['processor']}), "
                  f"load average {m.get('loadavg_start')} at start, {m.get('loadavg_end')} "
                  "at end; float32, eval, no_grad, random weights (seed 0)")
    pt = Table(title="parameters and implied fp32 size (params × 4 bytes)")
    for col in ("model", "released file", "params", "fp32 MB", "fp32 GiB", "released bytes"):
        pt.add_column(col, justify="left" if col in ("model", "released file") else "right")
    for r in result["models"]:
        b = r["params"] * 4
        rel = r["released_bytes"]
        pt.add_row(r["model"], r["file"], f"{r['params']:,}", f"{b / 1e6:,.1f}",
                   f"{b / 2**30:.3f}", "n/a" if rel is None else f"{rel:,}")
    console.print(pt)
    if all(r["released_bytes"] is None for r in result["models"]):
        console.print("released bytes n/a: no public source giving the files' exact byte sizes "
                      "was found, so the comparison is to the parameter-count implied size only")

    tt = Table(title="seconds per image, median over repeats (A/B/C alternating in one process); "
                     "peak MiB of one eager forward in a fresh process")
    cols = ("model", "batch", "reps", "eager sdpa", "eager plain", "compiled sdpa",
            "plain/sdpa", "compiled/eager", "compile s", "MiB sdpa", "MiB plain")
    for col in cols:
        tt.add_column(col, justify="left" if col == "model" else "right")
    for r in result["rows"]:
        med = r["seconds_per_image"]
        mem = r.get("memory", {})
        tt.add_row(
            r["model"], str(r["batch"]), str(r["repeats"]), fmt_s(med["eager sdpa"]),
            fmt_s(med.get("eager plain")), fmt_s(med.get("compiled sdpa")),
            f"{r['plain_over_sdpa']:.2f}x" if "plain_over_sdpa" in r else "—",
            f"{r['compiled_over_eager']:.2f}x" if "compiled_over_eager" in r else "—",
            f"{r['compile_s']:.0f}" if "compile_s" in r else "—",
            f"{mem['sdpa']['peak_mib']:,.0f}" if "sdpa" in mem else "—",
            f"{mem['plain']['peak_mib']:,.0f}" if "plain" in mem else "—",
        )
    console.print(tt)
    diffs = [f"{r['model']}@{r['batch']} " + ", ".join(
        f"{v} {d:.1e}" for v, d in r["max_abs_diff_vs_eager_sdpa"].items() if v != "eager sdpa")
        for r in result["rows"]]
    console.print("max |output − eager sdpa output|: " + "; ".join(diffs), markup=False)
    methods = sorted({v["method"] for r in result["rows"] for v in r.get("memory", {}).values()})
    if methods:
        console.print("peak memory: " + "; ".join(methods), markup=False)
    for s in result["skipped"]:
        console.print(f"skipped: {s}", markup=False)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(SPECS),
                   help=f"comma-separated subset of {', '.join(SPECS)} (default: all)")
    p.add_argument("--batches", default="1,4", help="comma-separated batch sizes (default 1,4)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timing repeats per variant for every model and batch, all variants "
                        "(default: 64cond 3, 64clf 5, 256uncond 2 at batch 1 and eager SDPA "
                        "once at batch 4)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--compile-all", action="store_true",
                   help="compile at every batch (default: 64clf at all, 64cond at batch 1, "
                        "256uncond at none)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on stdout (tables go to stderr)")
    p.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args._memory:  # child: one memory measurement in a fresh process
        name, batch, attention = args._memory.split(",")
        print(json.dumps(measure_memory(name, int(batch), attention)))
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        print(f"unknown model(s) {unknown}: choose from {', '.join(SPECS)}", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    console = Console(stderr=args.json, width=150)
    result: dict[str, Any] = {
        "machine": {
            "torch": torch.__version__, "python": platform.python_version(),
            "processor": cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "loadavg_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
        "models": [], "rows": [], "skipped": [],
    }
    skipped = result["skipped"]
    if args.no_compile:
        skipped.append("torch.compile (--no-compile)")
    if args.no_memory:
        skipped.append("peak memory (--no-memory)")
    else:
        skipped.append("peak memory of the compiled model: not measured (a fresh process would "
                       "have to compile again, and inductor's own memory would count)")
    skipped.append("compiled model with the written-out attention: not timed (compiled/eager "
                   "is measured with SDPA, plain/SDPA eagerly)")
    t_start = time.perf_counter()
    for name in names:
        spec = SPECS[name]
        console.print(f"[dim]building {name} ...[/]")
        model = build(spec)
        params = count_parameters(model)
        result["models"].append({
            "model": name, "file": spec.file, "params": params, "fp32_bytes": params * 4,
            "released_bytes": spec.released[0] if spec.released else None,
            "released_source": spec.released[1] if spec.released else None,
            "config": spec.config.to_dict() if hasattr(spec.config, "to_dict") else None,
        })
        for batch in batches:
            reduced = args.repeats is None and batch in spec.sdpa_only_batches
            repeats = 1 if reduced else (args.repeats or spec.repeats)
            compile_ok = not args.no_compile and (
                args.compile_all or spec.compile_batches is None or batch in spec.compile_batches)
            if reduced:
                variants = ["eager sdpa"]
                skipped.append(f"{name} batch {batch}: eager SDPA only, one cold call (no "
                               "warm-up, so first-touch page faults are included), no plain "
                               "attention, no compile: one forward takes over a minute on 2 "
                               "cores (--repeats N measures every variant)")
            else:
                variants = ["eager sdpa", "eager plain"] + (["compiled sdpa"] if compile_ok
                                                            else [])
                if not args.no_compile and not compile_ok:
                    where = ",".join(map(str, spec.compile_batches or ()))
                    where = f"batch {where}" if where else "no batch"
                    skipped.append(f"{name} batch {batch}: torch.compile (default: compiled at "
                                   f"{where} only, to keep the default run within ~15 min on 2 "
                                   "cores; --compile-all enables it)")
            console.print(f"[dim]timing {name} at batch {batch} ...[/]")
            row = bench_batch(spec, model, batch, repeats, variants, console)
            if not args.no_memory:
                row["memory"] = {}
                for attention in ("sdpa", "plain") if "eager plain" in variants else ("sdpa",):
                    console.print(f"[dim]  peak memory {name} batch {batch} {attention} "
                                  "(fresh process) ...[/]")
                    row["memory"][attention] = memory_in_child(name, batch, attention,
                                                               args.threads)
            result["rows"].append(row)
        del model
        gc.collect()
        torch._dynamo.reset()
    result["machine"]["loadavg_end"] = (round(os.getloadavg()[0], 2)
                                        if hasattr(os, "getloadavg") else None)
    result["wall_s"] = time.perf_counter() - t_start
    print_tables(console, result)
    console.print(f"wall time {result['wall_s']:.0f} s")
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
