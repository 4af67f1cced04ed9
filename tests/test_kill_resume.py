"""benchmarks/kill_resume.py end to end: SIGKILLed and resumed training ends bit-identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_resume.py"


@pytest.mark.slow
def test_three_kills_then_resume_is_bit_identical(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--kills", "3", "--seed", "0", "--out", str(tmp_path),
         "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.stdout.strip(), proc.stderr
    result = json.loads(proc.stdout)
    assert result["bit_identical"], result["differences"]
    assert result["final_only_current_files"], result["final_files"]
    assert result["kills"] >= 1 and result["resumes"] >= 1, result
    assert proc.returncode == 0, proc.stderr
