"""``benchmarks/gpu.sh`` runs end to end before a GPU is at hand: its CPU dry run
(``--device cpu --tiny``) writes one JSON with every section measured and no errors."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu",
                           "--tiny", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tiny"] is True and result["machine"]["device"] == "cpu"
    assert not [s for s in ("train", "pdae_vs_ddpm", "sampling", "syncs")
                if "error" in result[s]]
    train = result["train"]
    assert train["flops_per_step"] > 0 and train["images_per_s"] > 0
    assert train["mfu"] is None  # no peak is known for a CPU
    pdae = result["pdae_vs_ddpm"]
    assert set(pdae["results"]) == {"ddpm", "pdae"}
    assert math.isclose(pdae["pdae_over_ddpm_throughput"], pdae["results"]["pdae"]
                        ["images_per_s"] / pdae["results"]["ddpm"]["images_per_s"])
    variants = result["sampling"]["variants"]
    assert set(variants) == {"eager", "compiled"}  # CUDA graphs only on CUDA
    assert all(v["images_per_s"] > 0 for v in variants.values())
    syncs = result["syncs"]
    assert syncs["steps"] == 5 and syncs["per_step"] == syncs["total"] / 5
    # a CPU run reads no device tensor back; what it counts are CPU reads
    assert all(key.endswith("[cpu]") for key in syncs["by_op"])


def test_gpu_script_refuses_a_missing_gpu_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--out",
                           str(tmp_path / "g.json")], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cpu --tiny" in lines[0], proc.stderr
    assert not (tmp_path / "g.json").exists()
