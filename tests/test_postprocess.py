"""Our two pieces of post-processing return exactly what they stand in for: ``grouped_nms``
what mmcv's ``nms`` returns (the same indices in the same order and the same scores, bit for
bit) and ``topk_filter`` what mmdet's ``filter_scores_and_topk`` returns, on sets built to
break them (tied scores, touching and degenerate boxes, one dense class, thresholds at the
edges, NaN) and on real head outputs through mmdet's ``predict_by_feat``; images decoded on
several threads give what one thread gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssd_pipeline import postprocess
from ssd_pipeline.core.errors import UserError
from ssd_pipeline.postprocess import Detections, Postprocessor, grouped_nms, topk_filter


def random_set(rng: np.random.Generator, n: int, classes: int, *, tied_scores: bool,
               integer_boxes: bool, degenerate: bool) -> tuple[torch.Tensor, ...]:
    xy = rng.uniform(0, 300, (n, 2))
    wh = rng.uniform(0, 120, (n, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, 300)], 1)
    if integer_boxes:  # boxes that touch edge to edge and repeat exactly
        boxes = boxes.round()
    if degenerate:  # zero-width, zero-height and inverted boxes
        k = n // 4
        boxes[:k, 2] = boxes[:k, 0]
        boxes[k:2 * k, 3] = boxes[k:2 * k, 1] - 5
    scores = rng.uniform(0, 1, n)
    if tied_scores:
        scores = scores.round(1)
    labels = rng.integers(0, classes, n)
    return (torch.from_numpy(boxes.astype(np.float32)), torch.from_numpy(scores.astype(np.float32)),
            torch.from_numpy(labels))


@pytest.fixture(scope="module", params=["mmcv kernel", "our kernel"])
def nms_type(request, store):
    """``grouped_nms`` with its groups in mmcv's kernel, and in ours."""
    import functools

    if request.param == "mmcv kernel":
        return grouped_nms
    return functools.partial(grouped_nms, nms_library=postprocess.build_nms_library(store))


def assert_same_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                    iou: float, nms_type=grouped_nms) -> None:
    from mmcv.ops import batched_nms

    cfg = {"type": "nms", "iou_threshold": iou}
    dets_ref, keep_ref = batched_nms(boxes, scores, labels, cfg)
    dets, keep = batched_nms(boxes, scores, labels, {**cfg, "type": nms_type})
    assert torch.equal(keep, keep_ref), f"kept {len(keep)} boxes, mmcv kept {len(keep_ref)}"
    assert torch.equal(dets, dets_ref)


@pytest.mark.parametrize("iou", [0.0, 0.45, 0.7, 1.0])
@pytest.mark.parametrize("classes", [1, 3, 80])
def test_grouped_nms_equals_mmcv(iou, classes, nms_type):
    rng = np.random.default_rng(int(iou * 100) + classes)
    for trial in range(24):
        n = int(rng.integers(2, 2500))
        assert_same_nms(*random_set(rng, n, classes, tied_scores=trial % 2 == 0,
                                    integer_boxes=trial % 3 == 0, degenerate=trial % 4 == 0),
                        iou, nms_type)


def test_grouped_nms_splits_classes_and_passes_the_rest_to_mmcv(nms_type):
    """Boxes far apart split into groups (the case it is for); the inputs it does not cover
    are mmcv's nms call unchanged."""
    from mmcv.ops import nms

    rng = np.random.default_rng(5)
    boxes, scores, _ = random_set(rng, 600, 1, tied_scores=True, integer_boxes=False,
                                  degenerate=False)
    boxes[300:, 0::2] += 1000  # two groups along x
    assert_same_nms(boxes, scores, torch.zeros(600, dtype=torch.int64), 0.45, nms_type)
    nan_boxes = boxes.clone()
    nan_boxes[7, 2] = float("nan")
    for args, kwargs in (((nan_boxes, scores, 0.45), {}), ((boxes, scores, 0.45), {"offset": 1}),
                         ((boxes, scores, 0.45), {"score_threshold": 0.5}),
                         ((boxes, scores, 0.45), {"max_num": 10}),
                         ((boxes.numpy(), scores.numpy(), 0.45), {}),
                         ((boxes[:1], scores[:1], 0.45), {})):
        ours, ref = nms_type(*args, **kwargs), nms(*args, **kwargs)
        np.testing.assert_array_equal(np.asarray(ours[1]), np.asarray(ref[1]))
        np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(ref[0]))


