"""benchmark/device_check.sh, the one-command proof of the CUDA path: its CPU rehearsal runs every step here,
and without CUDA the real check stops at once with one line."""
import os
import subprocess

import pytest
import torch

from conftest import ROOT

SCRIPT = str(ROOT / "benchmark" / "device_check.sh")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_the_check_stops_with_one_line(tmp_path):
    result = subprocess.run(["bash", SCRIPT, str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().startswith("error: CUDA is not available")
    assert "\n" not in result.stderr.strip() and not (tmp_path / "out").exists()


def test_the_cpu_rehearsal_runs_every_step_and_writes_its_report(tmp_path):
    environment = {**os.environ, "PYTHON": __import__("sys").executable}
    result = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), "--cpu-rehearsal"], capture_output=True, text=True,
                            env=environment, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    report = (tmp_path / "out" / "report.md").read_text()
    for section in ("## Machine", "## CUDA tests", "## Updates per second", "## A short fine-tuning",
                    "## Runs at once", "## GPU utilisation"):
        assert section in report, report
    assert "| baq_iql.py | cpu | eager |" in report and "| baq_iql.py | cpu | compiled |" in report
    assert "all finite" in report and "fine-tune in a CPU-only process" in report, report
    assert "| 1 |" in report and "(2 finished)" in report, report
