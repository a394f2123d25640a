"""The accuracy loop: dataset -> preprocess -> backend -> postprocess -> metric, one record.

Batching as the original: fixed batch size, the last partial batch padded and sliced back.
Decoding runs ahead in threads so the engine is not starved.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import time
from typing import Any, TextIO

from ..backends import Runner
from ..core.cache import file_sha256
from ..core.errors import UserError
from ..core.host import versions
from ..data import CocoDetectionSet, ImageRecord, PreprocessSettings, batches
from ..metrics import evaluate, load_coco
from ..postprocess import Detections, Postprocessor
from .distributed import (
    World,
    collective,
    detections_to_rows,
    fault_drill,
    gather_detections,
    gather_json,
    shard,
)


def predict(runner: Runner, records: list[ImageRecord], post: Postprocessor,
            settings: PreprocessSettings, batch_size: int, progress: bool | TextIO = False
            ) -> tuple[list[Detections], float]:
    """Detections for every image of ``records``, and the engine-only seconds spent.
    ``progress``: a bar (images done, img/s, ETA) on stderr, or on the stream given."""
    dets: list[Detections] = []
    engine_s = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(records), unit="img", desc=f"{runner.backend}/{runner.precision}",
                   file=sys.stderr if progress is True else progress)
    for batch in batches(records, batch_size, settings):
        t0 = time.perf_counter()
        outputs = runner.run(batch.array)
        engine_s += time.perf_counter() - t0
        dets.extend(post(outputs, batch.metas[: batch.n_valid]))
        if bar is not None:
            bar.update(batch.n_valid)
    if bar is not None:
        bar.close()
    return dets, engine_s


def accuracy_record(runner: Runner, dataset: CocoDetectionSet, post: Postprocessor,
                    settings: PreprocessSettings, batch_size: int, model: dict[str, Any],
                    progress: bool | TextIO = False, world: World | None = None
                    ) -> dict[str, Any] | None:
    """Run the whole dataset through ``runner`` and score it: a flat, self-describing record.
    ``model``: the model's provenance (``ModelSpec.provenance()``: weights, how read).
    Under torchrun (``world``), each rank runs its whole batches, the detections are gathered
    and rank 0 scores them once; the other ranks return None."""
    world = world or World()
    t0 = time.perf_counter()
    mine, batch_ids = shard(dataset.images, batch_size, world)
    fault_drill(world)
    dets, engine_s = predict(runner, mine, post, settings, batch_size,
                             progress if world.is_main else False)
    dets = gather_detections(world, dets)
    ranks = [{"images": len(mine), "batches": len(batch_ids), "engine_s": round(engine_s, 3),
              "threads": runner.threads}]
    if world.distributed:
        with collective(world, "gathering per-rank timings"):
            ranks = gather_json(world, ranks[0])
    if not world.is_main:
        return None
    order = {r.img_id: k for k, r in enumerate(dataset.images)}
    dets.sort(key=lambda d: order[d.img_id])
    if [d.img_id for d in dets] != dataset.img_ids:
        raise UserError(f"detections came back for {len(dets)} of {len(dataset)} images: "
                        "a rank skipped or repeated work; no metric is reported")
    metrics = evaluate(load_coco(dataset.ann_file), dets, dataset.img_ids)
    # every box, score and label, in image order: equal hashes mean identical detections
    digest = hashlib.sha256(detections_to_rows(dets)[1].tobytes()).hexdigest()
    wall_s = time.perf_counter() - t0
    return {
        **runner.info,
        "batch_size": batch_size,
        **model,
        "dataset": str(dataset.ann_file),
        "dataset_sha256": file_sha256(dataset.ann_file),
        "num_images": len(dataset),
        "metrics": metrics,
        "detections_sha256": digest,
        "wall_s": round(wall_s, 3),
        "engine_s": round(max(r["engine_s"] for r in ranks), 3),
        "images_per_s": round(len(dataset) / wall_s, 3),
        "world_size": world.size,
        "images_per_rank": [r["images"] for r in ranks],
        "batches_per_rank": [r["batches"] for r in ranks],
        "threads_per_rank": [r["threads"] for r in ranks],
        "python": platform.python_version(),
        "versions": versions("mmdet", "mmcv", "pycocotools"),
    }


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of accuracy records (mmdet's 3-decimal rounding for display only)."""
    head = ("| backend | precision | images | mAP@0.5 | mAP@0.5:0.95 | mAP_75 | AR@100 "
            "| img/s (end-to-end) |")
    rows = [head, "|" + "---|" * 8]
    for r in records:
        m = r["metrics"]
        rows.append(f"| {r['backend']} | {r['precision']} | {r['num_images']} | "
                    f"{m['bbox_mAP_50']:.4f} | {m['bbox_mAP']:.4f} | {m['bbox_mAP_75']:.4f} | "
                    f"{m['bbox_AR@100']:.4f} | {r['images_per_s']:.2f} |")
    return "\n".join(rows)
