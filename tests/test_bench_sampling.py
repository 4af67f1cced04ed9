"""``benchmarks/bench_sampling.py`` runs end to end: its ``--tiny`` smoke run measures all three
workloads eager and compiled, reports host syncs per step, and compiled agrees with eager."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_sampling.py"
WORKLOADS = {"unguided", "classifier", "pdae"}


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a shared 2-core box: one thread each
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=timeout, check=False, env=env, cwd=ROOT)


@pytest.mark.slow
def test_tiny_run_reports_every_workload_and_mode():
    proc = _run("--tiny", "--json", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout is the JSON alone; the tables went to stderr
    assert "FAILED" not in proc.stderr and result["failures"] == []
    config = result["config"]
    assert config["tiny"] is True and config["device"] == "cpu"
    assert (config["batch"], config["steps"]) == (4, 10)
    assert result["machine"]["loadavg_start"] >= 0
    assert set(result["workloads"]) == WORKLOADS
    for name, w in result["workloads"].items():
        assert set(w["modes"]) == {"eager", "compiled"}, name
        for mode, row in w["modes"].items():
            assert "error" not in row, (name, mode, row)
            assert len(row["seconds"]) == config["repeats"]
            for key in ("images_per_s", "ms_per_step", "median_s", "first_run_s"):
                assert row[key] > 0, (name, mode, key)
            assert math.isclose(row["images_per_s"], 4 / row["median_s"])
            assert math.isclose(row["ms_per_step"], 1000 * row["median_s"] / 10)
            # host syncs per step are reported (a count, possibly 0), with how they were found
            assert row["syncs_per_step"] >= 0 and row["every_step_syncs"] >= 0
            assert row["syncs_method"] == ("HostReadCounter" if mode == "eager" else "profiler")
        assert w["modes"]["compiled"]["compile_s"] >= 0
        assert w["speedup"] > 0
        assert w["agreement"]["ok"] and w["agreement"]["max_abs_diff"] <= 1e-3
        eager = w["syncs"]["eager"]
        assert set(eager) == {"dispatch_mode", "profiler"}
        counted = eager["dispatch_mode"]
        assert counted["steps"] == 10 and counted["per_step"] == counted["total"] / 10
        # a CPU run reads no device tensor back; what it counts are CPU reads
        assert all(key.endswith("[cpu]") for key in counted["by_op"])
        assert all(s["site"] for s in counted["sites"])
        assert w["sync_methods_agree"], name  # the profiler sees what the dispatch mode sees
        assert set(w["syncs"]["compiled"]) == {"profiler"}
        assert w["graphs_compiled_in_rounds"] == 0  # no recompilation was timed


def test_missing_cuda_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    proc = _run("--device", "cuda", "--tiny", timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0], proc.stderr
