"""Multi-process training through torchrun (gloo on CPU): ranks agree, only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from guidekit.checkpoint import read_checkpoint
from guidekit.ddpm import load_dpm


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "dist"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "guidekit",
        "train",
        "ddpm",
        "--out",
        str(out),
        "--steps",
        "6",
        "--batch-size",
        "16",
        "--model-channels",
        "8",
        "--channel-mult",
        "1,2",
        "--attention",
        "",
        "--timesteps",
        "50",
        "--log-every",
        "2",
        "--save-every",
        "3",
        "--samples",
        "4",
        "--device",
        "cpu",
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    # one JSON summary: only rank 0 reports (and fit checked that the ranks' weights agree)
    summaries = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert len(summaries) == 1
    assert json.loads(summaries[0])["steps"] == 6
    # rank 0 alone writes: each logged step appears once
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4, 6]
    assert read_checkpoint(out).step == 6
    assert not list(out.glob(".*.tmp"))
    dpm = load_dpm(out)
    assert all(torch.isfinite(p).all() for p in dpm.model.parameters())
    assert (out / "samples.png").exists()
