"""bench/gpu_check.py, run as a user runs it: its fp32 path on the CPU (--cpu), and its answer without a GPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
SUMMARY = re.compile(r"^GPU check \d{4}-\d{2}-\d{2} on the CPU \(--cpu, no GPU used\), torch \S+, affiner \S+: "
                     r"1 PASS, 0 FAIL, 0 SKIP in \d+ s$")


def gpu_check(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cpu_run_passes_the_fp32_path_and_ends_with_the_summary_line(tmp_path):
    result = gpu_check("--cpu", "--keep", str(tmp_path / "work"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    row = next(line for line in lines if line.startswith("lora-fp32 "))
    assert row.split()[1] == "PASS" and "float32" in row and "tok/s" in row, row
    assert re.search(r"\d+\.\d{3}→\d+\.\d{3}", row), row  # held-out loss base→tuned
    assert SUMMARY.match(lines[-1]), lines[-1]
    assert not (tmp_path / "runs").exists()  # everything went to the work folder
    assert list((tmp_path / "work" / "lora-fp32" / "export" / "merged").glob("*.safetensors"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the no-GPU answer cannot be seen")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    result = gpu_check(cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    assert "no GPU" in result.stdout and "--cpu" in result.stdout
