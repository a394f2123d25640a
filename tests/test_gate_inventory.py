"""Every entry of the expectations file is a gate that can fail, or says it is measured only.

The inventory is data: each gate key (``Expectations.gate_keys``) has a direction read from
its name, a threshold that is a real number (no 0.0 floor that nothing can miss) or
``measured_only``, a source, and below the test that shows it failing on a real run. Its own
check (``core.gates.require``, what the tests and ``ssd-pipeline run`` apply) passes at the
threshold and fails just past it, for every key.
"""

from __future__ import annotations

import fnmatch
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ssd_pipeline.core.expectations import Expectations
from ssd_pipeline.core.gates import GateFailure, direction, require
from tests.helpers import child_env

ROOT = Path(__file__).resolve().parent.parent

# gate key pattern -> the test that applies it to a real measurement and shows it failing
PROVEN_BY = {
    "accuracy.*.map_50_min": "tests/test_gates.py::test_gate_passes_below_and_fails_above",
    "accuracy.*.map_min": "tests/test_job.py::test_main_job_exits_1_naming_the_failed_gate",
    "accuracy.drop_vs_torch.*": "tests/test_gate_inventory.py::test_real_runs_fail_past_the_"
                                "measured_value",
    "parity.*.raw_rel_err_max": "tests/test_gate_inventory.py::test_real_runs_fail_past_the_"
                                "measured_value",
    "parity.*.det_*": "tests/test_parity.py::test_detection_parity_is_strict_both_ways",
    "reference.*": "tests/test_reference.py::test_pipeline_equals_mmdet_inference_detector",
    "simplify.rel_err_max": "tests/test_export.py::test_simplify_refuses_a_wrong_model",
    "preprocess.abs_err_max": "tests/test_preprocess.py (equality with mmdet's pipeline)",
    "perf.*_min_ratio": "tests/test_gates.py::test_perf_floor_fails_above_and_passes_below",
    "regression.ratio_drop_max": "tests/test_baseline.py::test_speed_against_a_saved_baseline",
    "regression.stat_drop_max": "tests/test_baseline.py::test_accuracy_against_a_saved_baseline",
}

EXPECTATIONS = Expectations.load()


def just_past(key: str, threshold: float) -> float:
    """The nearest value on the failing side (past a published rounding, where there is one)."""
    decimals = EXPECTATIONS.optional(f"{key.rsplit('.', 1)[0]}.decimals")
    step = 10.0 ** -decimals if decimals is not None else max(abs(threshold) * 1e-6, 1e-12)
    return threshold - step if direction(key) == ">=" else threshold + step


@pytest.mark.parametrize("key", EXPECTATIONS.gate_keys())
def test_every_gate_can_fail(key):
    assert EXPECTATIONS.source(key) != "(no source stated)", f"{key}: no source"
    assert any(fnmatch.fnmatch(key, p) for p in PROVEN_BY), f"{key}: no test shows it failing"
    d = direction(key)  # a key without a direction is not a gate: refuse it
    if EXPECTATIONS.is_measured_only(key):
        pytest.skip(f"{key} is measured_only: recorded and reported, not gated")
    threshold = EXPECTATIONS.number(key)
    assert threshold > 0 and math.isfinite(threshold), f"{key} = {threshold}: cannot fail"
    require(EXPECTATIONS, key, key, threshold)  # the boundary passes
    with pytest.raises(GateFailure, match=f"expected {d}"):
        require(EXPECTATIONS, key, key, just_past(key, threshold))
    with pytest.raises(GateFailure):
        require(EXPECTATIONS, key, key, float("nan"))


@pytest.mark.parity
def test_real_runs_fail_past_the_measured_value():
    """An AP-drop ceiling and a parity tolerance moved just past what the run measures (a drop
    of exactly 0, a relative error of ~1e-6) make the real tests fail, naming the gate."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_accuracy.py",
         "tests/test_parity.py", "-k", "drop_vs_torch or onnx_vs_torch_raw", "--models", "tiny",
         "--backends", "torch,onnxruntime", "--max-images", "16", "--batch-size", "8",
         "--expect", "accuracy.drop_vs_torch.fp32_max=-1e-9",
         "--expect", "parity.fp32.raw_rel_err_max=1e-12"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=child_env())
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "2 failed" in proc.stdout, proc.stdout[-3000:]
    assert "drop vs torch (onnxruntime/fp32): got 0.0000, expected <= -1e-09" in proc.stdout
    assert "(worst of 12 outputs): got" in proc.stdout and "expected <= 1e-12" in proc.stdout
