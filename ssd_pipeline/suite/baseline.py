"""Regression gating against a saved run: speed by the numbers that travel (same-run ratios
to ONNX Runtime fp32), accuracy by the 12 COCO stats of the same model, backend, precision
and data. Raw times are compared only between like machines, and the comparison says why
when it is not made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import UserError
from .report import SpeedKey, machine_of, read_json, runs_of, speed_key


def load_speed_baseline(path: Path) -> tuple[dict[SpeedKey, dict[str, Any]], dict[str, Any]]:
    """The baseline's speed records by case, and the machine they ran on."""
    data = read_json(path, "--perf-baseline file")
    return {speed_key(r): r for r in runs_of(data, path)}, machine_of(data)


def raw_times_comparable(base: dict[str, Any], now: dict[str, Any]) -> str | None:
    """None when raw times of the two machines may be compared; else why not."""
    for field in ("cpu_model", "llvm_cpu", "threads", "versions"):
        if base.get(field) != now.get(field):
            return (f"raw times not compared: {field} differs (baseline {base.get(field)!r}, "
                    f"now {now.get(field)!r})")
    return None


def load_accuracy_baseline(path: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """An accuracy.json (a list of records) by (model, backend, precision)."""
    records = read_json(path, "--accuracy-baseline file")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"--accuracy-baseline: {path} is not an accuracy.json (a list of "
                        "records, as pytest -m accuracy writes)")
    return {(r.get("model", "?"), r["backend"], r["precision"]): r for r in records}


def same_data(base: dict[str, Any], now: dict[str, Any]) -> str | None:
    """None when both records scored the same annotation file and image count; else why not."""
    if base.get("dataset_sha256") != now.get("dataset_sha256"):
        return (f"annotation file differs (baseline sha256 {str(base.get('dataset_sha256'))[:12]}"
                f", now {str(now.get('dataset_sha256'))[:12]})")
    if base.get("num_images") != now.get("num_images"):
        return (f"image count differs (baseline {base.get('num_images')}, "
                f"now {now.get('num_images')})")
    return None
