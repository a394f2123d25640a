"""The accuracy loop: dataset -> preprocess -> backend -> postprocess -> metric, one record.

Batching as the original: fixed batch size, the last partial batch padded and sliced back.
Decoding runs ahead in threads so the engine is not starved.
"""

from __future__ import annotations

import platform
import sys
import time
from typing import Any, TextIO

from ..backends import Runner
from ..core.cache import file_sha256
from ..core.host import versions
from ..data import CocoDetectionSet, ImageRecord, PreprocessSettings, batches
from ..metrics import evaluate, load_coco
from ..postprocess import Detections, Postprocessor


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
                    progress: bool | TextIO = False) -> dict[str, Any]:
    """Run the whole dataset through ``runner`` and score it: a flat, self-describing record.
    ``model``: the model's provenance (``ModelSpec.provenance()``: weights, how read)."""
    t0 = time.perf_counter()
    dets, engine_s = predict(runner, dataset.images, post, settings, batch_size, progress)
    metrics = evaluate(load_coco(dataset.ann_file), dets, dataset.img_ids)
    wall_s = time.perf_counter() - t0
    return {
        **runner.info,
        "batch_size": batch_size,
        **model,
        "dataset": str(dataset.ann_file),
        "dataset_sha256": file_sha256(dataset.ann_file),
        "num_images": len(dataset),
        "metrics": metrics,
        "wall_s": round(wall_s, 3),
        "engine_s": round(engine_s, 3),
        "images_per_s": round(len(dataset) / wall_s, 3),
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
