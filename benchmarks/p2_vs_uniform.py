"""P2 loss weighting against the uniform (simple) loss on digits, at an equal training budget.

For each seed, two DDPMs are trained on the built-in ``digits`` (train split) with the same
network (the quickstart's default UNet), steps, batch, learning rate and seed (so the same
initial weights and data order): ``--weighting uniform`` and ``--weighting p2 --p2-gamma G
--p2-k 1``. Each samples ``--n`` images (DDIM, same seed → same x_T for both weightings), which
``guidekit_classifier.sample_quality`` scores against one fixed set of held-out digits (the
test split) in the features of one judge (trained once here, or ``--judge PATH``).

Printed (``--json``: one JSON object on stdout, the tables on stderr): per run FD, precision,
recall, density and coverage; per weighting the mean ± sample std over seeds; per seed the
paired difference P2 − uniform, with its mean ± std. ``OUT/p2_vs_uniform.png`` plots FD and
precision per seed, each seed's pair joined. FD is in the judge's feature space, not
Inception's: compare the two weightings with each other, not with published FIDs.

    python benchmarks/p2_vs_uniform.py         # defaults: 3 seeds x 2 weightings x 600 steps,
                                               # 297 DDIM-50 samples each; ~15 min on 2 idle
                                               # CPU cores (extrapolated: benchmarks/README.md)
    python benchmarks/p2_vs_uniform.py --gamma 0.5 --seeds 0,1,2,3,4 --steps 1200 --json
    python benchmarks/p2_vs_uniform.py --steps 3 --n 12 --sample-steps 2 --seeds 0  # smoke

Run folders (``--out``, default ``runs/p2_vs_uniform``) are reused: a run whose checkpoint
already reached ``--steps`` is not retrained.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from guidekit.cli.params import json_safe
from guidekit.ddpm import load_dpm, train_ddpm
from guidekit.lookup import load_dataset
from guidekit.sampling import sample
from guidekit.training import TrainConfig

METRICS = ("fd", "precision", "recall", "density", "coverage")
WEIGHTINGS = ("uniform", "p2")
# the quickstart's judge (99.7% held-out after 200 steps)
JUDGE_NET = dict(model_channels=16, channel_mult=(1, 2, 2), attention_resolutions=())
JUDGE_TRAIN = dict(steps=200, batch_size=64, lr=5e-3, ema_decay=0.99)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="training steps per run (600)")
    p.add_argument("--batch", type=int, default=32, help="batch size (32)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (1e-3)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (0,1,2)")
    p.add_argument("--gamma", type=float, default=1.0, choices=(0.5, 1.0),
                   help="P2's γ (1.0 or 0.5; k = 1)")
    p.add_argument("--n", type=int, default=297,
                   help="samples per run (297: the size of the digits test split)")
    p.add_argument("--n-real", type=int, default=None,
                   help="held-out digits to compare with (default: min(n, 297))")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (50)")
    p.add_argument("--k", type=int, default=5, help="k of precision/recall/density/coverage")
    p.add_argument("--judge", type=Path, default=None,
                   help="a judge checkpoint (default: train one into OUT/judge)")
    p.add_argument("--out", type=Path, default=Path("runs/p2_vs_uniform"),
                   help="where the checkpoints go (runs/p2_vs_uniform)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p.parse_args(argv)


def _finished(folder: Path, steps: int) -> bool:
    """Whether ``folder`` holds a checkpoint trained to ``steps``."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    return json.loads(cfg.read_text()).get("step") == steps


