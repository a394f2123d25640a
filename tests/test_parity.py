"""Backends agree: ONNX Runtime vs PyTorch on raw head outputs and on detections after NMS,
for every model (--models)."""

from __future__ import annotations

import pytest

from tests.helpers import assert_detection_parity, assert_raw_parity

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
                            postprocessor.score_thr, record_property)


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
    key = f"parity.{'fp32' if precision == 'fp32' else 'reduced'}.raw_rel_err_max"
    assert_raw_parity(ov.run(sample_batch.array), head_outputs(model_name, "onnxruntime"),
                      ov.output_names, expectations.number(key), expectations.source(key),
                      record_property)
