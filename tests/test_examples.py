"""The examples/*.py scripts, each run as a user runs it (a subprocess) with --tiny: they
finish, write the files they promise and report figures that make sense."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from guidekit.testing import assert_grid_layout

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CELL = 16 * 4 + 1  # a 16 px digit at grid scale 4, with its padding


def run_example(script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def run_json(script: str, *args: str | Path) -> dict[str, Any]:
    done = run_example(script, "--tiny", "--json", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def grid_cells(path: str | Path) -> tuple[int, int]:
    """(columns, rows) of a grid of 16 px images written at scale 4."""
    width, height = Image.open(path).size
    assert (width - 1) % CELL == 0 and (height - 1) % CELL == 0, (width, height)
    return (width - 1) // CELL, (height - 1) // CELL


def test_train_dpm(tmp_path):
    s = run_json("train_dpm.py", "--out", tmp_path)
    assert s["steps"] == 4 and math.isfinite(s["final_loss"]) and s["final_loss"] > 0
    assert (tmp_path / "ddpm" / "config.json").is_file()
    assert Path(s["grid"]) == tmp_path / "samples.png"
    assert grid_cells(s["grid"]) == (8, 8)
    # the digits are mostly background (-1): their mean is far below 0
    assert s["data_mean"] < -0.2 and 0 < s["sample_std"] <= 1


def test_classifier_guidance(tmp_path):
    s = run_json("classifier_guidance.py", "--out", tmp_path, "--scale", "4")
    assert s["scale"] == 4.0
    for kind in ("classifier", "judge", "ddpm"):
        assert (tmp_path / kind / "config.json").is_file(), kind
    # the tiny DPM has T = 100: the classifier's accuracy is reported over ten t buckets
    rows = s["classifier_accuracy_by_t"]
    assert [r["t_from"] for r in rows] == list(range(0, 100, 10)) and rows[-1]["t_to"] == 100
    for key in ("judge_test_accuracy", "guided_accuracy", "unguided_accuracy"):
        assert 0 <= s[key] <= 1, key
    assert grid_cells(s["grid"]) == (8, 10)  # row r: digit r


def test_pdae_reconstruction(tmp_path):
    s = run_json("pdae_reconstruction.py", "--out", tmp_path, "--n", "4")
    assert (tmp_path / "pdae" / "config.json").is_file()
    mse = {r["method"]: r["mse"] for r in s["methods"]}
    assert list(mse) == ["DDIM (inferred x_T)", "PDAE (inferred x_T)", "PDAE (random x_T)",
                         "DDIM (random x_T)"]
    assert all(-1 <= r["ssim"] <= 1 for r in s["methods"])
    assert all(0 <= v <= 1 for v in mse.values())
    # even a tiny DPM's inverted x_T holds the image; a random one does not
    assert mse["DDIM (inferred x_T)"] < mse["DDIM (random x_T)"]
    assert s["n"] == 4
    # the originals, then one row per method, each row labelled
    assert_grid_layout(s["grid"], 5, 4, CELL, row_labels=True)


@pytest.mark.parametrize("script", ["classifier_guidance.py", "pdae_reconstruction.py"])
def test_real_settings_need_a_dpm(script, tmp_path):
    done = run_example(script, "--out", tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: give --dpm DPM_CHECKPOINT (from examples/train_dpm.py), or --tiny"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script", ["classifier_guidance.py", "pdae_reconstruction.py"])
def test_a_missing_dpm_is_one_line(script, tmp_path):
    done = run_example(script, "--dpm", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0], lines
