"""Regression gating against a saved run: a baseline, a second run compared with it (passes),
the same comparison with the tolerance tightened (fails, naming the gate), and data that
cannot be compared (refused in one line). Speed on the embedded model, small and quick."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import child_env

ROOT = Path(__file__).resolve().parent.parent


def pytest_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=child_env())


@pytest.mark.perf
def test_speed_against_a_saved_baseline(tmp_path):
    perf = ["tests/test_perf.py", "-k", "engine_only and tvm-fp32", "--perf-model", "tiny",
            "--backends", "tvm", "--precisions", "fp32", "--perf-batches", "1",
            "--perf-seconds", "0.3",
            # this test is about the baseline, not the speed floor (tests/test_gates.py)
            "--expect", "perf.cpu_tiny.tvm_fp32_min_ratio=0.01"]
    base = tmp_path / "base.json"
    first = pytest_run(*perf, "--benchmark-json", str(base))
    assert first.returncode == 0, first.stdout[-3000:]
    new = tmp_path / "new.json"
    # 0.3 s windows on a 5 ms model are noisy (ratios 0.77-0.98 seen): a loose tolerance
    # here proves the path; the tight one below proves the gate fails
    again = pytest_run(*perf, "--perf-baseline", str(base), "--benchmark-json", str(new),
                       "--expect", "regression.ratio_drop_max=0.9")
    assert again.returncode == 0, again.stdout[-3000:]
    (bench,) = json.loads(new.read_text())["benchmarks"]
    assert bench["extra_info"]["baseline"]["ratio_vs_onnxruntime"] > 0
    tight = pytest_run(*perf, "--perf-baseline", str(base),
                       "--expect", "regression.ratio_drop_max=-0.5")
    assert tight.returncode == 1, tight.stdout[-3000:]
    assert "vs the baseline's" in tight.stdout and "expected <= -0.5" in tight.stdout
    report = subprocess.run([sys.executable, "-m", "ssd_pipeline.cli", "report", "--compare",
                             str(base), str(new)], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert report.returncode == 0, report.stderr
    row = next(ln for ln in report.stdout.splitlines() if "| engine-only | tvm | fp32 | 1 |" in ln)
    assert row.count("%") == 1, row  # img/s change; the ratio change follows


def test_accuracy_against_a_saved_baseline(tmp_path):
    acc = ["tests/test_accuracy.py", "-k", "test_accuracy[", "--models", "tiny", "--backends",
           "onnxruntime", "--batch-size", "8"]
    first = pytest_run(*acc, "--max-images", "16", "--records-dir", str(tmp_path / "a"))
    assert first.returncode == 0, first.stdout[-3000:]
    base = tmp_path / "a" / "accuracy.json"
    same = pytest_run(*acc, "--max-images", "16", "--accuracy-baseline", str(base),
                      "--records-dir", str(tmp_path / "b"))
    assert same.returncode == 0, same.stdout[-3000:]
    tight = pytest_run(*acc, "--max-images", "16", "--accuracy-baseline", str(base),
                       "--expect", "regression.stat_drop_max=-0.01",
                       "--records-dir", str(tmp_path / "c"))
    assert tight.returncode == 1 and "drop vs the baseline" in tight.stdout, tight.stdout[-3000:]
    other = pytest_run(*acc, "--max-images", "8", "--accuracy-baseline", str(base),
                       "--records-dir", str(tmp_path / "d"))
    assert other.returncode == 1, other.stdout[-3000:]
    assert "cannot be compared: image count differs (baseline 16, now 8)" in other.stdout
