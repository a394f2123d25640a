"""Our one piece of post-processing, ``grouped_nms``, returns exactly what mmcv's ``nms``
returns: the same indices in the same order and the same scores, bit for bit, on sets built
to break it (tied scores, touching and degenerate boxes, one dense class, thresholds at the
edges) and on real head outputs through mmdet's ``predict_by_feat``; images decoded on several
threads give what one thread gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssd_pipeline import postprocess
from ssd_pipeline.core.errors import UserError
from ssd_pipeline.postprocess import Detections, Postprocessor, grouped_nms


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


def assert_same_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                    iou: float) -> None:
    from mmcv.ops import batched_nms

    cfg = {"type": "nms", "iou_threshold": iou}
    dets_ref, keep_ref = batched_nms(boxes, scores, labels, cfg)
    dets, keep = batched_nms(boxes, scores, labels, {**cfg, "type": grouped_nms})
    assert torch.equal(keep, keep_ref), f"kept {len(keep)} boxes, mmcv kept {len(keep_ref)}"
    assert torch.equal(dets, dets_ref)


@pytest.mark.parametrize("iou", [0.0, 0.45, 0.7, 1.0])
@pytest.mark.parametrize("classes", [1, 3, 80])
def test_grouped_nms_equals_mmcv(iou, classes):
    rng = np.random.default_rng(int(iou * 100) + classes)
    for trial in range(24):
        n = int(rng.integers(2, 2500))
        assert_same_nms(*random_set(rng, n, classes, tied_scores=trial % 2 == 0,
                                    integer_boxes=trial % 3 == 0, degenerate=trial % 4 == 0),
                        iou)


def test_grouped_nms_splits_classes_and_passes_the_rest_to_mmcv():
    """Boxes far apart split into groups (the case it is for); the inputs it does not cover
    are mmcv's nms call unchanged."""
    from mmcv.ops import nms

    rng = np.random.default_rng(5)
    boxes, scores, _ = random_set(rng, 600, 1, tied_scores=True, integer_boxes=False,
                                  degenerate=False)
    boxes[300:, 0::2] += 1000  # two groups along x
    assert_same_nms(boxes, scores, torch.zeros(600, dtype=torch.int64), 0.45)
    nan_boxes = boxes.clone()
    nan_boxes[7, 2] = float("nan")
    for args, kwargs in (((nan_boxes, scores, 0.45), {}), ((boxes, scores, 0.45), {"offset": 1}),
                         ((boxes, scores, 0.45), {"score_threshold": 0.5}),
                         ((boxes, scores, 0.45), {"max_num": 10}),
                         ((boxes.numpy(), scores.numpy(), 0.45), {}),
                         ((boxes[:1], scores[:1], 0.45), {})):
        ours, ref = grouped_nms(*args, **kwargs), nms(*args, **kwargs)
        np.testing.assert_array_equal(np.asarray(ours[1]), np.asarray(ref[1]))
        np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(ref[0]))


def assert_same_detections(ours: list[Detections], ref: list[Detections]) -> None:
    assert [d.img_id for d in ours] == [d.img_id for d in ref]
    for a, b in zip(ours, ref, strict=True):
        for field in ("boxes", "scores", "labels"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field),
                                          err_msg=f"image {a.img_id}: {field}")


def test_postprocessor_detections_equal_mmcv_nms(model_name, bundles, sample_batch,
                                                 head_outputs):
    """The whole mmdet post-processing with our NMS and with mmcv's: the same detections, on
    the model's real outputs and on saturated logits (one class everywhere, thousands of
    candidates per image: what a random-init SSD300 sends, and NMS's worst case)."""
    b = bundles(model_name)
    ours = b.postprocessor()
    ref = Postprocessor(b.cfg, ours.cat_ids.tolist(), grouped=False)
    assert ours.head.test_cfg.nms["type"] is grouped_nms
    assert ref.head.test_cfg.nms.get("type", "nms") == "nms"
    metas = sample_batch.metas
    outputs = head_outputs(model_name, "torch")
    rng = np.random.default_rng(0)
    saturated = [rng.normal(0, 8, o.shape).astype(np.float32) for o in outputs]
    for outs in (outputs, saturated):
        got, want = ours(outs, metas), ref(outs, metas)
        assert sum(map(len, want)) > 0, "no detections: nothing compared"
        assert_same_detections(got, want)


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
