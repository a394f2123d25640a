"""Assertions shared by the parity tests: numbers come from the expectations file."""

from __future__ import annotations

from typing import Any

import numpy as np

from ssd_pipeline.core.gates import require_at_most
from ssd_pipeline.parity import match_detections, rel_errs


def assert_raw_parity(got: list[np.ndarray], ref: list[np.ndarray], names: list[str],
                      tol: float, source: str, record: Any = None) -> dict[str, float]:
    """Every raw head output within ``tol`` relative error of the reference."""
    errs = rel_errs(got, ref, names)
    if record is not None:
        record("raw_rel_err", {k: float(f"{v:.3g}") for k, v in errs.items()})
    worst = max(errs, key=errs.get)
    require_at_most(f"relative error of {worst} (worst of {len(errs)} outputs)", errs[worst],
                    tol, source)
    return errs


def assert_detection_parity(got_dets: list[Any], ref_dets: list[Any], iou_min: float,
                            score_atol: float, score_thr: float, record: Any = None,
                            match_min: float = 1.0, max_per_img: int | None = None) -> None:
    """Per image, detections match by label and IoU (borderline cut-off ones excepted, or at
    least ``match_min`` of them matched), and the reference is not empty (a parity test on
    zero detections would prove nothing)."""
    total = sum(len(d) for d in ref_dets)
    assert total > 0, "the reference produced no detections: nothing was compared"
    reports = [match_detections(g, r, iou_min, score_atol, score_thr, max_per_img)
               for g, r in zip(got_dets, ref_dets, strict=True)]
    if record is not None:
        record("detections", [r.summary() for r in reports])
    bad = [f"image {d.img_id}: {r.summary()}" for d, r in zip(ref_dets, reports, strict=True)
           if not r.ok(match_min)]
    assert not bad, "detections differ beyond the cut-off borderline:\n" + "\n".join(bad)


def child_env(**extra: str) -> dict[str, str]:
    """Environment for a pytest run started from a test: without the xdist worker variables
    of this process (pytest-benchmark would take the child for an xdist worker and turn
    itself off), warnings quiet."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return env | {"PYTHONWARNINGS": "ignore"} | extra


def head_groups(graph: Any) -> list[list[str]]:
    """The ONNX graph outputs that convolutions with one geometry compute from one tensor
    (a level's class and box heads): the TVM engine computes each group as one convolution,
    its output channels padded to a multiple of ``OC_BLOCK``."""
    import onnx

    outputs = {o.name for o in graph.output}
    kernels = {i.name: tuple(i.dims[2:]) for i in graph.initializer}
    groups: dict[tuple, list[str]] = {}
    for n in graph.node:
        if n.op_type == "Conv" and n.output[0] in outputs:
            attrs = sorted((a.name, str(onnx.helper.get_attribute_value(a)))
                           for a in n.attribute)
            key = (n.input[0], kernels[n.input[1]], *attrs)
            groups.setdefault(key, []).append(n.output[0])
    return [g for g in groups.values() if len(g) > 1]
