"""Head outputs -> per-image detections, through mmdet's own ``SSDHead.predict_by_feat``
(softmax, per-level top-k and score threshold, delta decoding, mmcv ``batched_nms``), as the
original does; boxes come back in original-image pixels (``rescale=True``).

Two pieces are ours, each returning exactly what the mmdet/mmcv function it stands in for
returns (``tests/test_postprocess.py`` checks both bit for bit) with far less work:

- :func:`grouped_nms`, the ``nms`` that ``batched_nms`` calls. It runs greedy NMS on groups
  of boxes that cannot overlap, in mmcv's own order: ``batched_nms`` shifts each class to
  its own x range and then compares every box with every other, across classes. The groups
  run in mmcv's kernel, or all at once in ours (``postprocess_nms.cc``, mmcv's arithmetic).
- :func:`topk_filter`, the ``filter_scores_and_topk`` that mmdet's per-level decoding calls:
  one ``topk`` instead of a mask, a gather, ``nonzero`` and a sort of every score above the
  threshold, where the order of the scores it keeps is unique, else mmdet's own.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .core.cache import ArtifactStore
from .core.errors import UserError
from .core.native import build_native
from .data import COCO80_CATEGORY_IDS, ImageMeta

# Boxes per NMS kernel call when small groups are joined (see _chunks): random-init SSD300,
# ~4100 boxes per image, 10.8 ms per image at one call per group, 6.2 ms at 256 (128-512 alike)
NMS_CHUNK = 256
# Class scores per image from which a batch's images are decoded on threads. mmdet's decoding
# is Python (holding the GIL) plus tensor work (not holding it); threads pay only where the
# tensor work dominates. Batch of 8: random-init SSD300 (707k scores per image) 172 -> 142 ms
# on 2 threads; the embedded model (52k) 30 -> 38 ms, ~3 ms of Python per image
THREADED_MIN_SCORES = 200_000


@dataclass
class Detections:
    """One image's detections: xyxy boxes in original pixels, scores, contiguous labels and
    the annotation file's category ids for those labels."""

    img_id: int
    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64
    category_ids: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.scores)


def grouped_nms(boxes: Any, scores: Any, iou_threshold: float, offset: int = 0,
                score_threshold: float = 0, max_num: int = -1, *,
                nms_library: str | None = None) -> tuple[Any, Any]:
    """``mmcv.ops.nms``, same arguments, same result, same order; an NMS ``type`` for mmcv's
    ``batched_nms``.

    Greedy NMS keeps a box unless a kept box earlier in score order overlaps it by more than
    ``iou_threshold``. Boxes whose x ranges do not overlap have IoU 0 and never suppress each
    other, so the boxes split into groups along x (each class of ``batched_nms``'s shifted
    boxes is at least one), and greedy NMS on each group, in the global score order, keeps
    exactly the boxes that greedy NMS on all of them keeps. The global order is the one
    mmcv's kernel computes (the same ``sort`` call); each group runs in that order through
    mmcv's kernel or ours, so every IoU is mmcv's own arithmetic.
    Inputs this argument does not cover (numpy, offset 1, score filtering, ``max_num``, a
    negative threshold, non-finite boxes) go to ``mmcv.ops.nms`` unchanged.

    ``nms_library``: the path :func:`build_nms_library` returns (a path, not the function:
    mmdet deep-copies its NMS config); its ``nms_groups`` runs every group in one call with
    mmcv's arithmetic. Without it, mmcv's kernel runs on runs of groups."""
    import torch
    from mmcv.ops import nms

    if (not isinstance(boxes, torch.Tensor) or not isinstance(scores, torch.Tensor)
            or boxes.device.type != "cpu" or boxes.dtype != torch.float32
            or offset != 0 or score_threshold > 0 or max_num > 0 or iou_threshold < 0
            or not 2 <= boxes.shape[0] < 2**24 or not bool(torch.isfinite(boxes).all())):
        return nms(boxes, scores, iou_threshold, offset, score_threshold, max_num)
    n = boxes.shape[0]
    order = scores.sort(0, descending=True)[1].numpy()  # the call mmcv's kernel makes
    x = boxes.numpy()
    by_x1 = np.argsort(x[:, 0], kind="stable")
    reach = np.maximum.accumulate(x[by_x1, 2])
    # A new group starts where a box begins at or right of every earlier box's end.
    starts = np.zeros(n, np.int64)
    starts[1:] = x[by_x1[1:], 0] >= reach[:-1]
    group = np.empty(n, np.int64)
    group[by_x1] = np.cumsum(starts)
    if group[by_x1[-1]] == 0:  # one group: nothing to split
        return nms(boxes, scores, iou_threshold, offset, score_threshold, max_num)
    seq = order[np.argsort(group[order], kind="stable")]  # by group, score order within
    bounds = np.concatenate(([0], np.cumsum(np.bincount(group)))).tolist()
    if nms_library is not None:
        flags = np.empty(n, np.uint8)
        nms_groups = _load_nms(nms_library)
        nms_groups(np.ascontiguousarray(x[seq]), np.asarray(bounds, np.int64),
                   float(iou_threshold), flags)
        kept = flags.view(bool)
    else:
        boxes_seq = boxes[torch.from_numpy(seq)]
        # strictly decreasing, so the kernel's own sort keeps each group in seq order
        rank = torch.arange(n, 0, -1, dtype=torch.float32)
        kernel = _nms_kernel()
        kept = np.ones(n, bool)  # over seq; a group of one is kept
        for s, e in _chunks(bounds, NMS_CHUNK):
            if e - s > 1:
                kept[s:e] = False
                kept[s + kernel(boxes_seq[s:e], rank[s:e], iou_threshold=float(iou_threshold),
                                offset=0).numpy()] = True
    keep_mask = np.empty(n, bool)
    keep_mask[seq] = kept
    inds = torch.from_numpy(order[keep_mask[order]])
    return torch.cat((boxes[inds], scores[inds].reshape(-1, 1)), dim=1), inds


