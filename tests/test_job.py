"""The main job (README command 1) runs end to end on the embedded default, writes its
records and report, ends with one verdict line per gate and exits 1 when a gate fails."""

from __future__ import annotations

import json

import pytest

from ssd_pipeline.cli import main as cli_main

KEY = "accuracy.ssd_tiny_synthetic"


def run(tmp_path, store, capsys, *expect: str) -> tuple[int, str]:
    args = ["run", "--backends", "torch,onnxruntime,tvm", "--max-images", "24",
            "--perf-batches", "1", "--perf-seconds", "0.5", "--cache-dir", str(store.root),
            "--out", str(tmp_path)]
    for e in expect:
        args += ["--expect", e]
    rc = cli_main(args)
    return rc, capsys.readouterr().out


def test_main_job_on_the_embedded_default(tmp_path, store, capsys):
    # 24 images: the full split's floors do not apply to a subset; speed floors are not what
    # this test is about (it may share the CPU with another xdist worker): the verdicts must
    # still list every gate
    rc, out = run(tmp_path, store, capsys, f"{KEY}.map_50_min=0", f"{KEY}.map_min=0",
                  "perf.cpu_tiny.tvm_fp32_min_ratio=0.01",
                  "perf.cpu_tiny.torch_fp32_min_ratio=0.01")
    assert rc == 0, out[-3000:]
    for name in ("accuracy.json", "bench.json", "report.md", "report.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images"] == 24 and summary["weights"].startswith("sha256:")
    assert summary["checkpoint_load"] == "weights_only"
    assert all(v > 0.5 for v in summary["accuracy"].values()), summary["accuracy"]
    assert "[6/6] engine-only speed" in out and "| tvm | fp32 |" in out
    statuses = {(v["key"], v["case"]): v["status"] for v in summary["verdicts"]}
    assert statuses[f"{KEY}.map_50_min", "tvm/fp32"] == "PASS"
    assert statuses["parity.fp32.raw_rel_err_max", "tvm/fp32 vs torch/fp32"] == "PASS"
    assert statuses["accuracy.drop_vs_torch.fp32_max", "tvm/fp32 bbox_mAP"] == "PASS"
    assert statuses["perf.cpu_tiny.tvm_fp32_min_ratio", "tvm/fp32 batch 1"] == "PASS"
    assert f"PASS     {KEY}.map_50_min [tvm/fp32]: got" in out


@pytest.mark.parametrize("floor", ["map_50_min=0.999"])
def test_main_job_exits_1_naming_the_failed_gate(tmp_path, store, capsys, floor):
    rc, out = run(tmp_path, store, capsys, f"{KEY}.{floor}", f"{KEY}.map_min=0")
    assert rc == 1, out[-3000:]
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("FAIL"))
    assert f"{KEY}.map_50_min" in line and "expected >= 0.9990" in line, line
    assert "gates FAILED" in out
