"""COCO accuracy gates: each model, backend and precision must reach the expectations file's
mAP@0.5 and mAP@0.5:0.95 floors, and lose no more than the allowed AP against PyTorch.

``ssd300`` needs COCO val2017 (--datasets-dir / $DATASETS_DIR) and the checkpoint (--weight /
$SSD300_WEIGHT): without them its tests skip with the reason (fail under --require-data).
``tiny`` is the embedded model with its generated val set: it always runs. Every run writes
its records (all 12 metrics, unrounded) to <records-dir>/accuracy.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ACCURACY_PATH, ACCURACY_RECORDS, missing_data
from ssd_pipeline.core.errors import UserError
from ssd_pipeline.core.gates import require_at_least, require_at_most

pytestmark = pytest.mark.accuracy


@pytest.fixture(scope="session")
def eval_set(pytestconfig, bundles, store):
    """``eval_set(model)``: its dataset, or skip/fail saying what is missing (checked before
    anything is built)."""
    opt = pytestconfig.option
    found: dict = {}

    def get(model: str):
        b = bundles(model)
        if model not in found:
            try:
                given = None if b.entry.embedded else opt.datasets_dir  # $DATASETS_DIR is COCO
                found[model] = b.dataset(given, opt.max_images)
            except UserError as e:
                found[model] = f"no COCO val2017: {e}"
        if isinstance(found[model], str):
            missing_data(pytestconfig, found[model])
        if b.spec.checkpoint is None:
            missing_data(pytestconfig, "no checkpoint: pass --weight "
                         "ssd300_coco_20210803_015428-d231a06e.pth (or set SSD300_WEIGHT)")
        return found[model]

    return get


@pytest.fixture(scope="session")
def accuracy_of(pytestconfig, bundles, eval_set):
    """``accuracy_of(model, backend, precision)``: the record of one full run, computed once."""
    from ssd_pipeline.suite.evaluate import accuracy_record

    cache: dict = {}
    records: list = []
    out = Path(pytestconfig.option.records_dir) / "accuracy.json"
    pytestconfig.stash[ACCURACY_RECORDS] = records
    pytestconfig.stash[ACCURACY_PATH] = out

    def get(model: str, backend: str, precision: str) -> dict:
        key = (model, backend, precision)
        if key not in cache:
            dataset = eval_set(model)
            b = bundles(model)
            rec = accuracy_record(b.runner(backend, precision), dataset,
                                  b.postprocessor(dataset.cat_ids), b.settings,
                                  pytestconfig.option.batch_size, b.spec.provenance())
            cache[key] = rec | {"model": model}
            records.append(cache[key])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(records, indent=1))
        return cache[key]

    return get


def test_accuracy(model_name, backend_name, precision, accuracy_of, bundles, expectations,
                  record_property):
    rec = accuracy_of(model_name, backend_name, precision)
    m = rec["metrics"]
    record_property("metrics", {k: v for k, v in m.items() if k.startswith("bbox_")})
    key = bundles(model_name).entry.expectations_key
    require_at_least("mAP@0.5", m["bbox_mAP_50"], expectations.number(f"{key}.map_50_min"),
                     expectations.source(f"{key}.map_50_min"))
    require_at_least("mAP@0.5:0.95", m["bbox_mAP"], expectations.number(f"{key}.map_min"),
                     expectations.source(f"{key}.map_min"))


def test_accuracy_drop_vs_torch(model_name, compared_backend, precision, accuracy_of,
                                expectations):
    ref = accuracy_of(model_name, "torch", "fp32")["metrics"]
    got = accuracy_of(model_name, compared_backend, precision)["metrics"]
    limit_key = f"accuracy.drop_vs_torch.{precision}_max"
    for stat in ("bbox_mAP", "bbox_mAP_50"):
        require_at_most(f"{stat} drop vs torch ({compared_backend}/{precision})",
                        ref[stat] - got[stat], expectations.number(limit_key),
                        expectations.source(limit_key))
