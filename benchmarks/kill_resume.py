"""kill -9 and ``--resume``, over and over: the resumed run must end bit-identical.

1. A reference: ``guidekit train ddpm`` of a tiny model straight through to ``--steps`` (60 by
   default, ``--save-every 3`` so a save happens every few tens of milliseconds), timed; its
   metrics log gives the start-up time and the time per step.
2. In a fresh folder the same command, SIGKILLed, then ``--resume`` (a fresh start while no
   checkpoint exists yet), each run SIGKILLed again, until ``--kills`` kills are done; then one
   last resume runs to the end. A kill is either *timed* (uniform over the run's expected
   duration: start-up plus the steps left, a share of them when many kills remain, so kills
   spread over the whole run) or *at a save* (the folder is polled every 2 ms and the run is
   killed when the k-th new file of its saves, a temp file or a step file, appears). So that
   no kill is lost to a run that reaches the end first, a run that saves the step before the
   last is killed at once (a *guard* kill), and a run resumed from there is killed during its
   last save's tensor files.
3. After each kill the folder is inspected: the step config.json names, and whether the kill
   landed during a save (a ``.*.tmp`` file, or a step file config.json does not name, that
   was not there, or not as it is now, before the run).
4. Every tensor of the final checkpoint (model, ema, state) is compared with the reference's,
   bit for bit (``torch.equal``), and the final folder must hold only the current step's files
   besides config.json, metrics.jsonl and .guidekit.lock.

    python benchmarks/kill_resume.py                  # 20 kills, ~1.5 min on 2 CPU cores
    python benchmarks/kill_resume.py --kills 24 --seed 1 --json
    python benchmarks/kill_resume.py --out /tmp/kr --keep   # keep the two folders

Exit status 1 when the final checkpoint differs from the reference, when the final folder holds
leftovers of killed saves, or when a run fails on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CONFIG = "config.json"
BOOKKEEPING = {CONFIG, "metrics.jsonl", ".guidekit.lock", "samples.png"}
TEMP = re.compile(r"\..+\.tmp")
STEP_FILE = re.compile(r"[A-Za-z0-9_]{1,64}-\d{7,12}\.safetensors")
POLL_S = 0.002
AT_SAVE_SHARE = 0.4  # of the kills: at a save; the rest are timed

# The tiny model of guidekit.testing.make_tiny_dpm, on the built-in digits.
TINY = ["--data", "digits", "--model-channels", "8", "--channel-mult", "1,2",
        "--num-res-blocks", "1", "--attention", "", "--num-heads", "1", "--timesteps", "100",
        "--batch-size", "16", "--samples", "0", "--log-every", "1", "--json"]


def train_argv(out: Path, steps: int, save_every: int, resume: bool) -> list[str]:
    return [sys.executable, "-m", "guidekit", "train", "ddpm", "--out", str(out),
            "--steps", str(steps), "--save-every", str(save_every), *TINY,
            *(["--resume"] if resume else [])]


def child_env(threads: int) -> dict[str, str]:
    # one thread per process: the killed runs and the poller share the machine's cores
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def read_config(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / CONFIG).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class FolderState:
    step: int | None  # the step config.json names (None: no checkpoint yet)
    # temp files, and step files config.json does not name, with their mtimes: a save that
    # rewrites a name a killed save left is new evidence too
    unfinished: set[tuple[str, int]]
    leftovers: int  # files besides the current step's and the bookkeeping
    names: list[str]


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def inspect(d: Path) -> FolderState:
    names = sorted(os.listdir(d)) if d.is_dir() else []
    cfg = read_config(d)
    listed = set((cfg or {}).get("files", {}).values())
    unfinished = {(n, _mtime(d / n)) for n in names
                  if TEMP.fullmatch(n) or (STEP_FILE.fullmatch(n) and n not in listed)}
    leftovers = [n for n in names if n not in BOOKKEEPING and n not in listed]
    return FolderState(cfg.get("step") if cfg else None, unfinished, len(leftovers), names)


def save_artifacts(d: Path) -> set[tuple[str, int]]:
    """What saves leave in ``d``: temp files by name (their mtime moves while written), step
    files by name and mtime (a temp file may come and go between two polls; the step file it
    was renamed to stays until the next save's clean-up)."""
    found = set()
    try:
        with os.scandir(d) as it:
            for e in it:
                if TEMP.fullmatch(e.name):
                    found.add((e.name, 0))
                elif STEP_FILE.fullmatch(e.name):
                    with contextlib.suppress(FileNotFoundError):
                        found.add((e.name, e.stat(follow_symlinks=False).st_mtime_ns))
    except FileNotFoundError:
        pass
    return found


@dataclass
class Kill:
    index: int
    mode: str  # timed | at-save | guard (the run reached the save before the last)
    resumed: bool  # the killed run was a --resume (False: a fresh start, no checkpoint yet)
    start_step: int  # the step on disk when the run started
    planned: str  # the delay (s) or the temp file count it waited for
    killed_at_s: float  # seconds after the run started
    step_after: int | None
    during_save: bool  # the kill left a temp or unlisted step file the run had not found
    leftovers: int
    artifacts_seen: int  # temp and step files of its saves the poller saw


def reference_run(out: Path, steps: int, save_every: int, env: dict[str, str]
                  ) -> tuple[float, float, float]:
    """(wall seconds, start-up seconds, seconds per step) of an uninterrupted run: start-up
    is the time to its first metrics line (one per step) less one step."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(train_argv(out, steps, save_every, False), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and (out / "metrics.jsonl").exists():
            first = time.perf_counter() - t0
        time.sleep(POLL_S)
    wall = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        sys.exit(f"the reference run failed ({proc.returncode}): {err.strip()}")
    times = [r["time"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "time" in r]
    per_step = (max(times) if times else wall / 2) / steps
    return wall, max((first or 0.0) - per_step, 0.0), per_step


@dataclass
class RunEnd:
    code: int | None  # the exit status when the run ended by itself; None: killed
    seconds: float  # from the start to the kill or the exit
    artifacts_seen: int  # temp and step files of this run's saves the poller saw
    guarded: bool  # killed because a save reached the guard step


def run_and_kill(out: Path, argv: list[str], env: dict[str, str], mode: str, delay: float,
                 save_target: int, guard_step: int | None = None) -> RunEnd:
    """Start ``argv``; SIGKILL it after ``delay`` s (timed) or once ``save_target`` new save
    artifacts (temp files, renamed step files) appeared in ``out`` (at-save), or at once when
    config.json names ``guard_step`` or later (so no kill is lost to a run that reaches its
    end first)."""
    old = save_artifacts(out)  # what earlier runs left is not this run's
    seen: set[tuple[str, int]] = set()
    config_mtime = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)

    def kill(guarded: bool) -> RunEnd:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return RunEnd(None, time.perf_counter() - t0, len(seen), guarded)

    try:
        while True:
            now = time.perf_counter() - t0
            if proc.poll() is not None:
                return RunEnd(proc.returncode, now, len(seen), False)
            seen |= save_artifacts(out) - old
            if guard_step is not None and (m := _mtime(out / CONFIG)) != config_mtime:
                config_mtime = m  # a save replaced config.json: read its step
                step = (read_config(out) or {}).get("step", 0)
                if isinstance(step, int) and step >= guard_step:
                    return kill(True)
            if (mode == "timed" and now >= delay) or (mode == "at-save"
                                                      and len(seen) >= save_target):
                return kill(False)
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            err = proc.stderr.read()
            proc.stderr.close()
            if proc.returncode not in (0, -signal.SIGKILL) and err:
                print(err.strip(), file=sys.stderr)


def compare(ref: Path, run: Path) -> tuple[bool, list[str]]:
    """Whether every tensor of the two checkpoints' files is equal bit for bit, and what
    differs."""
    import torch
    from safetensors.torch import load_file

    a, b = read_config(ref), read_config(run)
    if a is None or b is None:
        return False, ["a checkpoint has no readable config.json"]
    problems = []
    if a.get("step") != b.get("step"):
        problems.append(f"step {a.get('step')} vs {b.get('step')}")
    if set(a["files"]) != set(b["files"]):
        problems.append(f"roles {sorted(a['files'])} vs {sorted(b['files'])}")
    for role in sorted(set(a["files"]) & set(b["files"])):
        ta, tb = load_file(ref / a["files"][role]), load_file(run / b["files"][role])
        if set(ta) != set(tb):
            problems.append(f"{role}: tensor names differ")
        for key in sorted(set(ta) & set(tb)):
            if ta[key].dtype != tb[key].dtype or not torch.equal(ta[key], tb[key]):
                problems.append(f"{role}: {key} differs")
    return not problems, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs before the last resume")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for ref/ and run/ (default: a temp folder, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the default temp folder")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.kills < 0 or args.steps < 1 or args.save_every < 1:
        p.error("--kills must be >= 0, --steps and --save-every >= 1")

    rng = random.Random(args.seed)
    env = child_env(args.threads)
    base = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="kill-resume-"))
    ref, run = base / "ref", base / "run"
    if ref.exists() or run.exists():
        p.error(f"{base} already holds ref/ or run/: give an empty or new --out")
    base.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    try:
        wall, startup, per_step = reference_run(ref, args.steps, args.save_every, env)
        say(f"reference: {args.steps} steps in {wall:.2f} s (start-up {startup:.2f} s, "
            f"{per_step * 1000:.1f} ms/step)")
        roles = len(read_config(ref)["files"])
        per_save = 2 * roles + 1  # a temp and a step file per tensor file, config.json's temp
        kills: list[Kill] = []
        resumes = 0
        max_leftovers = 0
        finished_early = False
        t_all = time.perf_counter()
        while len(kills) < args.kills:
            state = inspect(run)
            step = state.step or 0
            if step >= args.steps:
                finished_early = True  # a kill landed after the last save
                break
            kills_left = args.kills - len(kills)
            saves_left = math.ceil((args.steps - step) / args.save_every)
            # a share of what is left, so kills spread over the whole run instead of the
            # first few taking it to the end
            # (at most 0.9 of it: a kill the run outlives is no kill)
            share = min(0.9, 2.0 / (kills_left + 1))
            mode = "at-save" if rng.random() < AT_SAVE_SHARE else "timed"
            delay = rng.uniform(0, startup + per_step * (args.steps - step) * share)
            target = rng.randint(1, max(1, round(saves_left * per_save * share)))
            # the save before the last one is the guard: a run that gets there with kills
            # left is killed at once; from there on only the last save remains, so the kill
            # waits for its first tensor files (the last stays to be written: a poll may miss
            # temp files, never the step files they become)
            guard = args.steps - args.save_every if step < args.steps - args.save_every else None
            if guard is None:
                mode, target = "at-save", rng.randint(1, roles - 1)
            resumed = state.step is not None
            resumes += resumed
            end = run_and_kill(run, train_argv(run, args.steps, args.save_every, resumed), env,
                               mode, delay, target, guard)
            after = inspect(run)
            max_leftovers = max(max_leftovers, after.leftovers)
            if end.code is not None:  # it ended before the kill
                if end.code != 0:
                    say(f"a run failed with exit status {end.code}")
                    return 1
                finished_early = True
                break
            kills.append(Kill(len(kills) + 1, "guard" if end.guarded else mode, resumed, step,
                              f"{delay:.3f} s" if mode == "timed" else f"file #{target}",
                              round(end.seconds, 3), after.step,
                              bool(after.unfinished - state.unfinished), after.leftovers,
                              end.artifacts_seen))
            k = kills[-1]
            say(f"kill {k.index:3d} {k.mode:7s} {k.planned:>10s} at {k.killed_at_s:6.3f} s: "
                f"step {k.start_step:3d} -> {k.step_after}, during save: {k.during_save}, "
                f"leftovers {k.leftovers}")
        # the last run, to the end
        final_resume = inspect(run).step is not None
        if not (final_resume and inspect(run).step >= args.steps):
            resumes += final_resume
            end = run_and_kill(run, train_argv(run, args.steps, args.save_every, final_resume),
                               env, "timed", math.inf, 0)
            if end.code != 0:
                say(f"the final run failed with exit status {end.code}")
                return 1
        final = inspect(run)
        only_current = final.leftovers == 0 and not final.unfinished
        identical, problems = compare(ref, run)
        summary = {
            "kills": len(kills),
            "kills_during_saves": sum(k.during_save for k in kills),
            "kills_timed": sum(k.mode == "timed" for k in kills),
            "kills_at_save": sum(k.mode == "at-save" for k in kills),
            "kills_guard": sum(k.mode == "guard" for k in kills),
            "resumes": resumes,
            "finished_before_all_kills": finished_early,
            "max_leftover_files": max_leftovers,
            "final_only_current_files": only_current,
            "final_files": final.names,
            "bit_identical": identical,
            "differences": problems[:20],
            "steps": args.steps,
            "save_every": args.save_every,
            "seed": args.seed,
            "reference_seconds": round(wall, 3),
            "startup_seconds": round(startup, 3),
            "ms_per_step": round(per_step * 1000, 2),
            "total_seconds": round(time.perf_counter() - t_all, 1),
            "per_kill": [asdict(k) for k in kills],
        }
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"kills: {summary['kills']} ({summary['kills_timed']} timed, "
                  f"{summary['kills_at_save']} at a save, {summary['kills_guard']} at the "
                  "guard step)")
            print(f"kills during saves: {summary['kills_during_saves']}")
            print(f"resumes: {resumes}")
            print(f"max leftover files seen: {max_leftovers}")
            print(f"final folder holds only the current step's files: {only_current} "
                  f"({', '.join(final.names)})")
            if finished_early:
                print("note: the run reached the last step before every kill was spent")
            for line in problems[:20]:
                print(f"  differs: {line}")
            print(f"bit-identical: {identical}")
        return 0 if identical and only_current else 1
    finally:
        if args.out is None and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        elif args.out is None:
            say(f"kept {base}")


if __name__ == "__main__":
    sys.exit(main())
