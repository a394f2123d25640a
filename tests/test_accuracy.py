"""COCO accuracy gates: each backend (and precision) must reach the expectations file's
mAP@0.5 and mAP@0.5:0.95 floors for the model, and lose no more than the allowed AP against
PyTorch. Without a dataset or checkpoint the tests skip with the reason (fail under
--require-data). Every run writes its records (all 12 metrics, unrounded) to accuracy.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import missing_data
from ssd_pipeline.errors import UserError
from ssd_pipeline.gates import require_at_least, require_at_most

pytestmark = pytest.mark.accuracy


@pytest.fixture(scope="session")
def coco_val(pytestconfig):
    from ssd_pipeline.data import CocoDetectionSet

    opt = pytestconfig.option
    try:
        return CocoDetectionSet.from_root(opt.datasets_dir, max_images=opt.max_images)
    except UserError as e:
        reason = f"no COCO val2017: {e}"
    missing_data(pytestconfig, reason)


@pytest.fixture(scope="session")
def checkpoint(pytestconfig, model_spec):
    if model_spec.checkpoint is None:
        missing_data(pytestconfig, "no checkpoint: pass --weight "
                     "ssd300_coco_20210803_015428-d231a06e.pth (or set SSD300_WEIGHT)")
    return model_spec.checkpoint


@pytest.fixture(scope="session")
def accuracy_of(pytestconfig, coco_val, checkpoint, runners, mmdet_cfg, preprocess_settings,
                model_spec):
    """``accuracy_of(backend, precision)``: the record of one full run, computed once."""
    from ssd_pipeline.evaluate import accuracy_record
    from ssd_pipeline.postprocess import Postprocessor

    post = Postprocessor(mmdet_cfg, coco_val.cat_ids)
    cache: dict = {}
    records: list = []
    out = Path(pytestconfig.option.records_dir) / "accuracy.json"
    pytestconfig._ssd_accuracy_records = records
    pytestconfig._ssd_accuracy_path = out

    def get(backend: str, precision: str) -> dict:
        if (backend, precision) not in cache:
            rec = accuracy_record(runners(backend, precision), coco_val, post,
                                  preprocess_settings, pytestconfig.option.batch_size,
                                  model_spec.weights_label)
            cache[backend, precision] = rec
            records.append(rec)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(records, indent=1))
        return cache[backend, precision]

    return get


@pytest.fixture(scope="session")
def model_key(model_spec):
    return model_spec.config.stem


def test_accuracy(backend_name, precision, accuracy_of, expectations, model_key,
                  record_property):
    rec = accuracy_of(backend_name, precision)
    m = rec["metrics"]
    record_property("metrics", {k: v for k, v in m.items() if k.startswith("bbox_")})
    key = f"accuracy.{model_key}"
    require_at_least("mAP@0.5", m["bbox_mAP_50"], expectations.number(f"{key}.map_50_min"),
                     expectations.source(f"{key}.map_50_min"))
    require_at_least("mAP@0.5:0.95", m["bbox_mAP"], expectations.number(f"{key}.map_min"),
                     expectations.source(f"{key}.map_min"))


def test_accuracy_drop_vs_torch(compared_backend, precision, accuracy_of, expectations):
    backend_name = compared_backend
    ref = accuracy_of("torch", "fp32")["metrics"]
    got = accuracy_of(backend_name, precision)["metrics"]
    limit_key = f"accuracy.drop_vs_torch.{precision}_max"
    for stat in ("bbox_mAP", "bbox_mAP_50"):
        require_at_most(f"{stat} drop vs torch ({backend_name}/{precision})",
                        ref[stat] - got[stat], expectations.number(limit_key),
                        expectations.source(limit_key))
