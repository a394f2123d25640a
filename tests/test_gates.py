"""The accuracy gate can fail. On the embedded model: the same run passes with a floor below
the measured value and fails, with "got X, expected >= Y" and exit code 1, above it; a
pipeline with a deliberate fault (colour channels swapped, box rescale skipped) misses the
expectations file's own floor; and --require-data turns a missing-data skip into a failure."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssd_pipeline.core.gates import GateFailure, require_at_least
from tests.helpers import child_env

ROOT = Path(__file__).resolve().parent.parent
KEY = "accuracy.ssd_tiny_synthetic"


def run_gate(records: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "tests/test_accuracy.py", "-k", "not drop",
           "-p", "no:cacheprovider", "-q", "--models", "tiny", "--backends", "onnxruntime",
           "--precisions", "fp32", "--max-images", "40", "--batch-size", "8", "--records-dir",
           str(records)]
    for o in overrides:
        cmd += ["--expect", o]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=child_env())


def test_gate_passes_below_and_fails_above(tmp_path):
    ok = run_gate(tmp_path, f"{KEY}.map_50_min=0", f"{KEY}.map_min=0")
    assert ok.returncode == 0, ok.stdout[-3000:]
    (rec,) = json.loads((tmp_path / "accuracy.json").read_text())
    measured = rec["metrics"]["bbox_mAP_50"]
    assert rec["num_images"] == 40 and rec["weights"].startswith("sha256:")
    floor = round(min(measured + 0.05, 1.0) if measured < 0.999 else 1.0001, 4)
    bad = run_gate(tmp_path, f"{KEY}.map_50_min={floor}", f"{KEY}.map_min=0")
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert f"mAP@0.5: got {measured:.4f}, expected >= {floor:.4f}" in bad.stdout, bad.stdout[-3000:]


@pytest.mark.parametrize("fault", ["channels_swapped", "box_rescale_skipped"])
def test_gate_catches_a_broken_pipeline(fault, bundles, store, expectations, monkeypatch,
                                        record_property):
    from ssd_pipeline import data
    from ssd_pipeline.suite.evaluate import accuracy_record

    tiny = bundles("tiny")
    dataset = tiny.dataset(max_images=60)
    settings = tiny.settings
    if fault == "channels_swapped":
        settings = dataclasses.replace(settings, bgr_to_rgb=not settings.bgr_to_rgb)
    else:
        real = data.preprocess

        def no_rescale(img, s, img_id=0):
            x, meta = real(img, s, img_id)
            return x, dataclasses.replace(meta, scale_factor=(1.0, 1.0))

        monkeypatch.setattr(data, "preprocess", no_rescale)
    rec = accuracy_record(tiny.runner("onnxruntime"), dataset,
                          tiny.postprocessor(dataset.cat_ids), settings, 8,
                          {"weights": "fault test"})
    got = rec["metrics"]["bbox_mAP_50"]
    record_property("faulty_map_50", got)
    with pytest.raises(GateFailure, match=r"got .* expected >="):
        require_at_least("mAP@0.5", got, expectations.number(f"{KEY}.map_50_min"))


def test_require_data_turns_skip_into_failure(tmp_path):
    base = [sys.executable, "-m", "pytest", "tests/test_accuracy.py", "-q", "-p",
            "no:cacheprovider", "--models", "ssd300", "--backends", "torch",
            "--datasets-dir", str(tmp_path / "none")]
    skipped = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert skipped.returncode == 0 and "skipped" in skipped.stdout, skipped.stdout[-2000:]
    assert "does not exist" in skipped.stdout  # the reason is listed in the summary
    failed = subprocess.run([*base, "--require-data"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert failed.returncode == 1, failed.stdout[-2000:]
    assert "--require-data: no COCO val2017" in failed.stdout


def check_benchmark_json(data: dict) -> None:
    """The --benchmark-json file is a contract: what report, baselines and users read."""
    host = data["machine_info"]["ssd_pipeline"]
    assert {"cpu_model", "llvm_cpu", "threads", "avx512_bf16", "versions"} <= host.keys(), host
    assert data["commit_info"].get("id") or data["commit_info"].get("error"), data["commit_info"]
    (bench,) = data["benchmarks"]
    info = bench["extra_info"]
    for key in ("images_per_s", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99",
                "gflops", "gflop_per_image", "ratio_vs_onnxruntime", "onnxruntime_images_per_s"):
        assert isinstance(info[key], float) and info[key] > 0, (key, info.get(key))
    assert info["mode"] == "engine-only" and info["batch"] == 1 and info["rounds"] >= 3
    assert (info["backend"], info["precision"], info["device"]) == ("tvm", "fp32", "cpu")
    assert info["target"].startswith("llvm -mcpu=") and info["engine_batch"] == "dynamic"
    assert info["weights"].startswith("random-init") and info["checkpoint_load"] == "none"
    assert bench["stats"]["rounds"] == info["rounds"]


def test_perf_floor_fails_above_and_passes_below(tmp_path):
    """A speed floor is a gate too: "got X img/s, expected >= Y" and exit 1 when missed."""
    base = [sys.executable, "-m", "pytest", "tests/test_perf.py", "-q", "-p", "no:cacheprovider",
            "-k", "engine_only and tvm-fp32", "--backends", "onnxruntime,tvm",
            "--perf-batches", "1", "--perf-seconds", "0.3"]
    env = child_env()
    bench_json = tmp_path / "bench.json"
    ok = subprocess.run([*base, "--expect", "perf.cpu.tvm_fp32_min_ratio=0.01",
                         "--benchmark-json", str(bench_json)], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=env)
    assert ok.returncode == 0, ok.stdout[-3000:]
    check_benchmark_json(json.loads(bench_json.read_text()))
    bad = subprocess.run([*base, "--expect", "perf.cpu.tvm_fp32_min_ratio=100"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert "tvm/fp32 engine-only batch 1 median img/s: got" in bad.stdout
    assert "expected >=" in bad.stdout and "100.0 x onnxruntime fp32's median" in bad.stdout, \
        bad.stdout[-2000:]


@pytest.mark.parametrize("got,passes", [(0.4354, False), (0.4356, True), (0.4358, True),
                                        (0.436, True), (float("nan"), False)])
def test_published_floor_is_met_at_published_precision(got, passes, expectations):
    """SSD300's 0.436 was published rounded to 3 decimals (mmdet's CocoMetric): a true 0.4356
    meets it, 0.4354 does not, and the message states the rule."""
    key = "accuracy.ssd300_coco"
    decimals = expectations.number(f"{key}.decimals")
    assert decimals == 3
    floor = expectations.number(f"{key}.map_50_min")
    if passes:
        require_at_least("mAP@0.5", got, floor, decimals=int(decimals))
    else:
        with pytest.raises(GateFailure, match=r"expected >= 0\.4360"):
            require_at_least("mAP@0.5", got, floor, decimals=int(decimals))
    with pytest.raises(GateFailure, match=r"0\.4359 \(0\.436 at the published 3 decimals\)"):
        require_at_least("mAP@0.5", 0.4359, 0.437, decimals=3)
