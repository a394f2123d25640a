"""How two backends are compared: relative error of raw outputs, and detections matched by
label and IoU (never by index: near-tied scores reorder after NMS)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max|got - ref| / max|ref| (inf on shape mismatch or non-finite values)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape or not (np.isfinite(got).all() and np.isfinite(ref).all()):
        return float("inf")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    diff = float(np.abs(got - ref).max()) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


def rel_errs(got: list[np.ndarray], ref: list[np.ndarray], names: list[str]) -> dict[str, float]:
    if len(got) != len(ref):
        raise AssertionError(f"got {len(got)} outputs, expected {len(ref)}")
    return {n: rel_err(g, r) for n, g, r in zip(names, got, ref, strict=True)}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes a (N,4) and b (M,4)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


@dataclass
class MatchReport:
    """Result of matching one image's detections against a reference."""

    matched: int = 0
    unmatched_got: list[tuple[int, float]] = field(default_factory=list)  # (label, score)
    unmatched_ref: list[tuple[int, float]] = field(default_factory=list)
    borderline: int = 0  # unmatched ones within score_atol of the cut-off: allowed
    max_score_diff: float = 0.0
    min_iou: float = 1.0

    @property
    def matched_frac(self) -> float:
        denom = self.matched + max(len(self.unmatched_got), len(self.unmatched_ref))
        return self.matched / denom if denom else 1.0

    def ok(self, min_frac: float = 1.0) -> bool:
        """All unmatched detections are borderline, or at least ``min_frac`` matched."""
        all_borderline = len(self.unmatched_got) + len(self.unmatched_ref) == self.borderline
        return all_borderline or self.matched_frac >= min_frac

    def summary(self) -> str:
        return (f"matched {self.matched} ({self.matched_frac:.1%}), "
                f"unmatched got {len(self.unmatched_got)} / "
                f"ref {len(self.unmatched_ref)} (borderline {self.borderline}), "
                f"min IoU {self.min_iou:.4f}, max |score diff| {self.max_score_diff:.2e}")


def cut_off(scores: np.ndarray, score_thr: float, max_per_img: int | None) -> float:
    """The score below which one side dropped detections: ``score_thr``, or the lowest score
    it kept when ``max_per_img`` truncated its list."""
    if max_per_img is not None and len(scores) >= max_per_img:
        return max(score_thr, float(np.min(scores)))
    return score_thr


def match_detections(got: Any, ref: Any, iou_min: float, score_atol: float,
                     score_thr: float, max_per_img: int | None = None) -> MatchReport:
    """Greedy match, highest reference score first, within each label; both directions count.

    ``got``/``ref`` have ``boxes`` (N,4), ``scores`` (N,), ``labels`` (N,). Every detection of
    either side must be matched, except a *borderline* one: its score within ``score_atol`` of
    the cut-off of the other side (:func:`cut_off`), above or below, where a difference that
    small decides whether it survives.
    """
    rep = MatchReport()
    used = np.zeros(len(got.scores), bool)
    got_cut = cut_off(np.asarray(got.scores), score_thr, max_per_img)
    ref_cut = cut_off(np.asarray(ref.scores), score_thr, max_per_img)
    ious = box_iou(ref.boxes, got.boxes)
    for i in np.argsort(-np.asarray(ref.scores), kind="stable"):
        cand = np.flatnonzero((got.labels == ref.labels[i]) & ~used)
        best = None
        if cand.size:
            score_ok = np.abs(got.scores[cand] - ref.scores[i]) <= score_atol
            iou_ok = ious[i, cand] >= iou_min
            ok = cand[score_ok & iou_ok]
            if ok.size:
                best = ok[np.argmax(ious[i, ok])]
        if best is None:
            s = float(ref.scores[i])
            rep.unmatched_ref.append((int(ref.labels[i]), s))
            rep.borderline += abs(s - got_cut) <= score_atol
            continue
        used[best] = True
        rep.matched += 1
        rep.min_iou = min(rep.min_iou, float(ious[i, best]))
        rep.max_score_diff = max(rep.max_score_diff,
                                 abs(float(got.scores[best]) - float(ref.scores[i])))
    for j in np.flatnonzero(~used):
        s = float(got.scores[j])
        rep.unmatched_got.append((int(got.labels[j]), s))
        rep.borderline += abs(s - ref_cut) <= score_atol
    return rep
