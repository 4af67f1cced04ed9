"""Every GPU measurement in one run, written as one JSON: what ``benchmarks/gpu.sh`` runs.

1. ``train``: training-step throughput of openai's 64×64 class-conditional ADM UNet
   (``bench_adm.CFG_64COND``: 192 channels, multipliers 1,2,3,4, 3 blocks, attention at
   32/16/8 px, learned Σ, 1000 classes) under bf16 autocast: guidekit's own DDPM loss
   (``DDPMTask``, the hybrid L_simple + λ·L_vlb), backward and a fused AdamW update. Model
   FLOP utilisation = FLOPs of one step (torch's ``FlopCounterMode``: the matmuls,
   convolutions and attention of forward and backward) × steps/s ÷ the device's peak dense
   bf16 FLOP/s (``--peak-tflops``, else a table of known GPUs; none for a CPU).
2. ``pdae_vs_ddpm``: ``bench_pdae_step.py``'s two training steps on one UNet (each mode in a
   fresh process): images/s, ms/step and peak memory, and their ratios.
3. ``sampling``: classifier-guided DDIM-50 (``bench_adm.CFG_64CLF`` guiding the 64×64 UNet)
   images/s at batch 64: eager; ``torch.compile`` of both networks and the step ops; and, on
   CUDA, the networks compiled with ``mode="reduce-overhead"`` (CUDA graphs). A variant that
   fails is reported with its one-line error, not dropped.
4. ``syncs``: host reads per sampling step during one eager guided run
   (``bench_diffusers.HostReadCounter``: ``.item()``-like reads, data-dependent shapes and
   device-to-host copies).

The networks have ``torch.manual_seed(0)`` weights (zero-initialised layers filled by
``bench_adm.fill_zero_layers``); throughput does not depend on the values. ``--tiny`` shrinks every
shape (16 px, 32 channels, batch 4, DDIM-5) so the whole run takes a minute or two on a CPU:
the slow test ``tests/test_bench_gpu.py`` runs it that way, so the script is known to work
before a GPU is at hand.

    bash benchmarks/gpu.sh                          # on the GPU machine: writes gpu.json
    bash benchmarks/gpu.sh --device cpu --tiny --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_adm import CFG_64CLF, CFG_64COND, fill_zero_layers  # this folder is on sys.path
from bench_diffusers import count_syncs, one_line
from bench_step import machine_info

from guidekit.cli.params import json_safe

HERE = Path(__file__).resolve().parent
# Peak dense bf16 tensor-core FLOP/s (no sparsity) from the vendors' data sheets, by a
# substring of torch.cuda.get_device_name(); the first match wins.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("A10G", 70e12))


@dataclasses.dataclass(frozen=True)
class Sizes:
    unet: Any
    classifier: Any
    train_batch: int
    sample_batch: int
    sample_steps: int
    pdae: list[str]  # bench_pdae_step.py's shape flags
    train_steps: int
    warmup: int


FULL = Sizes(CFG_64COND, CFG_64CLF, train_batch=64, sample_batch=64, sample_steps=50,
             pdae=["--batch", "64", "--image-size", "64", "--channels", "3",
                   "--model-channels", "128", "--steps", "20", "--warmup", "5"],
             train_steps=20, warmup=5)
TINY = Sizes(
    dataclasses.replace(CFG_64COND, image_size=16, model_channels=32, channel_mult=(1, 2),
                        num_res_blocks=1, attention_resolutions=(8,), num_head_channels=32,
                        num_classes=10),
    dataclasses.replace(CFG_64CLF, image_size=16, model_channels=16, channel_mult=(1, 2),
                        num_res_blocks=1, attention_resolutions=(8,), num_head_channels=16,
                        num_classes=10),
    train_batch=4, sample_batch=4, sample_steps=5,
    pdae=["--batch", "4", "--image-size", "16", "--channels", "3", "--model-channels", "16",
          "--steps", "2", "--warmup", "1"],
    train_steps=2, warmup=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Seconds per call, the median of ``repeats`` synchronised calls."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def build(cls: type, cfg: Any, device: torch.device) -> torch.nn.Module:
    """``cls(cfg)`` with seed-0 weights, zero-initialised layers filled."""
    torch.manual_seed(0)
    return fill_zero_layers(cls(cfg)).to(device)


def peak_flops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16:
        if key in name:
            return value, f"data-sheet dense bf16 of {key}"
    return None, f"no peak known for {name}: give --peak-tflops"


# --------------------------------------------------------------------------- 1. train


def bench_train(sizes: Sizes, device: torch.device, peak: float | None) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from guidekit.data import ImageData
    from guidekit.ddpm import DDPMTask
    from guidekit.schedule import NoiseSchedule, ScheduleConfig
    from guidekit.unet import UNet, count_parameters

    cfg = sizes.unet
    model = build(UNet, cfg, device).train()
    sched = NoiseSchedule.from_config(ScheduleConfig())
    k = cfg.num_classes
    data = ImageData("bench", torch.zeros(1, 3, cfg.image_size, cfg.image_size),
                     torch.zeros(1, dtype=torch.long), k)
    task = DDPMTask(model, sched, torch.ones(sched.num_steps), {"name": "uniform"}, data)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(sizes.train_batch, 3, cfg.image_size, cfg.image_size, device=device)
    y = torch.randint(0, k, (sizes.train_batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = task.loss({"model": model}, x0, y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(sizes.warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, sizes.train_steps)
    steps_per_s = 1 / seconds
    return {
        "model": "ADM 64x64 class-conditional UNet" + (" (tiny)" if sizes is TINY else ""),
        "params": count_parameters(model), "batch": sizes.train_batch,
        "image_size": cfg.image_size, "dtype": "bf16 autocast", "optimizer": "AdamW"
        + (" fused" if device.type == "cuda" else ""),
        "ms_per_step": 1000 * seconds, "images_per_s": sizes.train_batch * steps_per_s,
        "flops_per_step": flops, "achieved_tflops": flops * steps_per_s / 1e12,
        "mfu": None if peak is None else flops * steps_per_s / peak,
        "peak_memory_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                            if device.type == "cuda" else None),
    }


# --------------------------------------------------------------------------- 2. PDAE vs DDPM


def bench_pdae(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(HERE / "bench_pdae_step.py"), "--device", str(device), *sizes.pdae,
         "--json"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- 3-4. sampling


def sampling_setup(sizes: Sizes, device: torch.device) -> tuple[Any, ...]:
    from guidekit_classifier.guidance import ClassifierGuidance

    from guidekit.schedule import NoiseSchedule, ScheduleConfig
    from guidekit.unet import EncoderUNet, UNet

    unet = build(UNet, sizes.unet, device).eval().requires_grad_(False)
    clf = build(EncoderUNet, sizes.classifier, device).eval().requires_grad_(False)
    sched = NoiseSchedule.from_config(ScheduleConfig())
    b, s = sizes.sample_batch, sizes.unet.image_size
    y = torch.arange(b, device=device) % sizes.unet.num_classes
    x_T = torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(1)).to(device)
    return unet, clf, sched, y, x_T, ClassifierGuidance


def guided_run(unet: Callable, clf: Callable, sched: Any, y: torch.Tensor, x_T: torch.Tensor,
               guidance_cls: type, steps: int, compile_ops: bool) -> Callable[[], Any]:
    """One classifier-guided DDIM run (scale 4, x̂_0 clipped) from ``x_T``."""
    from guidekit.engine import Sampler
    from guidekit.guidance import GuidanceTerm

    engine = Sampler(unet, sched, steps=f"ddim{steps}", clip_x0=True, compile=compile_ops)
    term = GuidanceTerm(guidance_cls(clf, y), 4.0, None, "classifier")
    return lambda: engine.ddim(x_T, guidance=[term], y=y)


def bench_sampling(sizes: Sizes, device: torch.device, repeats: int) -> dict[str, Any]:
    unet, clf, sched, y, x_T, guidance_cls = sampling_setup(sizes, device)
    b, steps = sizes.sample_batch, sizes.sample_steps
    # a compiled module still answers down()/middle_up() with the eager halves, so the
    # compiled variants hand the Sampler plain callables that call it whole
    variants: dict[str, Callable[[], tuple[Callable, Callable, bool]]] = {
        "eager": lambda: (unet, clf, False),
    }

    def compiled(mode: str | None) -> tuple[Callable, Callable, bool]:
        net = torch.compile(unet, dynamic=False, mode=mode)
        cnet = torch.compile(clf, dynamic=False, mode=mode)
        return (lambda x, t, *c: net(x, t, *c)), (lambda x, t: cnet(x, t)), True

    variants["compiled"] = lambda: compiled(None)
    if device.type == "cuda":
        variants["compiled + CUDA graphs"] = lambda: compiled("reduce-overhead")
    rows: dict[str, Any] = {}
    for name, make in variants.items():
        try:
            u, c, ops = make()
            run = guided_run(u, c, sched, y, x_T, guidance_cls, steps, ops)
            t0 = time.perf_counter()
            run()  # the first run compiles (and warms the eager path up)
            sync(device)
            first = time.perf_counter() - t0
            s = timed(run, device, repeats)
            rows[name] = {"images_per_s": b / s, "s_per_run": s, "first_run_s": first}
        except Exception as exc:  # a variant that cannot run is a result, not a crash
            rows[name] = {"error": one_line(exc),
                          "where": traceback.extract_tb(exc.__traceback__)[-1].name}
    base = rows["eager"].get("images_per_s")
    for r in rows.values():
        if base and "images_per_s" in r:
            r["speedup_vs_eager"] = r["images_per_s"] / base
    return {"sampler": f"DDIM-{steps}, classifier-guided (scale 4), x̂_0 clipped",
            "batch": b, "image_size": sizes.unet.image_size, "variants": rows}


def bench_syncs(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    unet, clf, sched, y, x_T, guidance_cls = sampling_setup(sizes, device)
    run = guided_run(unet, clf, sched, y, x_T, guidance_cls, sizes.sample_steps, False)
    run()  # warm-up outside the count
    counts = count_syncs(run, sizes.sample_steps, sizes.sample_batch)
    counts["sites"] = counts["sites"][:10]
    return counts


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a CPU dry run")
    p.add_argument("--out", type=Path, default=Path("gpu.json"), help="the JSON (gpu.json)")
    p.add_argument("--repeats", type=int, default=3, help="timed sampling runs per variant")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak dense bf16 TFLOP/s, for MFU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device is visible: run on the GPU machine, or give --device cpu --tiny "
              "for a dry run", file=sys.stderr)
        return 2
    sizes = TINY if args.tiny else FULL
    peak, peak_source = peak_flops(device, args.peak_tflops)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "machine": machine_info(device), "tiny": args.tiny, "torch": torch.__version__,
        "peak_flops": peak, "peak_source": peak_source,
    }
    sections = (("train", lambda: bench_train(sizes, device, peak)),
                ("pdae_vs_ddpm", lambda: bench_pdae(sizes, device)),
                ("sampling", lambda: bench_sampling(sizes, device, args.repeats)),
                ("syncs", lambda: bench_syncs(sizes, device)))
    for name, fn in sections:
        s0 = time.perf_counter()
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            result[name] = fn()
        except Exception as exc:
            result[name] = {"error": one_line(exc)}
        result[name]["section_s"] = round(time.perf_counter() - s0, 1)
        print(f"{name}: {json.dumps(result[name])[:400]}", file=sys.stderr, flush=True)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False,
                                   default=str) + "\n")
    print(f"wrote {args.out} ({result['wall_s']:.0f} s)", file=sys.stderr)
    failed = [n for n, _ in sections if "error" in result[n]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
