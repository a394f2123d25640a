"""The seed-compatible scripts run as a user runs them (bash, on the embedded model), and
their exit code is the gate's: 0 when it is met, non-zero when a floor is moved past the
measured value (through PYTEST_ADDOPTS, pytest's own way to add options)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import child_env

ROOT = Path(__file__).resolve().parent.parent
SMALL = "--max-images 16 -p no:cacheprovider"


def script(name: str, *args: str, addopts: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"scripts/{name}", "--bs", "8", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env=child_env(MODEL="tiny", PYTEST_ADDOPTS=addopts))


@pytest.mark.parametrize("floor,rc", [("0", 0), ("0.999", 1)])
def test_accuracy_script_follows_the_gate(floor, rc):
    key = "accuracy.ssd_tiny_synthetic"
    p = script("infer_ssd_fp16_accuracy.sh",
               addopts=f"{SMALL} --expect {key}.map_50_min={floor} --expect {key}.map_min=0")
    assert p.returncode == rc, p.stdout[-3000:] + p.stderr[-2000:]
    assert "precision auto ->" in p.stderr  # says which precision the CPU runs instead
    assert ("2 passed" if rc == 0 else "mAP@0.5: got") in p.stdout, p.stdout[-2000:]


@pytest.mark.perf
@pytest.mark.parametrize("floor,rc", [("0.01", 0), ("100", 1)])
def test_performance_script_follows_the_gate(floor, rc, tmp_path):
    p = script("infer_ssd_fp16_performance.sh", "--precision", "fp32",
               addopts=f"-p no:cacheprovider --perf-seconds 0.3 "
                       f"--expect perf.cpu_tiny.tvm_fp32_min_ratio={floor}")
    assert p.returncode == rc, p.stdout[-3000:] + p.stderr[-2000:]
    assert (ROOT / "out" / "perf_ssd.md").read_text().count("| tvm | fp32 | 8 |") == 1


def test_unknown_model_is_refused():
    bad = subprocess.run(["bash", "scripts/infer_ssd_fp16_accuracy.sh"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60,
                         env=child_env(MODEL="yolo"))
    assert bad.returncode == 2 and "unknown MODEL=yolo" in bad.stderr, bad.stderr
