"""COCO-format dataset, mmdet-identical preprocessing, and batching as the original does it.

Preprocessing reproduces SSD300's test pipeline + ``DetDataPreprocessor`` with the same
library calls mmdet makes (``mmcv.imfrombytes`` with cv2, ``mmcv.imresize`` bilinear without
keeping the ratio, BGR->RGB, minus mean, divided by std); ``tests/test_preprocess.py`` proves
it equal to mmdet's own ``Compose(test_pipeline)`` + ``DetDataPreprocessor``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .core.errors import UserError

# The 80 COCO category ids in label order (COCO's ids are not contiguous): used when images
# come without an annotation file.
COCO80_CATEGORY_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
]


def preprocess_settings(cfg: Any) -> dict[str, Any]:
    """Mean/std/channel order and input size of an mmdet config: what the graph expects (the
    export records them with it)."""
    dp = cfg.model.data_preprocessor
    return {
        "mean": [float(v) for v in dp.mean],
        "std": [float(v) for v in dp.std],
        "bgr_to_rgb": bool(dp.get("bgr_to_rgb", False)),
        "input_size": int(cfg.get("input_size", 300)),
    }


@dataclass(frozen=True)
class PreprocessSettings:
    """What the graph expects: from the config's data_preprocessor (and ONNX provenance)."""

    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bgr_to_rgb: bool = True
    input_size: int = 300

    @classmethod
    def from_config(cls, cfg: Any) -> PreprocessSettings:
        s = preprocess_settings(cfg)
        return cls(tuple(s["mean"]), tuple(s["std"]), s["bgr_to_rgb"], s["input_size"])


@dataclass(frozen=True)
class ImageMeta:
    """mmdet's img_meta keys that post-processing needs; shapes are (h, w)."""

    img_id: int
    ori_shape: tuple[int, int]
    img_shape: tuple[int, int]
    scale_factor: tuple[float, float]  # (w_scale, h_scale), as mmdet's Resize records it

    def as_mmdet(self) -> dict[str, Any]:
        return {"img_id": self.img_id, "ori_shape": self.ori_shape,
                "img_shape": self.img_shape, "scale_factor": self.scale_factor}


@dataclass(frozen=True)
class ImageRecord:
    img_id: int
    path: Path
    width: int
    height: int


def load_image(path: str | Path) -> np.ndarray:
    """BGR uint8 HxWx3, decoded exactly as mmdet's LoadImageFromFile (cv2 backend)."""
    import mmcv

    path = Path(path)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except OSError as e:
        raise UserError(f"image {path} cannot be read: {e.strerror}") from None
    if content[:2] == b"\xff\xd8" and content.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        # libjpeg decodes a truncated JPEG with a grey bottom and only a warning: a
        # conformance run must not score a damaged image silently.
        raise UserError(f"image {path} is a truncated JPEG (no end-of-image marker): "
                        "copy the dataset again")
    img = mmcv.imfrombytes(content, flag="color", backend="cv2") if content else None
    if img is None:
        raise UserError(f"image {path} is not a decodable image (corrupt or empty file)")
    return img


def preprocess(img: np.ndarray, settings: PreprocessSettings, img_id: int = 0
               ) -> tuple[np.ndarray, ImageMeta]:
    """One BGR image -> (3 x S x S float32, its meta)."""
    import mmcv

    h, w = img.shape[:2]
    s = settings.input_size
    resized = mmcv.imresize(img, (s, s), interpolation="bilinear", backend="cv2")
    # Straight into CHW, a channel at a time: the float32 subtraction and division that
    # (x[..., ::-1].astype(float32) - mean) / std does, without its reversed-stride copy and
    # transpose (2.3 -> 0.4 ms per image: a sixth of the end-to-end data path at int8 speed)
    out = np.empty((3, s, s), np.float32)
    for c, src in enumerate((2, 1, 0) if settings.bgr_to_rgb else (0, 1, 2)):
        np.subtract(resized[:, :, src], np.float32(settings.mean[c]), out=out[c],
                    dtype=np.float32)
        if settings.std[c] != 1.0:  # x / 1 is x
            np.divide(out[c], np.float32(settings.std[c]), out=out[c])
    return out, ImageMeta(img_id, (h, w), (s, s), (s / w, s / h))


def find_layout(root: Path, split: str = "val2017") -> tuple[Path, Path]:
    """(annotation file, image directory) for the original's or the standard COCO layout."""
    ann = root / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        raise UserError(f"no annotation file {ann}: expected DATASETS_DIR with "
                        f"annotations/instances_{split}.json and images/{split}/ (or {split}/)")
    for img_dir in (root / "images" / split, root / split):
        if img_dir.is_dir():
            return ann, img_dir
    raise UserError(f"no image directory under {root}: expected images/{split}/ or {split}/")


def resolve_datasets_dir(value: str | os.PathLike[str] | None) -> Path:
    """``--datasets-dir`` or ``$DATASETS_DIR``, checked to exist."""
    raw = value if value is not None else os.environ.get("DATASETS_DIR")
    if not raw:
        raise UserError("DATASETS_DIR is not set: export DATASETS_DIR=/path/to/coco "
                        "or pass --datasets-dir")
    root = Path(raw).expanduser()
    if not root.is_dir():
        raise UserError(f"DATASETS_DIR {root} does not exist or is not a directory")
    return root


