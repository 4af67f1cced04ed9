"""Classifier guidance from Python: train a noisy classifier on a DPM's schedule, sample digits
of a chosen class with guided DDIM, and let a separate judge say how often they are that digit.

    python examples/train_dpm.py --out runs/examples/dpm
    python examples/classifier_guidance.py --dpm runs/examples/dpm/ddpm \
        --out runs/examples/classifier                 # about 3 minutes on one CPU core
    python examples/classifier_guidance.py --tiny --out /tmp/clf   # seconds: a smoke test

Writes OUT/classifier and OUT/judge (checkpoints) and OUT/class_grid.png (row r guided toward
digit r), and prints the judged accuracy of guided against unguided samples from the same
noise. Without --dpm, --tiny first trains a tiny DPM (whose samples are noise).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from guidekit_classifier import (
    default_config,
    load_classifier,
    predict,
    train_classifier,
    train_judge,
)

import guidekit
from guidekit.testing import make_tiny_dpm

PER_CLASS = 8  # samples of each digit: one grid row


def accuracy(probs: torch.Tensor, target: torch.Tensor) -> float:
    """The share of samples the judge assigns to their target class."""
    return round(float((probs.argmax(-1) == target).float().mean()), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dpm", type=Path, help="a ddpm checkpoint (examples/train_dpm.py)")
    parser.add_argument("--out", type=Path, default=Path("runs/examples/classifier"),
                        help="where the checkpoints and the grid go")
    parser.add_argument("--scale", type=float, default=16.0, help="guidance scale")
    parser.add_argument("--tiny", action="store_true", help="a few steps of tiny models")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args()
    if args.dpm is None and not args.tiny:
        parser.exit(2, "error: give --dpm DPM_CHECKPOINT (from examples/train_dpm.py), "
                    "or --tiny\n")
    # --tiny: guidekit's own few-step test DPM, enough to run, not to see digits
    dpm_path = args.dpm or make_tiny_dpm(args.out / "ddpm")
    train, test = guidekit.load_dataset("digits", "train"), guidekit.load_dataset("digits", "test")

    # Both classifiers are small encoder UNets; the guide sees x_t at every t of the DPM's
    # schedule, the judge clean images only. The judge must not be the guide.
    steps, judge_steps = (4, 4) if args.tiny else (1500, 200)
    model = default_config(train, model_channels=8 if args.tiny else 16)
    fit = dict(batch_size=64, lr=5e-3, ema_decay=0.99)
    clf = train_classifier(train, args.out / "classifier", dpm=dpm_path, model=model, test=test,
                           config=guidekit.TrainConfig(steps=steps, **fit),
                           progress=not args.json)
    judged = train_judge(train, args.out / "judge", model=model, test=test,
                         config=guidekit.TrainConfig(steps=judge_steps, **fit),
                         progress=not args.json)

    # Guided DDIM: with class_per_row, sample block r is guided toward digit r.
    dpm = guidekit.load_dpm(dpm_path)
    n, ddim_steps = PER_CLASS * train.num_classes, 5 if args.tiny else 50
    request = guidekit.GuidanceRequest("classifier", args.scale, options={
        "classifier": str(args.out / "classifier")})
    guided = guidekit.sample(dpm, n, steps=ddim_steps, guidance=[request], seed=0,
                             class_per_row=True)
    unguided = guidekit.sample(dpm, n, steps=ddim_steps, seed=0)  # the same x_T
    grid = guidekit.save_image_grid(guided, args.out / "class_grid.png", nrow=PER_CLASS, scale=4)

    # The judge's verdict: how often each batch is the digit its row asked for.
    judge = load_classifier(args.out / "judge", "judge")
    target = torch.arange(train.num_classes).repeat_interleave(PER_CLASS)
    summary = {
        "scale": args.scale,
        "classifier_accuracy_by_t": clf["accuracy_by_t"],
        "judge_test_accuracy": round(judged["test_accuracy"], 4),
        "guided_accuracy": accuracy(predict(judge, guided), target),
        "unguided_accuracy": accuracy(predict(judge, unguided), target),
        "grid": str(grid),
    }
    if args.json:
        print(json.dumps(summary))
        return
    by_t = clf["accuracy_by_t"]
    print(f"noisy classifier, held-out accuracy: {by_t[0]['accuracy']:.3f} at the lowest t, "
          f"{by_t[-1]['accuracy']:.3f} at the highest; judge: "
          f"{summary['judge_test_accuracy']:.3f} on clean digits")
    print(f"judged as the requested digit, DDIM-{ddim_steps}, {n} samples: guided (scale "
          f"{args.scale:g}) {summary['guided_accuracy']:.3f}, unguided "
          f"{summary['unguided_accuracy']:.3f}")
    print(f"grid (row r guided toward digit r): {grid}")


if __name__ == "__main__":
    try:
        main()
    except guidekit.GuidekitError as exc:  # a user mistake: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