def _train_config(args: argparse.Namespace, seed: int) -> TrainConfig:
    return TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, seed=seed,
                       save_every=args.steps, log_every=max(args.steps // 10, 1))


def get_judge(args: argparse.Namespace, console: Console) -> Path:
    """``--judge``, else a small judge trained once into OUT/judge."""
    if args.judge is not None:
        return args.judge
    from guidekit_classifier import default_config, train_judge

    out = args.out / "judge"
    if not _finished(out, JUDGE_TRAIN["steps"]):
        console.print("[dim]training the judge ...[/]")
        data = load_dataset("digits", "train")
        cfg = TrainConfig(**JUDGE_TRAIN, seed=0, save_every=JUDGE_TRAIN["steps"], log_every=50)
        summary = train_judge(data, out, model=default_config(data, **JUDGE_NET), config=cfg,
                              progress=not args.json)
        console.print(f"judge held-out accuracy {summary.get('test_accuracy', float('nan')):.4f}")
    return out


def run_one(args: argparse.Namespace, weighting: str, seed: int, judge: Any, real: torch.Tensor,
            console: Console) -> dict[str, Any]:
    """Train (or reuse) one DDPM, sample it, score the samples."""
    from guidekit_classifier import sample_quality

    options = {"p2_gamma": args.gamma, "p2_k": 1.0} if weighting == "p2" else {}
    folder = args.out / f"{weighting}_g{args.gamma:g}_seed{seed}" if weighting == "p2" else (
        args.out / f"uniform_seed{seed}")
    row: dict[str, Any] = {"weighting": weighting, "seed": seed, "checkpoint": str(folder)}
    if _finished(folder, args.steps):
        console.print(f"[dim]{folder.name}: reusing the trained checkpoint[/]")
        row["train_seconds"] = None
    else:
        console.print(f"[dim]{folder.name}: training {args.steps} steps ...[/]")
        summary = train_ddpm(load_dataset("digits", "train"), folder, weighting=weighting,
                             weighting_options=options, config=_train_config(args, seed),
                             resume=(folder / "config.json").is_file(), samples=0,
                             progress=not args.json)
        row["train_seconds"] = summary["seconds"]
        row["final_loss"] = summary["final_loss"]
    t0 = time.perf_counter()
    x = sample(load_dpm(folder), args.n, sampler="ddim", steps=args.sample_steps, seed=seed,
               progress=not args.json).cpu()
    row["sample_seconds"] = round(time.perf_counter() - t0, 2)
    row.update(sample_quality(judge, real, x, k=args.k))
    return row


def _mean_std(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}


def summarise(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per weighting mean ± std over seeds; per seed P2 − uniform, with its mean ± std."""
    per = {w: {m: _mean_std([r[m] for r in runs if r["weighting"] == w]) for m in METRICS}
           for w in WEIGHTINGS}
    by = {(r["weighting"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    paired: dict[str, Any] = {}
    for m in METRICS:
        diffs = [by["p2", s][m] - by["uniform", s][m] for s in seeds]
        paired[m] = {"seeds": seeds, "diffs": diffs, **_mean_std(diffs)}
    return per, paired


def _pm(d: dict[str, float | None]) -> str:
    std = d["std"]
    return f"{d['mean']:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def print_tables(console: Console, result: dict[str, Any]) -> None:
    c = result["config"]
    title = (f"P2 (γ={c['gamma']:g}, k=1) vs uniform: {c['steps']} steps, batch {c['batch']}, "
             f"DDIM-{c['sample_steps']}, {c['n']} samples vs {c['n_real']} held-out digits")
    runs = Table("weighting", "seed", *METRICS, "train s", "sample s", title=title)
    for r in result["runs"]:
        runs.add_row(r["weighting"], str(r["seed"]), *(f"{r[m]:.4f}" for m in METRICS),
                     "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}",
                     f"{r['sample_seconds']:.0f}")
    console.print(runs)
    summary = Table("", *METRICS, title="mean ± std over seeds; paired: P2 − uniform per seed")
    for w in WEIGHTINGS:
        summary.add_row(w, *(_pm(result["per_weighting"][w][m]) for m in METRICS))
    summary.add_row("P2 − uniform", *(_pm(result["paired"][m]) for m in METRICS))
    console.print(summary)
    console.print(f"FD in the judge's {result['feature_dim']}-D features (not Inception FID); "
                  "lower FD, higher precision/recall/density/coverage are better.",
                  markup=False)


def plot(result: dict[str, Any], path: Path) -> Path:
    """FD and precision per seed, uniform and P2 side by side, each seed's pair joined."""
    from guidekit.plots import pyplot, save_figure

    plt = pyplot()
    by = {(r["weighting"], r["seed"]): r for r in result["runs"]}
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), dpi=100)
    for ax, m, label in ((axes[0], "fd", "FD in judge features (lower is better)"),
                         (axes[1], "precision", "precision (higher is better)")):
        for s in result["config"]["seeds"]:
            ax.plot([0, 1], [by["uniform", s][m], by["p2", s][m]], "o-", alpha=0.7,
                    label=f"seed {s}")
        ax.set_xticks([0, 1], ["uniform", f"P2 (γ={result['config']['gamma']:g})"])
        ax.set(xlim=(-0.3, 1.3), ylabel=label, xlabel="loss weighting")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    c = result["config"]
    fig.suptitle(f"P2 vs uniform: {c['steps']} steps, {c['n']} DDIM-{c['sample_steps']} "
                 "samples per run", fontsize=10)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=args.json, width=150)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        console.print(f"--seeds must be comma-separated integers, got '{args.seeds}'",
                      markup=False)
        return 2
    from guidekit_classifier import JUDGE_KIND, judge_features, load_classifier, reference_images

    t0 = time.perf_counter()
    judge = load_classifier(get_judge(args, console), JUDGE_KIND)
    n_real = args.n_real or min(args.n, len(load_dataset("digits", "test")))
    real = reference_images("digits", n_real, seed=0)  # one held-out set for every run
    runs = [run_one(args, w, s, judge, real, console) for s in seeds for w in WEIGHTINGS]
    per, paired = summarise(runs)
    result = {
        "config": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seeds": seeds,
                   "gamma": args.gamma, "p2_k": 1.0, "n": args.n, "n_real": n_real,
                   "sampler": "ddim", "sample_steps": args.sample_steps, "k": args.k,
                   "judge": str(judge.path), "network": "UNetConfig() (the quickstart's)",
                   "torch": torch.__version__, "threads": torch.get_num_threads()},
        "feature_dim": judge_features(judge, real[:2]).shape[1],
        "runs": runs, "per_weighting": per, "paired": paired,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    result["plot"] = str(plot(result, args.out / "p2_vs_uniform.png"))
    print_tables(console, result)
    console.print(f"plot: {result['plot']}", markup=False)
    console.print(f"wall time {result['wall_s']:.0f} s")
    if args.json:
        print(json.dumps(json_safe(result), indent=2))
    bad = [r for r in runs if not all(math.isfinite(r[m]) for m in METRICS)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
