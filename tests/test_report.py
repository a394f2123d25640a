"""The report: accuracy tables and per-class drops against PyTorch fp32, and the PNG."""

from __future__ import annotations

import json

import pytest

from ssd_pipeline.cli import main
from ssd_pipeline.suite.report import accuracy_markdown, per_class_drops


def record(backend: str, precision: str, per_class: dict[str, float | None],
           data: str = "abc", images: int = 10) -> dict:
    m = {"bbox_mAP": 0.5, "bbox_mAP_50": 0.8, "bbox_mAP_75": 0.6, "bbox_AR@100": 0.6,
         "per_class": {k: {"mAP": v, "mAP_50": v, "mAP_75": v} for k, v in per_class.items()}}
    return {"backend": backend, "precision": precision, "dataset_sha256": data,
            "num_images": images, "metrics": m}


REF = record("torch", "fp32", {"car": 0.60, "dog": 0.50, "cat": 0.40, "bus": None})


def test_drops_worst_first_unchanged_and_empty_classes_left_out():
    bf16 = record("tvm", "bf16", {"car": 0.55, "dog": 0.50, "cat": 0.42, "bus": None})
    drops = per_class_drops([REF, bf16], top=5)
    assert [(d[1], round(d[4], 4)) for d in drops] == [("car", 0.05), ("cat", -0.02)]
    assert per_class_drops([REF, bf16], top=1) == drops[:1]


def test_drops_only_against_the_same_data():
    other = record("tvm", "bf16", {"car": 0.1, "dog": 0.1, "cat": 0.1}, data="other")
    fewer = record("onnxruntime", "fp32", {"car": 0.1, "dog": 0.1, "cat": 0.1}, images=5)
    assert per_class_drops([REF, other, fewer]) == []


def test_markdown_names_the_equal_and_the_dropped():
    same = record("onnxruntime", "fp32", {"car": 0.60, "dog": 0.50, "cat": 0.40})
    worse = record("tvm", "bf16", {"car": 0.58, "dog": 0.50, "cat": 0.40})
    text = accuracy_markdown([REF, same, worse])
    assert "| tvm/bf16 | car | 0.6000 | 0.5800 | +0.0200 |" in text
    assert "equal to torch/fp32 in every class: onnxruntime/fp32." in text


def test_report_cli_accuracy_only_writes_markdown_and_png(tmp_path, capsys):
    acc = tmp_path / "accuracy.json"
    acc.write_text(json.dumps([REF, record("tvm", "bf16", {"car": 0.5, "dog": 0.5,
                                                           "cat": 0.4})]))
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    assert main(["report", "--accuracy", str(acc), "--markdown", str(md),
                 "--plot", str(png)]) == 0
    assert "| tvm/bf16 | car |" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content, needle", [
    (None, "nothing to report"),
    ('{"x": 1}', "is not a list of accuracy records"),
])
def test_report_refusals(tmp_path, capsys, content, needle):
    args = ["report"]
    if content is not None:
        (tmp_path / "a.json").write_text(content)
        args += ["--accuracy", str(tmp_path / "a.json")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.splitlines()) == 1


def test_readme_tables_name_an_engines_mix_of_precisions(tmp_path):
    """A record whose engine runs some convolutions in another precision (int8's float32 stem)
    says so under the table: its fractions are not one precision's GOP/s over its ceiling."""
    from pathlib import Path

    from ssd_pipeline.suite.report import readme_tables

    measured = Path(__file__).resolve().parents[1] / "fixtures" / "measured"

    def tables(split: dict | None) -> str:
        data = json.loads((measured / "perf.json").read_text())
        for b in data["benchmarks"]:
            info = b.get("extra_info") or {}
            info.pop("executed_gflop_per_image_by_precision", None)
            if split and (info.get("backend"), info.get("precision")) == ("tvm", "int8"):
                info["executed_gflop_per_image_by_precision"] = split
        perf = tmp_path / "perf.json"
        perf.write_text(json.dumps(data))
        return readme_tables(perf, measured / "accuracy.json")

    assert ("tvm int8 executes 0.3 GFLOP per image in fp32 and 65.3 GFLOP per image in int8: "
            "its fractions read each part against its own precision's ceilings."
            ) in tables({"int8": 65.3, "fp32": 0.31})
    assert "GFLOP per image in fp32" not in tables(None)
