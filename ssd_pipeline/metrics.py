"""COCO box mAP exactly as mmdet's ``CocoMetric`` computes it, on pycocotools.

Reproduced on purpose: ``proposal_nums=(100, 300, 1000)`` becomes ``params.maxDets``, so in
pycocotools' ``summarize()`` mAP@[.5:.95] uses 100 detections but mAP_50, mAP_75 and the
size-split APs use ``maxDets[2] = 1000`` (plain pycocotools defaults differ slightly).
All 12 stats are kept unrounded under mmdet's key names; mmdet itself reports them rounded to
3 decimals. ``tests/test_metrics.py`` proves equality with mmdet's CocoMetric.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from .postprocess import Detections

PROPOSAL_NUMS = (100, 300, 1000)  # mmdet CocoMetric's default
STAT_NAMES = ["mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l",
              "AR@100", "AR@300", "AR@1000", "AR_s@1000", "AR_m@1000", "AR_l@1000"]


def to_coco_results(dets: list[Detections]) -> list[dict[str, Any]]:
    """COCO result entries (xywh boxes), the conversion mmdet's CocoMetric makes."""
    out = []
    for d in dets:
        for box, score, cat in zip(d.boxes.tolist(), d.scores.tolist(),
                                   d.category_ids.tolist(), strict=True):
            x1, y1, x2, y2 = box
            out.append({"image_id": int(d.img_id), "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": float(score), "category_id": int(cat)})
    return out


def load_coco(ann_file: str | Path) -> Any:
    """pycocotools COCO object, quietly (it prints timing lines)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def evaluate(coco_gt: Any, dets: list[Detections], img_ids: list[int] | None = None
             ) -> dict[str, Any]:
    """mmdet-CocoMetric-exact box metrics for ``dets``.

    ``coco_gt``: a pycocotools COCO or an annotation file path. ``img_ids``: the images that
    were evaluated (default: all in the annotation file, as mmdet does).
    Returns ``{"bbox_mAP": ..., ...}`` unrounded, plus ``"summary"`` (pycocotools' table).
    """
    from pycocotools.cocoeval import COCOeval

    if isinstance(coco_gt, str | Path):
        coco_gt = load_coco(coco_gt)
    results = to_coco_results(dets)
    if not results:
        # pycocotools cannot load an empty result list (mmdet logs an error and reports
        # nothing); zeros make a gate fail with a number rather than crash.
        return {f"bbox_{k}": 0.0 for k in STAT_NAMES} | {
            "summary": "no detections at all", "num_detections": 0}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.catIds = sorted(coco_gt.getCatIds())
        ev.params.imgIds = list(img_ids) if img_ids is not None else coco_gt.getImgIds()
        ev.params.maxDets = list(PROPOSAL_NUMS)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.asarray(ev.stats, dtype=np.float64)
    return {f"bbox_{k}": float(v) for k, v in zip(STAT_NAMES, stats, strict=True)} | {
        "summary": buf.getvalue().strip().splitlines()[-12:], "num_detections": len(results),
        "per_class": per_class_ap(coco_gt, ev)}


def per_class_ap(coco_gt: Any, ev: Any) -> dict[str, dict[str, float | None]]:
    """AP per category as mmdet's CocoMetric(classwise=True) computes it (all areas, the last
    maxDets), unrounded: mAP over IoU 0.5:0.95, mAP_50, mAP_75; None where the category has
    no ground truth (mmdet: nan)."""
    precisions = ev.eval["precision"]  # (iou, recall, category, area, maxDets)

    def mean(p: np.ndarray) -> float | None:
        p = p[p > -1]
        return float(np.mean(p)) if p.size else None

    out = {}
    for k, cat_id in enumerate(ev.params.catIds):
        name = str(coco_gt.cats[int(cat_id)].get("name", cat_id))
        out[name] = {"mAP": mean(precisions[:, :, k, 0, -1]),
                     "mAP_50": mean(precisions[0, :, k, 0, -1]),
                     "mAP_75": mean(precisions[5, :, k, 0, -1])}
    return out


def rounded(metrics: dict[str, Any]) -> dict[str, float]:
    """What mmdet's CocoMetric prints: each stat rounded to 3 decimals."""
    return {k: float(f"{round(v, 3)}") for k, v in metrics.items() if k.startswith("bbox_")}