class CountedFilter:
    """mmdet's ``filter_scores_and_topk``, counting its calls: how often ``topk_filter``
    handed a level back to it."""

    def __init__(self, monkeypatch) -> None:
        import mmdet.models.utils as utils

        self.original, self.calls = utils.filter_scores_and_topk, 0
        monkeypatch.setattr(utils, "filter_scores_and_topk", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


def level_scores(rng: np.random.Generator, case: str) -> torch.Tensor:
    """One level's (anchor, class) scores, 3000 x 21, built for ``case``."""
    s = rng.uniform(0, 1, (3000, 21)).astype(np.float32)
    if case == "tie inside":  # two equal scores among the 100 kept
        s.flat[np.argsort(s, axis=None)[-5]] = s.flat[np.argsort(s, axis=None)[-6]]
    elif case == "tie at the edge":  # the 100th and the 101st equal
        order = np.argsort(s, axis=None)
        s.flat[order[-101]] = s.flat[order[-100]]
    elif case == "few above the threshold":
        s *= 0.01
        s.flat[rng.choice(s.size, 40, replace=False)] = rng.uniform(0.5, 1, 40)
    elif case == "none above the threshold":
        s *= 0.01
    elif case == "NaN":
        s.flat[7] = np.nan
    elif case == "saturated":  # softmax of large logits: many scores exactly 1.0
        s = torch.from_numpy(rng.normal(0, 40, (3000, 22)).astype(np.float32)).softmax(-1)
        return s[:, :-1].contiguous()
    return torch.from_numpy(s)


@pytest.mark.parametrize("case,shortcut", [
    ("distinct", True), ("few above the threshold", True), ("none above the threshold", True),
    ("tie inside", False), ("tie at the edge", False), ("NaN", False), ("saturated", False)])
def test_topk_filter_equals_mmdet(case, shortcut, monkeypatch):
    """Scores, labels, anchor indices and results rows equal mmdet's, bit for bit; where the
    kept order is not unique (equal scores, NaN) it is mmdet's own function that answers,
    and where it is, it is not (the shortcut really ran)."""
    from mmdet.models.utils import filter_scores_and_topk

    scores = level_scores(np.random.default_rng(3), case)
    results = {"bbox_pred": torch.randn(scores.shape[0], 4),
               "priors": torch.rand(scores.shape[0], 4)}
    want = filter_scores_and_topk(scores, 0.02, 100, results)
    counted = CountedFilter(monkeypatch)
    got = topk_filter(scores, 0.02, 100, results)
    assert counted.calls == (0 if shortcut else 1)
    for a, b in zip(got[:3], want[:3], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert got[3].keys() == want[3].keys()
    for k in want[3]:
        assert torch.equal(got[3][k], want[3][k]), k


@pytest.mark.parametrize("shape,k", [((5000, 80), 1001), ((600, 80), 1001), ((40, 30), 1001),
                                     ((3000, 21), 101), ((7, 5), 35)])
@pytest.mark.parametrize("data", ["distinct", "few rows", "one per anchor", "ties", "NaN"])
def test_top_entries_equal_topk(shape, k, data):
    """The values ``topk`` returns, always (the uniqueness check reads them); its indices too
    where the values are distinct: anchors with one best score (``j`` 1), several (``j`` 2)
    and every score ranked; the largest scores crowded into a few anchors, or one in each;
    ties at the bound; NaN."""
    rng = np.random.default_rng(7)
    s = rng.permutation(np.arange(shape[0] * shape[1], dtype=np.float32)).reshape(shape) / 1e4
    if data == "few rows":  # the largest scores all in three anchors
        s[[0, shape[0] // 2, shape[0] - 1]] += 100  # above every other score
    elif data == "one per anchor":  # exactly k scores reach the bound: a higher one misses
        s[:, 0] += 100
    elif data == "ties":
        s = np.round(s * 10) / 10
    elif data == "NaN":
        s.flat[5] = np.nan
    scores = torch.from_numpy(s)
    want_v, want_i = scores.reshape(-1).topk(k)
    got_v, got_i = postprocess._top_entries(scores, k)
    assert torch.equal(got_v, want_v) if data != "NaN" else torch.allclose(
        got_v, want_v, equal_nan=True)
    if data in ("distinct", "few rows", "one per anchor"):
        assert torch.equal(got_i, want_i)


def test_topk_filter_passes_what_it_does_not_cover_to_mmdet(monkeypatch):
    """No limit (``nms_pre`` -1), a limit past the scores' count, results as a list: mmdet's
    function runs them."""
    scores = level_scores(np.random.default_rng(4), "distinct")
    rows = torch.randn(scores.shape[0], 4)
    counted = CountedFilter(monkeypatch)
    for args in ((scores, 0.02, -1, {"r": rows}), (scores, 0.02, scores.numel(), {"r": rows}),
                 (scores, 0.02, 100, [rows])):
        topk_filter(*args)
    assert counted.calls == 3


def assert_same_detections(ours: list[Detections], ref: list[Detections]) -> None:
    assert [d.img_id for d in ours] == [d.img_id for d in ref]
    for a, b in zip(ours, ref, strict=True):
        for field in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field),
                                          err_msg=f"image {a.img_id}: {field}")


def test_postprocessor_detections_equal_mmdet_and_mmcv(model_name, bundles, sample_batch,
                                                       head_outputs, monkeypatch):
    """The whole mmdet post-processing with our shortcuts (NMS in our kernel, per-level top-k)
    and with mmdet's and mmcv's own code: the same detections, on the model's real outputs and on
    saturated logits (one class everywhere, thousands of candidates per image: what a
    random-init SSD300 sends, and NMS's worst case). On the real outputs the top-k shortcut
    served levels itself (it is not all handed back to mmdet)."""
    b = bundles(model_name)
    ours = b.postprocessor()
    ref = Postprocessor(b.cfg, ours.cat_ids.tolist(), shortcuts=False)
    nms = ours.head.test_cfg.nms["type"]  # grouped_nms, its groups in our kernel
    assert nms.func is grouped_nms and nms.keywords["nms_library"].endswith("ssd_nms.so")
    assert ref.head.test_cfg.nms.get("type", "nms") == "nms"
    assert "_predict_by_feat_single" in vars(ours.head)
    assert "_predict_by_feat_single" not in vars(ref.head)
    metas = sample_batch.metas
    outputs = head_outputs(model_name, "torch")
    rng = np.random.default_rng(0)
    saturated = [rng.normal(0, 8, o.shape).astype(np.float32) for o in outputs]
    counted = CountedFilter(monkeypatch)
    for outs in (outputs, saturated):
        counted.calls = 0
        got = ours(outs, metas)
        handed_back = counted.calls
        want = ref(outs, metas)
        assert sum(map(len, want)) > 0, "no detections: nothing compared"
        assert_same_detections(got, want)
        if outs is outputs:
            assert handed_back < ours.num_levels * len(metas)


def test_postprocessor_workers_give_the_same_detections(model_name, bundles, sample_batch,
                                                        head_outputs, monkeypatch):
    """Images decoded side by side on threads (the default: one per backend thread) give what
    one thread gives, in the same order, with runs of unequal length; on saturated logits too,
    where each image sends thousands of boxes to NMS. Both models split here, whatever their
    number of class scores (THREADED_MIN_SCORES lowered to 0)."""
    monkeypatch.setattr(postprocess, "THREADED_MIN_SCORES", 0)
    b = bundles(model_name)
    metas = sample_batch.metas
    assert len(metas) >= 3, "too few images to split the batch three ways"
    one = Postprocessor(b.cfg, b.postprocessor().cat_ids.tolist(), workers=1)
    rng = np.random.default_rng(1)
    outputs = head_outputs(model_name, "torch")
    saturated = [rng.normal(0, 8, o.shape).astype(np.float32) for o in outputs]
    runs: list[tuple[int, int]] = []
    decode = Postprocessor._decode

    def spy(self, outputs, metas, start, end):
        runs.append((start, end))
        return decode(self, outputs, metas, start, end)

    monkeypatch.setattr(Postprocessor, "_decode", spy)
    n = len(metas)
    for outs in (outputs, saturated):
        want = one(outs, metas)
        assert sum(map(len, want)) > 0, "no detections: nothing compared"
        for workers in (2, 3, n + 1):
            runs.clear()
            assert_same_detections(Postprocessor(b.cfg, one.cat_ids.tolist(),
                                                 workers=workers)(outs, metas), want)
            assert sorted(runs) == [(n * k // min(workers, n), n * (k + 1) // min(workers, n))
                                    for k in range(min(workers, n))]
    with pytest.raises(UserError, match="workers must be at least 1, got 0"):
        Postprocessor(b.cfg, one.cat_ids.tolist(), workers=0)


def test_postprocessor_reads_channels_last_views_as_is(model_name, bundles, sample_batch,
                                                      head_outputs):
    """A TVM engine hands its heads as NCHW views of channels-last buffers, which the
    post-processing wraps without a copy; read-only and float64 heads are copied. The
    detections are the same as from contiguous NCHW arrays."""
    b = bundles(model_name)
    post = b.postprocessor()
    outputs = head_outputs(model_name, "torch")
    views = [np.ascontiguousarray(o.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
             for o in outputs]
    assert not any(v.flags.c_contiguous for v in views if v.shape[2] * v.shape[3] > 1)
    read_only = [o.copy() for o in outputs]
    for o in read_only:
        o.flags.writeable = False
    want = post(outputs, sample_batch.metas)
    assert sum(map(len, want)) > 0, "no detections: nothing compared"
    for outs in (views, read_only, [o.astype(np.float64) for o in outputs]):
        assert_same_detections(post(outs, sample_batch.metas), want)
