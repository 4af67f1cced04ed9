"""``benchmarks/bench_official.py`` runs without the official PDAE checkout: guidekit's rows are
measured and the official column is skipped; a PATH that is not a checkout is one line, exit 2.
No test reads the official code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_official.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_guidekit_rows_without_the_official_checkout():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "2", "--rounds", "1",
                           "--warmup", "1", "--variants", "fp32", "--threads", "1", "--json"],
                          capture_output=True, text=True, timeout=600, env=ENV, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["official"] == {"path": None, "skipped": True}
    assert any("skipped" in note for note in result["notes"])
    assert result["failed"] == [] and "architecture_check" not in result
    rows = result["rows"]
    assert {(r["task"], r["variant"], r["side"]) for r in rows} == {
        (t, "fp32", "guidekit") for t in ("ddpm", "pdae", "classifier")}
    for r in rows:
        assert "error" not in r, r
        for key in ("ms_per_step", "images_per_s", "peak_mib", "gflop_per_step",
                    "first_step_s"):
            assert r[key] > 0, (r["task"], key, r[key])
        assert r["images_per_s"] == pytest.approx(32 * 1000 / r["ms_per_step"])
        assert r["finite"] and r["frozen_unchanged"]
        assert "speedup_vs_official" not in r  # nothing to compare with
    params = result["params"]["guidekit"]
    assert params["frozen unet"] == params["ddpm trainable"] == 1_369_953
    assert result["params"]["official"] == {}


@pytest.mark.parametrize("make", [lambda tmp: tmp / "missing", lambda tmp: tmp])
def test_a_path_that_is_not_a_checkout_is_one_line_and_exit_2(tmp_path, make):
    path = make(tmp_path)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--official", str(path)],
                          capture_output=True, text=True, timeout=120, env=ENV, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ckczzj/PDAE" in lines[0] and str(path) in lines[0], proc.stderr
    assert proc.stdout == ""
