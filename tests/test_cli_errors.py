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
