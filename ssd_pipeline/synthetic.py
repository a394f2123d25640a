"""Deterministic COCO-format detection data the suite makes itself (no download needed).

Objects of a few classes, each class a distinct shape and colour, drawn on textured
backgrounds; several objects per image with overlaps and small objects; images of varied
sizes and aspect ratios; optional crowd regions and empty images. Written in the original's
DATASETS_DIR layout: ``annotations/instances_<split>.json`` and ``images/<split>/*.jpg``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# COCO-like, deliberately non-contiguous ids (label i -> id in ascending order).
DEFAULT_CATEGORIES: list[tuple[int, str]] = [
    (3, "car"), (7, "train"), (18, "dog"), (44, "bottle"), (62, "chair")]
SIZES: list[tuple[int, int]] = [  # (width, height): landscape, portrait, square, panoramic
    (640, 480), (480, 640), (500, 500), (800, 320), (320, 560), (424, 424), (720, 405)]
_COLORS = [(40, 40, 220), (40, 200, 40), (220, 60, 40), (30, 200, 230), (200, 40, 200)]


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    import cv2

    base = rng.integers(60, 200, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = (np.sin(xx / rng.uniform(20, 80)) + np.cos(yy / rng.uniform(20, 80))) * 20
    noise = cv2.GaussianBlur(rng.normal(0, 25, (h, w, 3)).astype(np.float32), (0, 0), 2)
    img = base[None, None, :] + grad[..., None] + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(img: np.ndarray, label: int, box: tuple[int, int, int, int]) -> None:
    import cv2

    x1, y1, x2, y2 = box
    c = _COLORS[label % len(_COLORS)]
    cx, cy, rw, rh = (x1 + x2) // 2, (y1 + y2) // 2, (x2 - x1) // 2, (y2 - y1) // 2
    shape = label % 5
    if shape == 0:
        cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), c, -1)
    elif shape == 1:
        cv2.ellipse(img, (cx, cy), (max(rw, 1), max(rh, 1)), 0, 0, 360, c, -1)
    elif shape == 2:
        pts = np.array([[cx, y1], [x1, y2 - 1], [x2 - 1, y2 - 1]], np.int32)
        cv2.fillPoly(img, [pts], c)
    elif shape == 3:  # a cross
        t = max(2, min(rw, rh) // 2)
        cv2.rectangle(img, (x1, cy - t), (x2 - 1, cy + t), c, -1)
        cv2.rectangle(img, (cx - t, y1), (cx + t, y2 - 1), c, -1)
    else:  # a ring
        cv2.ellipse(img, (cx, cy), (max(rw, 1), max(rh, 1)), 0, 0, 360, c,
                    max(2, min(rw, rh) // 3))


def make_coco_set(out_dir: str | Path, split: str, num_images: int, seed: int,
                  categories: list[tuple[int, str]] | None = None,
                  max_objects: int = 6, crowd_images: int = 0, empty_images: int = 0,
                  jpeg_quality: int = 92, sizes: list[tuple[int, int]] | None = None) -> Path:
    """Write a dataset; return its annotation file. Same arguments -> same bytes.

    ``sizes``: (width, height) per image, cycled; default: drawn from :data:`SIZES`.
    """
    import cv2

    categories = categories or DEFAULT_CATEGORIES
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    img_dir = out_dir / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for i in range(num_images):
        w, h = sizes[i % len(sizes)] if sizes else SIZES[int(rng.integers(len(SIZES)))]
        img = _background(rng, w, h)
        img_id = 1000 + 7 * i  # non-contiguous image ids as well
        empty = i >= num_images - empty_images
        n_obj = 0 if empty else int(rng.integers(1, max_objects + 1))
        for _ in range(n_obj):
            label = int(rng.integers(len(categories)))
            # mostly medium/large, some small (mostly < 32x32 px: COCO's "small")
            side = rng.uniform(0.08, 0.5) if rng.random() > 0.2 else rng.uniform(0.05, 0.08)
            bw = max(8, int(side * min(w, h) * rng.uniform(0.7, 1.4)))
            bh = max(8, int(side * min(w, h) * rng.uniform(0.7, 1.4)))
            x1 = int(rng.integers(0, max(1, w - bw)))
            y1 = int(rng.integers(0, max(1, h - bh)))
            box = (x1, y1, min(w, x1 + bw), min(h, y1 + bh))
            _draw(img, label, box)
            anns.append(_ann(len(anns) + 1, img_id, categories[label][0], box, crowd=False))
        if i < crowd_images and not empty:
            # a crowd region: a cluster of small same-class objects annotated as one box
            label = int(rng.integers(len(categories)))
            cw, ch = w // 3, h // 3
            cx0, cy0 = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            for _ in range(6):
                s = max(6, min(cw, ch) // 5)
                px = cx0 + int(rng.integers(0, cw - s))
                py = cy0 + int(rng.integers(0, ch - s))
                _draw(img, label, (px, py, px + s, py + s))
            anns.append(_ann(len(anns) + 1, img_id, categories[label][0],
                             (cx0, cy0, cx0 + cw, cy0 + ch), crowd=True))
        name = f"{img_id:012d}.jpg"
        cv2.imwrite(str(img_dir / name), img, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        images.append({"id": img_id, "file_name": name, "width": w, "height": h})
    ann_file = out_dir / "annotations" / f"instances_{split}.json"
    ann_file.write_text(json.dumps({
        "info": {"description": f"ssd_pipeline synthetic set, seed {seed}"},
        "images": images, "annotations": anns,
        "categories": [{"id": cid, "name": name, "supercategory": "synthetic"}
                       for cid, name in categories],
    }))
    return ann_file


def _ann(ann_id: int, img_id: int, cat_id: int, box: tuple[int, int, int, int],
         crowd: bool) -> dict[str, Any]:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    return {"id": ann_id, "image_id": img_id, "category_id": cat_id,
            "bbox": [float(x1), float(y1), float(w), float(h)], "area": float(w * h),
            "iscrowd": int(crowd),
            "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]}
