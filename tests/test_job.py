"""The main job (README command 1) runs end to end on the embedded default and writes its
records and report."""

from __future__ import annotations

import json

from ssd_pipeline.cli import main as cli_main


def test_main_job_on_the_embedded_default(tmp_path, store, capsys):
    rc = cli_main(["run", "--backends", "torch,onnxruntime,tvm", "--max-images", "24",
                   "--perf-batches", "1", "--perf-seconds", "0.2", "--cache-dir",
                   str(store.root), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out[-2000:]
    for name in ("accuracy.json", "bench.json", "report.md", "report.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images"] == 24 and summary["weights"].startswith("sha256:")
    assert all(v > 0.5 for v in summary["accuracy"].values()), summary["accuracy"]
    assert "[6/6] engine-only speed" in out and "| tvm | fp32 |" in out
