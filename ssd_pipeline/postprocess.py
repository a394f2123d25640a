"""Head outputs -> per-image detections, through mmdet's own ``SSDHead.predict_by_feat``
(softmax, per-level top-k and score threshold, delta decoding, mmcv ``batched_nms``), as the
original does; boxes come back in original-image pixels (``rescale=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .core.errors import UserError
from .data import COCO80_CATEGORY_IDS, ImageMeta


@dataclass
class Detections:
    """One image's detections: xyxy boxes in original pixels, scores, contiguous labels and
    the annotation file's category ids for those labels."""

    img_id: int
    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    labels: np.ndarray  # (N,) int64
    category_ids: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.scores)


class Postprocessor:
    """Decodes raw head outputs with the head that the config describes (weights unused)."""

    def __init__(self, cfg: Any, cat_ids: list[int] | None = None, head: Any = None) -> None:
        if head is None:
            from mmdet.registry import MODELS
            from mmdet.utils import register_all_modules

            register_all_modules()
            head_cfg = cfg.model.bbox_head.copy()
            head_cfg.update(test_cfg=cfg.model.test_cfg)
            head = MODELS.build(head_cfg)
            head.loss_cls = None  # mmdet 3.3.0 bug, as in model.build_model
        self.head = head.eval()
        self.num_levels = len(self.head.prior_generator.strides)
        num_classes = self.head.num_classes
        if cat_ids is None:
            if num_classes != len(COCO80_CATEGORY_IDS):
                raise ValueError(f"the model has {num_classes} classes: pass cat_ids")
            cat_ids = COCO80_CATEGORY_IDS
        if len(cat_ids) != num_classes:
            raise UserError(f"the annotation file has {len(cat_ids)} categories but the "
                            f"model predicts {num_classes} classes: wrong dataset for this model?")
        self.cat_ids = np.asarray(cat_ids, np.int64)

    @property
    def score_thr(self) -> float:
        return float(self.head.test_cfg.get("score_thr", 0.0))

    @property
    def max_per_img(self) -> int | None:
        value = self.head.test_cfg.get("max_per_img")
        return int(value) if value else None

    def __call__(self, outputs: list[np.ndarray], metas: list[ImageMeta]) -> list[Detections]:
        """``outputs``: 12 arrays (6 cls maps, 6 box maps), batch rows >= len(metas)."""
        import torch

        n = len(metas)
        tensors = [torch.from_numpy(np.ascontiguousarray(o[:n], dtype=np.float32))
                   for o in outputs]
        cls, box = tensors[: self.num_levels], tensors[self.num_levels:]
        with torch.inference_mode():
            results = self.head.predict_by_feat(
                cls, box, batch_img_metas=[m.as_mmdet() for m in metas], rescale=True)
        dets = []
        for meta, r in zip(metas, results, strict=True):
            labels = r.labels.numpy().astype(np.int64)
            dets.append(Detections(meta.img_id, r.bboxes.numpy().astype(np.float32),
                                   r.scores.numpy().astype(np.float32), labels,
                                   self.cat_ids[labels]))
        return dets
