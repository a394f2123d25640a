"""Bad input ends with one line 'error: ...' naming the thing, and exit code 2 — no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ssd_pipeline.cli import export_main


def run_export(capsys, *args: str) -> tuple[int, str]:
    rc = export_main(list(args))
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2, f"got exit code {rc}, expected 2; stderr: {err}"
    assert len(lines) == 1, f"expected one 'error:' line, got: {err!r}"
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def test_missing_checkpoint(tmp_path, capsys):
    rc, err = run_export(capsys, "--weight", str(tmp_path / "nope.pth"),
                         "--output", str(tmp_path / "m.onnx"))
    assert_one_line_error(rc, err, "checkpoint not found", "nope.pth")


def test_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"this is not a checkpoint" * 100)
    rc, err = run_export(capsys, "--weight", str(bad), "--output", str(tmp_path / "m.onnx"))
    assert_one_line_error(rc, err, "not a readable PyTorch checkpoint", "garbage.pth")


def test_truncated_checkpoint(tmp_path, capsys):
    import torch

    good = tmp_path / "full.pth"
    torch.save({"state_dict": {"w": torch.zeros(1000, 100)}}, good)
    cut = tmp_path / "truncated.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    rc, err = run_export(capsys, "--weight", str(cut), "--output", str(tmp_path / "m.onnx"))
    assert_one_line_error(rc, err, "truncated.pth", "download it again")


def test_checkpoint_of_another_architecture(tmp_path, capsys):
    import torch

    other = tmp_path / "resnet_like.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, other)
    rc, err = run_export(capsys, "--weight", str(other), "--output", str(tmp_path / "m.onnx"))
    assert_one_line_error(rc, err, "does not fit config", "missing keys", "unexpected keys")


def test_checkpoint_with_wrong_shapes(tmp_path, capsys, artifacts):
    """Same key names, other class count: the shape mismatch is named."""
    import torch

    state = {k: v.clone() for k, v in artifacts.torch_model.state_dict().items()}
    state["bbox_head.cls_convs.0.0.weight"] = torch.zeros(4 * 21, 512, 3, 3)
    path = tmp_path / "voc.pth"
    torch.save({"state_dict": state}, path)
    rc, err = run_export(capsys, "--weight", str(path), "--output", str(tmp_path / "m.onnx"))
    assert_one_line_error(rc, err, "shape mismatches", "bbox_head.cls_convs.0.0.weight")


def test_missing_config(tmp_path, capsys):
    rc, err = run_export(capsys, "--cfg", str(tmp_path / "no_such.py"),
                         "--output", str(tmp_path / "m.onnx"))
    assert_one_line_error(rc, err, "config not found", "no_such.py")


@pytest.mark.parametrize("where", ["missing_dir", "is_directory", "under_a_file"])
def test_unwritable_output(tmp_path, capsys, where):
    target = {"missing_dir": tmp_path / "no" / "such" / "m.onnx",
              "is_directory": tmp_path,
              "under_a_file": Path(__file__) / "m.onnx"}[where]
    rc, err = run_export(capsys, "--output", str(target))
    assert_one_line_error(rc, err, "cannot write")


def test_cli_subprocess_prints_one_line(tmp_path):
    """The real entry point, as a user runs it: one line on stderr, exit 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "ssd_pipeline.export", "--weight", str(tmp_path / "x.pth"),
         "--output", str(tmp_path / "m.onnx")], capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "checkpoint not found")
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


def _onnx_with_input(path: Path, shape: list[int]) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["out"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.mark.parametrize("case, needles", [
    ("missing", ("--onnx", "does not exist")),
    ("wrong_input", ("--onnx", "does not fit this model", "[N, 3, 300, 300]")),
    ("wrong_heads", ("--onnx", "raw head outputs")),
])
def test_user_onnx_that_does_not_fit(case, needles, tmp_path, capsys, store):
    """A user's ONNX (compile/evaluate/bench --onnx) is checked against --model's config
    before anything runs on it: one line."""
    from ssd_pipeline.cli import main

    path = tmp_path / "nope.onnx"
    if case == "wrong_input":
        _onnx_with_input(path, [1, 3, 224, 224])
    elif case == "wrong_heads":
        _onnx_with_input(path, [1, 3, 300, 300])
    rc = main(["evaluate", "--model", "tiny", "--onnx", str(path), "--cache-dir",
               str(store.root), "--quiet"])
    assert_one_line_error(rc, capsys.readouterr().err, *needles)


def test_engine_directory_round_trip(tmp_path, capsys, store):
    """The original's flow: build an engine from the (simplified) ONNX file, then evaluate
    that engine directory; torch, which has no ONNX input, is skipped saying so."""
    from ssd_pipeline.cli import main
    from ssd_pipeline.core.host import has_vnni
    from ssd_pipeline.suite.models import resolve_bundle

    common = ["--model", "tiny", "--cache-dir", str(store.root)]
    onnx_path = resolve_bundle("tiny", _expectations(), store).artifacts.simplified_onnx_path
    assert main(["compile", *common, "--onnx", str(onnx_path), "--precision", "int8",
                 "--output", str(tmp_path / "engine")]) == 0
    capsys.readouterr()
    assert main(["evaluate", *common, "--engine", str(tmp_path / "engine"), "--max-images",
                 "16", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "| tvm | int8 | 16 |" in captured.out, captured.out
    # int8 on a CPU without VNNI runs (7-bit weights) and says so in one line
    notes = [ln for ln in captured.err.splitlines() if "no VNNI" in ln]
    assert len(notes) == (0 if has_vnni() else 1), captured.err
    assert main(["evaluate", *common, "--onnx", str(onnx_path), "--backends", "torch,tvm",
                 "--precisions", "fp32", "--max-images", "8", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "torch: skipped" in captured.err and "| tvm | fp32 | 8 |" in captured.out
    rc = main(["evaluate", *common, "--engine", str(tmp_path), "--quiet"])
    assert_one_line_error(rc, capsys.readouterr().err, "--engine", "not an engine directory")


def _expectations():
    from ssd_pipeline.core.expectations import Expectations

    return Expectations.load()
