"""`make gpu-check` on a machine without CUDA says so in one line and succeeds at once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .helpers import ROOT


@pytest.mark.slow
def test_without_cuda_it_exits_zero_with_one_line_reason():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA" in lines[0], done.stdout


def test_report_table_names_each_check_and_its_first_error_line():
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import markdown

    report = {
        "device": "Fake GPU",
        "torch": "2.14.1",
        "date": "2026-12-02",
        "checks": {
            "matmul": {"bf16_tflops": 790.0, "ok": True},
            "zero3": {"ok": False, "error": "RuntimeError: engine failed\nTraceback line"},
        },
    }
    table = markdown(report)
    assert "| matmul | yes | bf16_tflops=790.0 |" in table
    assert "| zero3 | NO | RuntimeError: engine failed |" in table


def test_a_rerun_keeps_the_other_checks_of_the_same_machine_only(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import json

    from gpu_check import kept_results

    machine = {"device": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0"}
    earlier = {
        **machine,
        "date": "2026-12-01",
        "checks": {"matmul": {"ok": True, "bf16_tflops": 788.2}, "zero2": {"ok": False, "error": "x"}},
    }
    previous = tmp_path / "gpu_check.json"
    assert kept_results(previous, machine, {"zero2"}) == {}  # nothing recorded yet
    previous.write_text(json.dumps(earlier))
    kept = kept_results(previous, machine, {"zero2"})
    assert kept == {"matmul": {"ok": True, "bf16_tflops": 788.2, "date": "2026-12-01"}}  # zero2 is redone
    with pytest.raises(SystemExit, match="NVIDIA A100"):
        kept_results(previous, {**machine, "device": "NVIDIA A100"}, {"zero2"})
