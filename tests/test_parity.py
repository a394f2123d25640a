"""Backends agree: ONNX Runtime vs PyTorch on raw head outputs and on detections after NMS,
for every model (--models)."""

from __future__ import annotations

import pytest

from tests.helpers import assert_detection_parity, assert_raw_parity
from tests.test_tvm import tolerance_table

pytestmark = pytest.mark.parity


def test_onnx_vs_torch_raw_outputs(model_name, bundles, sample_batch, head_outputs,
                                   expectations, record_property):
    ort = bundles(model_name).runner("onnxruntime")
    assert_raw_parity(ort.run(sample_batch.array), head_outputs(model_name, "torch"),
                      ort.output_names, expectations.number("parity.fp32.raw_rel_err_max"),
                      expectations.source("parity.fp32.raw_rel_err_max"), record_property)


def test_onnx_vs_torch_detections(model_name, bundles, sample_batch, head_outputs,
                                  expectations, record_property):
    b = bundles(model_name)
    postprocessor = b.postprocessor()
    got = postprocessor(b.runner("onnxruntime").run(sample_batch.array), sample_batch.metas)
    ref = postprocessor(head_outputs(model_name, "torch"), sample_batch.metas)
    assert_detection_parity(got, ref, expectations.number("parity.fp32.det_iou_min"),
                            expectations.number("parity.fp32.det_score_atol"),
                            postprocessor.score_thr, record_property,
                            max_per_img=postprocessor.max_per_img)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_dynamic_batch(runners, sample_batch, head_outputs, batch, expectations):
    torch_outputs = head_outputs("ssd300", "torch")
    """The exported graph's batch axis is dynamic: any batch gives the same per-image rows."""
    import numpy as np

    x = np.concatenate([sample_batch.array] * 3)[:batch]
    outs = runners("onnxruntime").run(x)
    assert all(o.shape[0] == batch for o in outs)
    assert_raw_parity([o[:batch] for o in outs],
                      [np.concatenate([r] * 3)[:batch] for r in torch_outputs],
                      runners("onnxruntime").output_names,
                      expectations.number("parity.fp32.raw_rel_err_max"), "dynamic batch")


@pytest.mark.backend("openvino")
def test_openvino_vs_onnx_raw_outputs(model_name, precision, bundles, sample_batch,
                                      head_outputs, expectations, record_property):
    """OpenVINO, the second speed peer, computes the same head outputs."""
    ov = bundles(model_name).runner("openvino", precision)
    key = f"{tolerance_table(precision)}.raw_rel_err_max"
    assert_raw_parity(ov.run(sample_batch.array), head_outputs(model_name, "onnxruntime"),
                      ov.output_names, expectations.number(key), expectations.source(key),
                      record_property)


def _dets(scores, boxes=None, labels=None):
    import numpy as np

    from ssd_pipeline.postprocess import Detections

    n = len(scores)
    boxes = np.asarray(boxes if boxes is not None else [[10 * i, 0, 10 * i + 8, 8]
                                                        for i in range(n)], np.float32)
    labels = np.asarray(labels if labels is not None else [0] * n, np.int64)
    return Detections(1, boxes.reshape(-1, 4), np.asarray(scores, np.float32), labels, labels)


@pytest.mark.parametrize("missing_score,ok", [(0.30, False), (0.0201, True), (0.0199, True)])
def test_detection_parity_is_strict_both_ways(missing_score, ok):
    """A detection one side lacks is excused only within det_score_atol of the other side's
    cut-off (score_thr = 0.02 here), on either side of it; a confident one never is, whether
    the reference or the candidate lacks it."""
    from ssd_pipeline.parity import match_detections

    full = _dets([0.9, 0.5, missing_score])
    short = _dets([0.9, 0.5])
    for got, ref in ((short, full), (full, short)):
        rep = match_detections(got, ref, iou_min=0.99, score_atol=1e-3, score_thr=0.02,
                               max_per_img=200)
        assert rep.matched == 2 and rep.ok() is ok, rep.summary()


def test_detection_parity_cut_off_is_the_truncated_tail():
    """With max_per_img reached, the cut-off is the lowest kept score: a detection just above
    it on the other side is borderline, one far above is not."""
    from ssd_pipeline.parity import cut_off

    assert cut_off(_dets([0.9, 0.4]).scores, 0.02, 2) == pytest.approx(0.4)
    assert cut_off(_dets([0.9, 0.4]).scores, 0.02, 200) == pytest.approx(0.02)
