"""PDAE from Python: turn a trained DPM into an autoencoder and reconstruct held-out digits,
against plain DDIM inversion of the same DPM.

    python examples/train_dpm.py --out runs/examples/dpm
    python examples/pdae_reconstruction.py --dpm runs/examples/dpm/ddpm \
        --out runs/examples/pdae                      # about 15 minutes on one CPU core
    python examples/pdae_reconstruction.py --tiny --out /tmp/pdae   # seconds: a smoke test

Writes OUT/pdae (the checkpoint: encoder E_φ and gradient estimator G_ψ; the DPM stays frozen)
and OUT/reconstructions.png (originals, then one row per method), and prints SSIM and MSE of
PDAE's reconstructions against DDIM's. Without --dpm, --tiny first trains a tiny DPM.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from guidekit_pdae import load_pdae, reconstruct, reconstruction_grid, train_pdae

import guidekit
from guidekit.testing import make_tiny_dpm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dpm", type=Path, help="a ddpm checkpoint (examples/train_dpm.py)")
    parser.add_argument("--out", type=Path, default=Path("runs/examples/pdae"),
                        help="where the checkpoint and the grid go")
    parser.add_argument("--n", type=int, default=32, help="held-out digits to reconstruct")
    parser.add_argument("--tiny", action="store_true", help="a few steps of tiny models")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    if args.dpm is None and not args.tiny:
        parser.exit(2, "error: give --dpm DPM_CHECKPOINT (from examples/train_dpm.py), "
                    "or --tiny\n")
    # --tiny: guidekit's own few-step test DPM, enough to run, not to see digits
    dpm_path = args.dpm or make_tiny_dpm(args.out / "ddpm")

    # Train E_φ (x_0 → z) and G_ψ (the mean shift toward z) with the PDAE weighting; ε_θ frozen.
    if args.tiny:
        config = guidekit.TrainConfig(steps=4, batch_size=16, ema_decay=0.0)
        latent_dim, channels, ddim_steps = 8, 8, 5
    else:
        config = guidekit.TrainConfig(steps=2000, batch_size=32, lr=1e-3, ema_decay=0.995)
        latent_dim, channels, ddim_steps = 64, 32, 50
    trained = train_pdae(guidekit.load_dataset("digits", "train"), args.out / "pdae",
                         pretrained=dpm_path, latent_dim=latent_dim, encoder_channels=channels,
                         config=config, progress=not args.json)

    # Reconstruct test digits from their inferred x_T (DDIM inversion of the bare DPM, and
    # PDAE's, which inverts and decodes with the shift G_ψ(x_t, E_φ(x_0), t) on), then from
    # random x_T: there only PDAE's z knows what the digit was.
    pdae = load_pdae(args.out / "pdae")
    x0 = guidekit.load_dataset("digits", "test").images[: args.n]
    result = reconstruct(pdae, x0, steps=ddim_steps, xT="both")
    grid = reconstruction_grid(x0, result.pop("images"), args.out / "reconstructions.png")

    rows = [{k: row[k] for k in ("method", "ssim", "mse")} for row in result["methods"]]
    summary = {"pdae_seconds": trained["seconds"], "n": len(x0), "ddim_steps": ddim_steps,
               "methods": rows, "grid": str(grid)}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"PDAE trained in {trained['seconds']} s; {len(x0)} held-out digits, "
          f"DDIM-{ddim_steps} (SSIM ↑, MSE ↓ on [0, 1])")
    for row in rows:
        print(f"  {row['method']:<20} SSIM {row['ssim']:.4f}  MSE {row['mse']:.2e}")
    print(f"grid (rows: originals, then one per method): {grid}")


if __name__ == "__main__":
    try:
        main()
    except guidekit.GuidekitError as exc:  # a user mistake: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