def topk_filter(scores: Any, score_thr: float, topk: int, results: Any = None
                ) -> tuple[Any, Any, Any, Any]:
    """``mmdet.models.utils.filter_scores_and_topk``, same arguments, same result: the ``topk``
    highest of the (anchor, class) scores above ``score_thr``, in descending order, with
    their labels, anchor indices and ``results`` rows.

    mmdet masks the scores, gathers those above the threshold with their ``nonzero``
    indices and sorts them all: a random-init SSD300 sends hundreds of thousands per image.
    This asks ``torch.topk`` for ``topk + 1`` of all scores instead. The two agree wherever
    the order is unique: no two kept scores are equal, and the best one left out is below
    the last one kept (or not above the threshold). Equal scores come out of a sort in an
    order of the implementation's choosing (x86-simd-sort's on AVX-512 builds of torch,
    which no partial selection reproduces), so there, and for NaN and inputs this does not
    cover, mmdet's own function runs."""
    import torch
    from mmdet.models.utils import filter_scores_and_topk

    if (not isinstance(scores, torch.Tensor) or scores.dim() != 2 or not isinstance(results, dict)
            or not 0 < topk < scores.numel()):
        return filter_scores_and_topk(scores, score_thr, topk, results)
    vals, flat = _top_entries(scores, topk + 1)  # sorted, NaN first
    kept = int((vals[:topk] > score_thr).sum())  # a prefix: vals descend
    top = vals[:kept]
    unique = (kept < topk or vals[topk] < vals[topk - 1]) and bool((top[1:] < top[:-1]).all())
    if not unique or bool(torch.isnan(vals[0])):
        return filter_scores_and_topk(scores, score_thr, topk, results)
    keep_idxs = torch.div(flat[:kept], scores.shape[1], rounding_mode="floor")
    labels = flat[:kept] - keep_idxs * scores.shape[1]
    return top, labels, keep_idxs, {k: v[keep_idxs] for k, v in results.items()}


