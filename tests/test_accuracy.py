"""COCO accuracy gates: each model, backend and precision must reach the expectations file's
mAP@0.5 and mAP@0.5:0.95 floors, and lose no more than the allowed AP against PyTorch.

``ssd300`` needs COCO val2017 (--datasets-dir / $DATASETS_DIR) and the checkpoint (--weight /
$SSD300_WEIGHT): without them its tests skip with the reason (fail under --require-data).
``tiny`` is the embedded model with its generated val set: it always runs. Every run writes
its records (all 12 metrics, unrounded) to <records-dir>/accuracy.json.
"""

from __future__ import annotations

import pytest

from conftest import WORLD, missing_data, progress_stream, write_record_part
from ssd_pipeline.core.errors import UserError
from ssd_pipeline.core.gates import drop_key, require

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
    """``accuracy_of(model, backend, precision)``: the record of one full run, computed once.
    Under torchrun each rank runs its share and rank 0 alone gets the record; the other ranks
    skip the judging, saying so (the run's exit status is rank 0's)."""
    from ssd_pipeline.suite.distributed import check_same_setup, setup_fingerprint
    from ssd_pipeline.suite.evaluate import accuracy_record

    world = pytestconfig.stash[WORLD]
    cache: dict = {}

    def get(model: str, backend: str, precision: str) -> dict:
        key = (model, backend, precision)
        if key not in cache:
            dataset = eval_set(model)
            b = bundles(model)
            if precision == "int8" and b.artifacts.calibration is None:
                missing_data(pytestconfig, f"{model} int8 needs calibration images never "
                             "scored: pass --calib-images DIR (or set CALIB_IMAGES_DIR)")
            runner = b.runner(backend, precision)
            batch = pytestconfig.option.batch_size
            try:
                check_same_setup(world, lambda: setup_fingerprint(
                    b.spec.weights_label, b.artifacts.simplified_onnx_path, [runner], dataset,
                    batch))
                rec = accuracy_record(runner, dataset, b.postprocessor(dataset.cat_ids),
                                      b.settings, batch, b.spec.provenance(),
                                      progress=progress_stream(pytestconfig), world=world)
            except UserError as e:
                pytest.fail(str(e), pytrace=False)
            cache[key] = rec and rec | {"model": model}
            if rec is not None:
                write_record_part(pytestconfig, cache[key])
        if cache[key] is None:
            pytest.skip(f"rank {world.rank} of {world.size} ran its share of the images; "
                        "rank 0 judges the gathered metric and its verdict is every rank's")
        return cache[key]

    return get


@pytest.fixture(scope="session")
def accuracy_baseline(pytestconfig):
    from ssd_pipeline.suite.baseline import load_accuracy_baseline

    path = pytestconfig.option.accuracy_baseline
    try:
        return load_accuracy_baseline(path) if path else None
    except UserError as e:
        raise pytest.UsageError(str(e)) from None


def test_accuracy(model_name, backend_name, precision, accuracy_of, bundles, expectations,
                  record_property, accuracy_baseline):
    rec = accuracy_of(model_name, backend_name, precision)
    m = rec["metrics"]
    record_property("metrics", {k: v for k, v in m.items() if k.startswith("bbox_")})
    key = bundles(model_name).entry.expectations_key
    require(expectations, f"{key}.map_50_min", "mAP@0.5", m["bbox_mAP_50"])
    require(expectations, f"{key}.map_min", "mAP@0.5:0.95", m["bbox_mAP"])
    if accuracy_baseline is not None:
        check_against_baseline(rec, accuracy_baseline, expectations)


def check_against_baseline(rec, baseline, expectations) -> None:
    """Each of the 12 stats may fall at most regression.stat_drop_max below the saved record
    of the same model, backend, precision and data; other data is refused in one line."""
    from ssd_pipeline.metrics import STAT_NAMES
    from ssd_pipeline.suite.baseline import same_data

    case = (rec["model"], rec["backend"], rec["precision"])
    base = baseline.get(case)
    if base is None:
        pytest.fail(f"--accuracy-baseline has no record of {'/'.join(case)}", pytrace=False)
    why = same_data(base, rec)
    if why:
        pytest.fail(f"--accuracy-baseline: {'/'.join(case)} cannot be compared: {why}",
                    pytrace=False)
    for stat in STAT_NAMES:
        k = f"bbox_{stat}"
        require(expectations, "regression.stat_drop_max",
                f"{'/'.join(case)} {stat} drop vs the baseline ({base['metrics'][k]:.4f})",
                base["metrics"][k] - rec["metrics"][k])


def test_accuracy_drop_vs_torch(model_name, compared_backend, precision, accuracy_of,
                                expectations):
    ref = accuracy_of(model_name, "torch", "fp32")["metrics"]
    got = accuracy_of(model_name, compared_backend, precision)["metrics"]
    key = drop_key(expectations, compared_backend, precision)
    drops = {stat: ref[stat] - got[stat] for stat in ("bbox_mAP", "bbox_mAP_50")}
    if expectations.is_measured_only(key):
        pytest.skip(f"measured only, not gated ({key}): drops vs torch fp32 "
                    + ", ".join(f"{k} {v:+.4f}" for k, v in drops.items()))
    for stat, drop in drops.items():
        require(expectations, key, f"{stat} drop vs torch ({compared_backend}/{precision})",
                drop)