class CocoDetectionSet:
    """Images and categories of a COCO-format annotation file, in the file's image order.

    Labels map to category ids in ascending id order: for COCO this is mmdet's CocoDataset
    mapping (its class list is in id order).
    """

    def __init__(self, ann_file: str | Path, img_dir: str | Path,
                 max_images: int | None = None) -> None:
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        try:
            data = json.loads(self.ann_file.read_text())
        except FileNotFoundError:
            raise UserError(f"annotation file not found: {self.ann_file}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"annotation file {self.ann_file} is not valid JSON "
                            f"(line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise UserError(f"annotation file {self.ann_file} has no 'images' list: "
                            "is it a COCO instances file?")
        if not data["images"]:
            raise UserError(f"annotation file {self.ann_file} lists no images")
        cats = data.get("categories") or []
        if not cats:
            raise UserError(f"annotation file {self.ann_file} lists no categories")
        try:
            self.cat_ids = sorted(int(c["id"]) for c in cats)
            self.cat_names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
            images = [ImageRecord(int(im["id"]), self._inside(str(im["file_name"])),
                                  int(im["width"]), int(im["height"])) for im in data["images"]]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"annotation file {self.ann_file}: malformed image or category "
                            f"entry ({type(e).__name__}: {e})") from None
        if max_images is not None:
            if max_images <= 0:
                raise UserError(f"--max-images must be positive, got {max_images}")
            images = images[:max_images]
        self.images = images

    def _inside(self, file_name: str) -> Path:
        """The image path for ``file_name``, refused when it leaves the images directory
        (an absolute path or a '..' that climbs out): an annotation file is data, and data
        does not choose which files the suite reads. Checked on the names, not by resolving
        links: the root and the images in it may be symlinks, as COCO set-ups often are."""
        norm = os.path.normpath(file_name)
        if os.path.isabs(file_name) or norm == ".." or norm.startswith(".." + os.sep):
            raise UserError(f"annotation file {self.ann_file}: image file_name {file_name!r} "
                            f"points outside the images directory {self.img_dir}: file names "
                            "must be relative to it (e.g. 000000000139.jpg)")
        return self.img_dir / norm

    @classmethod
    def from_root(cls, root: str | os.PathLike[str] | None, split: str = "val2017",
                  max_images: int | None = None) -> CocoDetectionSet:
        ann, img_dir = find_layout(resolve_datasets_dir(root), split)
        return cls(ann, img_dir, max_images)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def img_ids(self) -> list[int]:
        return [r.img_id for r in self.images]


@dataclass
class Batch:
    """A fixed-size batch; the last one is padded (repeating its last image) and
    ``n_valid`` says how many rows are real, as the original pads and slices back."""

    array: np.ndarray
    metas: list[ImageMeta]
    n_valid: int


def _load_and_preprocess(rec: ImageRecord, settings: PreprocessSettings
                         ) -> tuple[np.ndarray, ImageMeta]:
    return preprocess(load_image(rec.path), settings, rec.img_id)


def batches(records: list[ImageRecord], batch_size: int, settings: PreprocessSettings,
            workers: int | None = None, prefetch_batches: int = 2) -> Iterator[Batch]:
    """Decode and preprocess ahead in threads (cv2 releases the GIL) while the caller runs
    the engine; memory stays bounded to ``prefetch_batches`` batches in flight."""
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        it = iter(records)
        ahead = batch_size * (prefetch_batches + 1)

        def fill() -> None:
            while len(pending) < ahead:
                rec = next(it, None)
                if rec is None:
                    return
                pending.append(pool.submit(_load_and_preprocess, rec, settings))

        fill()
        while pending:
            items = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
            fill()
            n = len(items)
            arrays = [a for a, _ in items] + [items[-1][0]] * (batch_size - n)
            yield Batch(np.stack(arrays, out=aligned_empty((batch_size, *arrays[0].shape))),
                        [m for _, m in items], n)


def aligned_empty(shape: tuple[int, ...], dtype: Any = np.float32,
                  alignment: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``alignment``-byte
    boundary. numpy's own are 16-byte aligned; TVM wraps a batch without copying it only from
    64 (it copied 1 MB per image, 0.3 ms of the embedded model's 5 ms at batch 1)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass(frozen=True)
class CalibrationImages:
    """The images int8 calibration runs through the float model: never the scored ones.

    ``source`` says where they came from (a directory, or a generated split and its seed);
    ``sha256`` (names and bytes of every image) goes into the cache key and engine record, so
    an engine calibrated on other images is never served."""

    paths: tuple[Path, ...]
    source: str

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], limit: int | None = None
                 ) -> CalibrationImages:
        root = Path(path).expanduser()
        if not root.is_dir():
            raise UserError(f"--calib-images {root} does not exist or is not a directory: "
                            "pass a directory of images the model is not scored on (e.g. a "
                            "few hundred train2017 images)")
        paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise UserError(f"--calib-images {root} holds no images "
                            f"({', '.join(IMAGE_SUFFIXES)})")
        return cls(tuple(paths[:limit] if limit else paths), str(root))

    @functools.cached_property
    def sha256(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for p in self.paths:
            try:
                h.update(p.name.encode() + b"\0" + p.read_bytes())
            except OSError as e:
                raise UserError(f"calibration image {p} cannot be read: {e.strerror}"
                                ) from None
        return h.hexdigest()

    def arrays(self, settings: PreprocessSettings) -> Iterator[np.ndarray]:
        """Each image preprocessed as the scored ones are, as a batch of one."""
        for p in self.paths:
            yield preprocess(load_image(p), settings)[0][None]