def _top_entries(scores: Any, k: int) -> tuple[Any, Any]:
    """The values of ``scores.reshape(-1).topk(k)`` for a 2-D ``scores`` (anchors x classes),
    and its indices where those values are distinct (``topk_filter`` reads no other), from
    far fewer candidates: ``topk`` pairs every score with its index first (SSD300's level 0:
    462k scores, 1.44 -> 0.38 ms; level 1 0.88 -> 0.28).

    Each anchor's ``j`` best scores (``j`` x anchors >= ``k``) hold ``k`` scores at least as
    large as the k-th largest of them, ``bound``; so every one of the ``k`` largest scores is
    >= ``bound`` and in an anchor whose best is. Only those are ranked. With NaN (which
    ``topk`` ranks first) the bound does not hold: all scores are ranked, as ``topk`` does."""
    import torch

    n, c = scores.shape
    j = -(-k // n)
    if j >= c:
        return scores.reshape(-1).topk(k)
    best = scores.amax(1) if j == 1 else scores.topk(j, dim=1)[0]
    ranked = best.reshape(-1).topk(k)[0]
    if bool(torch.isnan(ranked[0])):
        return scores.reshape(-1).topk(k)
    bound = ranked[-1]
    rows = ((best if j == 1 else best[:, 0]) >= bound).nonzero().squeeze(1)
    sub = scores[rows].reshape(-1)
    idx = (sub >= bound).nonzero().squeeze(1)
    vals, pick = sub[idx].topk(k)
    flat = idx[pick]
    row = torch.div(flat, c, rounding_mode="floor")
    return vals, rows[row] * c + (flat - row * c)


def _with_topk_filter(head: Any) -> None:
    """``head`` decodes through mmdet's own ``_predict_by_feat_single`` with
    :func:`topk_filter` where it calls ``filter_scores_and_topk``: the same code object, run
    with that one global swapped, for this head only (mmdet offers no hook for it, and a
    process-wide patch would reach the torch backend's mmdet model too). A head with its own
    ``_predict_by_feat_single`` is left as it is."""
    import types

    from mmdet.models.dense_heads.base_dense_head import BaseDenseHead

    fn = type(head)._predict_by_feat_single
    if fn is not BaseDenseHead._predict_by_feat_single:
        return
    swapped = types.FunctionType(fn.__code__, {**fn.__globals__,
                                               "filter_scores_and_topk": topk_filter},
                                 fn.__name__, fn.__defaults__, fn.__closure__)
    swapped.__kwdefaults__ = fn.__kwdefaults__
    head._predict_by_feat_single = types.MethodType(swapped, head)


def _writable_f32(a: np.ndarray) -> np.ndarray:
    """``a`` as float32 that torch may wrap (torch warns on read-only arrays): itself when it
    already is, strides kept, else a copy."""
    return a if a.dtype == np.float32 and a.flags.writeable else np.array(a, np.float32)


def _chunks(bounds: list[int], size: int) -> list[tuple[int, int]]:
    """Consecutive groups (``bounds``: their edges) joined into runs of at most ``size`` boxes
    (a larger group runs alone): each kernel call costs ~60 us before its first IoU."""
    runs, start = [], 0
    for prev, edge in itertools.pairwise(bounds):
        if edge - start > size and prev > start:
            runs.append((start, prev))
            start = prev
    runs.append((start, bounds[-1]))
    return runs


NMS_SOURCE = Path(__file__).with_name("postprocess_nms.cc")


def build_nms_library(store: ArtifactStore) -> str:
    """``postprocess_nms.cc`` compiled once into ``store``: its ``nms_groups`` runs greedy NMS
    on every group of an image in one call, the pair loop in vector form (~4200 boxes in ~85
    groups, as SSD300's random-init heads send: 4.3 ms through mmcv's kernel on runs of
    groups, 1.2 ms)."""
    return str(build_native(store, "nms-kernel", NMS_SOURCE, "ssd_nms.so", cflags=["-O3"]))


@functools.cache
def _load_nms(path: str) -> Any:
    import tvm_ffi

    return tvm_ffi.load_module(path).nms_groups


@functools.cache
def _nms_kernel() -> Any:
    """mmcv's compiled NMS (what ``mmcv.ops.nms`` calls), without its Python wrapper."""
    from mmcv.utils import ext_loader

    return ext_loader.load_ext("_ext", ["nms"]).nms


class Postprocessor:
    """Decodes raw head outputs with the head that the config describes (weights unused).
    ``shortcuts``: NMS through :func:`grouped_nms` and the per-level selection through
    :func:`topk_filter` (the default; equal to mmcv's and mmdet's); False runs theirs, as
    the equality tests do; with a ``store``, the NMS groups run in our own kernel
    (:func:`build_nms_library`), else in mmcv's. ``workers``: threads that decode a
    batch's images side by side (default 1), for heads with at least THREADED_MIN_SCORES
    class scores per image. mmdet decodes each image on its own, so the images split into
    contiguous runs, one ``predict_by_feat`` per run, with the same detections; its sorts
    and mmcv's NMS kernel run on one core and release the GIL."""

    def __init__(self, cfg: Any, cat_ids: list[int] | None = None, head: Any = None,
                 shortcuts: bool = True, workers: int = 1,
                 store: ArtifactStore | None = None) -> None:
        if workers < 1:
            raise UserError(f"post-processing workers must be at least 1, got {workers}")
        self.workers = workers
        if head is None:
            from mmdet.registry import MODELS
            from mmdet.utils import register_all_modules

            register_all_modules()
            head_cfg = cfg.model.bbox_head.copy()
            # a copy: the NMS type set below must not leak into the caller's config
            head_cfg.update(test_cfg=copy.deepcopy(cfg.model.test_cfg))
            head = MODELS.build(head_cfg)
            head.loss_cls = None  # mmdet 3.3.0 bug, as in model.build_model
        nms_cfg = head.test_cfg.get("nms")
        if shortcuts and nms_cfg is not None and nms_cfg.get("type", "nms") == "nms":
            nms_cfg["type"] = grouped_nms if store is None else functools.partial(
                grouped_nms, nms_library=build_nms_library(store))
        if shortcuts:
            _with_topk_filter(head)
        self.head = head.eval()
        self.num_levels = len(self.head.prior_generator.strides)
        num_classes = self.head.num_classes
        if cat_ids is None:
            if num_classes != len(COCO80_CATEGORY_IDS):
                raise ValueError(f"the model has {num_classes} classes: pass cat_ids")
            cat_ids = COCO80_CATEGORY_IDS
        if len(cat_ids) != num_classes:
            raise UserError(f"the annotation file has {len(cat_ids)} categories but the "
                            f"model predicts {num_classes} classes: wrong dataset for this model?")
        self.cat_ids = np.asarray(cat_ids, np.int64)

    @property
    def score_thr(self) -> float:
        return float(self.head.test_cfg.get("score_thr", 0.0))

    @property
    def max_per_img(self) -> int | None:
        value = self.head.test_cfg.get("max_per_img")
        return int(value) if value else None

    def __call__(self, outputs: list[np.ndarray], metas: list[ImageMeta]) -> list[Detections]:
        """``outputs``: 12 arrays (6 cls maps, 6 box maps), batch rows >= len(metas)."""
        n = len(metas)
        scores = sum(math.prod(o.shape[1:]) for o in outputs[: self.num_levels])
        runs = min(self.workers, n) if scores >= THREADED_MIN_SCORES else 1
        if runs <= 1:
            return self._decode(outputs, metas, 0, n)
        edges = [n * k // runs for k in range(runs + 1)]
        # the first run on this thread, the others on threads that live for this call only
        # (~0.1 ms to start; no pool outlives the Postprocessor)
        with ThreadPoolExecutor(runs - 1, thread_name_prefix="postprocess") as pool:
            rest = [pool.submit(self._decode, outputs, metas, s, e)
                    for s, e in itertools.pairwise(edges[1:])]
            dets = self._decode(outputs, metas, edges[0], edges[1])
            for f in rest:
                dets.extend(f.result())
        return dets

    def _decode(self, outputs: list[np.ndarray], metas: list[ImageMeta], start: int,
                end: int) -> list[Detections]:
        """mmdet's decoding of images ``start:end`` of the batch."""
        import torch

        metas = metas[start:end]
        # no copy where the layout allows: a TVM engine hands NCHW views of channels-last
        # heads, which mmdet's permute(1, 2, 0).reshape reads without copying
        tensors = [torch.from_numpy(_writable_f32(o[start:end])) for o in outputs]
        cls, box = tensors[: self.num_levels], tensors[self.num_levels:]
        with torch.inference_mode():  # thread-local: entered on the thread that decodes
            results = self.head.predict_by_feat(
                cls, box, batch_img_metas=[m.as_mmdet() for m in metas], rescale=True)
        dets = []
        for meta, r in zip(metas, results, strict=True):
            labels = r.labels.numpy().astype(np.int64)
            dets.append(Detections(meta.img_id, r.bboxes.numpy().astype(np.float32),
                                   r.scores.numpy().astype(np.float32), labels,
                                   self.cat_ids[labels]))
        return dets
