"""Our full pipeline (our decode + preprocessing -> PyTorch backend -> our post-processing call)
gives the detections of ``mmdet.apis.inference_detector`` with the same weights."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.parity


def test_pipeline_equals_mmdet_inference_detector(artifacts, runners, sample_set, mmdet_cfg,
                                                  preprocess_settings, expectations,
                                                  record_property):
    from mmdet.apis import inference_detector

    from ssd_pipeline.data import load_image, preprocess
    from ssd_pipeline.postprocess import Postprocessor

    post = Postprocessor(mmdet_cfg)
    runner = runners("torch")
    box_atol = expectations.number("reference.box_atol_px")
    score_atol = expectations.number("reference.score_atol")
    sizes, counts = set(), []
    for rec in sample_set.images:
        x, meta = preprocess(load_image(rec.path), preprocess_settings, rec.img_id)
        (ours,) = post(runner.run(x[None]), [meta])
        ref = inference_detector(artifacts.torch_model, str(rec.path)).pred_instances
        sizes.add((rec.width, rec.height))
        counts.append(len(ours))
        assert len(ours) == len(ref), f"{rec.path.name}: got {len(ours)} boxes, expected {len(ref)}"
        assert len(ours) > 0, f"{rec.path.name}: no detections, nothing compared"
        np.testing.assert_array_equal(ours.labels, ref.labels.numpy(), err_msg=rec.path.name)
        np.testing.assert_allclose(ours.boxes, ref.bboxes.numpy(), rtol=0, atol=box_atol,
                                   err_msg=f"{rec.path.name}: boxes (px)")
        np.testing.assert_allclose(ours.scores, ref.scores.numpy(), rtol=0, atol=score_atol,
                                   err_msg=f"{rec.path.name}: scores")
    record_property("detections_per_image", counts)
    assert len(sizes) == len(sample_set.images) >= 4, "need 4+ distinct image sizes"
