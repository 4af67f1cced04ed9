"""Training throughput and memory of a PDAE step against a DDPM step of the same UNet.

Both steps are the real training losses (``guidekit.ddpm.DDPMTask`` and
``guidekit_pdae.training.PDAETask``) with AdamW forward + backward + update, on the same batch
shape, in the same process. The PDAE step runs the frozen ε_θ (down + up path, no autograd)
and trains E_φ and G_ψ (G_ψ is a middle + up path); the DDPM step trains the whole UNet.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the timed steps; on CPU, the peak
resident set size of a fresh child process per mode minus its size before the first step
(what the training step adds: activations kept for backward, gradients, optimiser state).

    python benchmarks/bench_pdae_step.py                     # digits-sized UNet, batch 32
    python benchmarks/bench_pdae_step.py --json > out.json   # table to stderr, JSON to stdout
    python benchmarks/bench_pdae_step.py --device cuda --batch 128 --image-size 32 --channels 3
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

MODES = ("ddpm", "pdae")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    """Time ``args.steps`` training steps of one mode (after ``args.warmup``) in this process."""
    from guidekit_pdae.networks import Encoder, EncoderConfig, EstimatorConfig, GradientEstimator
    from guidekit_pdae.training import PDAETask

    from guidekit.ddpm import DDPMTask
    from guidekit.schedule import NoiseSchedule, ScheduleConfig
    from guidekit.unet import UNet, UNetConfig, count_parameters

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = UNetConfig(image_size=args.image_size, in_channels=args.channels,
                     model_channels=args.model_channels)
    unet = UNet(cfg).to(device)
    sched = NoiseSchedule.from_config(ScheduleConfig())
    weights = torch.ones(sched.num_steps)
    if mode == "ddpm":
        from guidekit.data import ImageData

        data = ImageData("bench", torch.zeros(1, args.channels, args.image_size, args.image_size),
                         None, 0)
        task = DDPMTask(unet, sched, weights, {"name": "uniform"}, data)
    else:
        enc = Encoder(EncoderConfig(image_size=args.image_size, in_channels=args.channels,
                                    latent_dim=args.latent_dim))
        est = GradientEstimator(EstimatorConfig(cfg, args.latent_dim))
        task = PDAETask(unet, enc, est, sched, weights, {})
    nets = {k: m.to(device).train() for k, m in task.trainable().items()}
    params = [p for m in nets.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x0 = torch.randn(args.batch, args.channels, args.image_size, args.image_size, device=device)
    gen = torch.Generator(device).manual_seed(0)

    def step() -> None:
        loss = task.loss(nets, x0, None, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rss0 = _rss_mib()
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0)
    return {
        "mode": mode,
        "images_per_s": args.batch * args.steps / seconds,
        "ms_per_step": 1000 * seconds / args.steps,
        "peak_mib": peak,
        "trainable_params": sum(p.numel() for p in params),
        "unet_params": count_parameters(unet),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--model-channels", type=int, default=32)
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # one mode in a fresh process, so peak RSS is its own
        print(json.dumps(run_mode(args.child, args)))
        return
    passthrough = [a for a in sys.argv[1:] if a != "--json"]
    results = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, *passthrough, "--child", mode],
                             check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    d, q = results["ddpm"], results["pdae"]
    summary = {
        "device": args.device,
        "platform": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "shape": [args.channels, args.image_size, args.image_size],
        "results": results,
        "pdae_over_ddpm_throughput": q["images_per_s"] / d["images_per_s"],
        "pdae_over_ddpm_peak_memory": q["peak_mib"] / d["peak_mib"],
    }
    table = Table(title=f"training step, batch {args.batch}, {args.channels}x{args.image_size}"
                        f"x{args.image_size}, {args.device}")
    for col in ("mode", "images/s", "ms/step", "peak MiB", "trainable params"):
        table.add_column(col, justify="right")
    for r in (d, q):
        table.add_row(r["mode"], f"{r['images_per_s']:.1f}", f"{r['ms_per_step']:.1f}",
                      f"{r['peak_mib']:.1f}", f"{r['trainable_params']:,}")
    console = Console(stderr=args.json)
    console.print(table)
    console.print(f"PDAE / DDPM: throughput ×{summary['pdae_over_ddpm_throughput']:.2f}, "
                  f"peak memory ×{summary['pdae_over_ddpm_peak_memory']:.2f}")
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
