"""The accuracy gate can fail: the same run passes with a floor below the measured value and
fails, with "got X, expected >= Y" and a non-zero exit, with a floor above it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def coco80_set(tmp_path_factory):
    from ssd_pipeline.data import COCO80_CATEGORY_IDS
    from ssd_pipeline.synthetic import make_coco_set

    root = tmp_path_factory.mktemp("coco80")
    make_coco_set(root, "val2017", 4, seed=2,
                  categories=[(i, f"class{i}") for i in COCO80_CATEGORY_IDS])
    return root


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, artifacts):
    import torch

    path = tmp_path_factory.mktemp("weights") / "random_ssd300.pth"
    torch.save({"state_dict": artifacts.torch_model.state_dict()}, path)
    return path


def run_gate(records: Path, data: Path, weights: Path, *overrides: str
             ) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "tests/test_accuracy.py", "-k", "test_accuracy[",
           "-p", "no:cacheprovider", "-q", "--backends", "torch", "--batch-size", "3",
           "--datasets-dir", str(data), "--weight", str(weights), "--records-dir", str(records)]
    for o in overrides:
        cmd += ["--expect", o]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONWARNINGS": "ignore"})


def test_gate_passes_below_and_fails_above(tmp_path, coco80_set, weights_file):
    key = "accuracy.ssd300_coco"
    ok = run_gate(tmp_path, coco80_set, weights_file, f"{key}.map_50_min=0", f"{key}.map_min=0")
    assert ok.returncode == 0, ok.stdout[-3000:]
    (rec,) = json.loads((tmp_path / "accuracy.json").read_text())
    measured = rec["metrics"]["bbox_mAP_50"]
    assert rec["num_images"] == 4 and rec["weights"].startswith("sha256:")
    floor = round(measured + 0.05, 4)
    bad = run_gate(tmp_path, coco80_set, weights_file, f"{key}.map_50_min={floor}",
                   f"{key}.map_min=0")
    assert bad.returncode == 1, bad.stdout[-3000:]
    assert f"mAP@0.5: got {measured:.4f}, expected >= {floor:.4f}" in bad.stdout, bad.stdout[-3000:]


def test_require_data_turns_skip_into_failure(tmp_path):
    base = [sys.executable, "-m", "pytest", "tests/test_accuracy.py", "-q", "-p",
            "no:cacheprovider", "--backends", "torch", "--datasets-dir", str(tmp_path / "none")]
    skipped = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert skipped.returncode == 0 and "skipped" in skipped.stdout, skipped.stdout[-2000:]
    assert "does not exist" in skipped.stdout  # the reason is listed in the summary
    failed = subprocess.run([*base, "--require-data"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert failed.returncode == 1, failed.stdout[-2000:]
    assert "--require-data: no COCO val2017" in failed.stdout
