"""Train a DDPM on the built-in digits and sample a grid, from Python.

    python examples/train_dpm.py --out runs/examples/dpm     # about 7 minutes on one CPU core
    python examples/train_dpm.py --tiny --out /tmp/dpm        # seconds: a smoke test

Writes OUT/ddpm (the checkpoint; the other examples take it as --dpm) and OUT/samples.png
(64 DDIM-50 samples), and prints the final loss, the training speed and how the samples'
pixel statistics compare with the data's. --tiny trains a tiny UNet for a few steps: its
samples are noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import guidekit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/examples/dpm"),
                        help="where the checkpoint and the grid go")
    parser.add_argument("--tiny", action="store_true", help="a few steps of a tiny UNet")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()

    # 1500 handwritten digits, 16x16 grey, scaled to [-1, 1]
    data = guidekit.load_dataset("digits", "train")

    if args.tiny:
        unet = guidekit.UNetConfig(model_channels=8, channel_mult=(1, 2),
                                   attention_resolutions=(), num_heads=1)
        schedule = guidekit.ScheduleConfig(num_timesteps=100)
        config = guidekit.TrainConfig(steps=4, batch_size=16, log_every=1, save_every=4)
    else:  # the quickstart's settings: the default 1.4M-parameter UNet, linear β, T = 1000
        unet = guidekit.UNetConfig(image_size=data.image_size, in_channels=data.channels)
        schedule = guidekit.ScheduleConfig(kind="linear", num_timesteps=1000)
        config = guidekit.TrainConfig(steps=1200, batch_size=32, lr=1e-3, ema_decay=0.995)

    # Train ε_θ with the plain DDPM loss; the checkpoint keeps EMA and raw weights.
    checkpoint = args.out / "ddpm"
    trained = guidekit.train_ddpm(data, checkpoint, unet=unet, schedule=schedule,
                                  config=config, samples=0, progress=not args.json)

    # Load the EMA weights and sample with deterministic DDIM over 50 respaced steps.
    dpm = guidekit.load_dpm(checkpoint)
    x = guidekit.sample(dpm, 64, sampler="ddim", steps=5 if args.tiny else 50, seed=0)
    grid = guidekit.save_image_grid(x, args.out / "samples.png", nrow=8, scale=4)

    summary = {
        "checkpoint": str(checkpoint),
        "grid": str(grid),
        "steps": trained["steps"],
        "final_loss": trained["final_loss"],
        "seconds": trained["seconds"],
        "images_per_second": trained["images_per_second"],
        # digits are mostly dark background: a DPM that learned them matches these
        "sample_mean": round(float(x.mean()), 4),
        "data_mean": round(float(data.images.mean()), 4),
        "sample_std": round(float(x.std()), 4),
        "data_std": round(float(data.images.std()), 4),
    }
    if args.json:
        print(json.dumps(summary))
        return
    print(f"trained {summary['steps']} steps in {summary['seconds']} s "
          f"({summary['images_per_second']} images/s), final loss {summary['final_loss']:.4f}")
    print(f"pixel mean/std: samples {summary['sample_mean']}/{summary['sample_std']}, "
          f"data {summary['data_mean']}/{summary['data_std']}")
    print(f"checkpoint: {checkpoint}\ngrid: {grid}")


if __name__ == "__main__":
    try:
        main()
    except guidekit.GuidekitError as exc:  # a user mistake: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
