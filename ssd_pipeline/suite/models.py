"""The models the suite knows: SSD300 (the subject: needs the user's checkpoint and COCO) and
the embedded default (a small SSD trained here, with its synthetic data: runs anywhere).

Each entry says where its config, weights and evaluation data come from and which
expectations table gates it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifacts.chain import ModelArtifacts
from ..backends import Runner, get_backend
from ..core.cache import ArtifactStore, file_sha256
from ..core.errors import UserError
from ..core.expectations import Expectations
from ..core.host import default_threads, int8_weight_bits
from ..data import CalibrationImages, CocoDetectionSet, PreprocessSettings
from ..model import CONFIG_DIR, ModelSpec, load_config
from ..postprocess import Postprocessor
from ..synthetic import DEFAULT_CATEGORIES, make_coco_set

if TYPE_CHECKING:
    from mmengine.config import Config

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
TINY_CHECKPOINT = FIXTURES / "models" / "ssd_tiny_synthetic.pth"
# The embedded val split: regenerated bit-identically from this seed (ssd_pipeline.synthetic).
TINY_VAL = {"split": "val", "num_images": 200, "seed": 4321, "crowd_images": 8,
            "empty_images": 6}
# int8 calibration images of the embedded model: generated like the val split from another
# seed, so calibration never sees a scored image (issue #10)
TINY_CALIB = {"split": "calib", "num_images": 64, "seed": 97, "crowd_images": 0,
              "empty_images": 0}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config: Path
    expectations_key: str  # its accuracy floors
    embedded: bool  # ships its weights and makes its data
    perf_key: str  # its speed floors (ratios to ONNX Runtime fp32)

    def spec(self, weight: str | os.PathLike[str] | None = None,
             cfg: str | os.PathLike[str] | None = None, trust_checkpoint: bool = False
             ) -> ModelSpec:
        """Its config and weights, with the user's --cfg/--weight in their place."""
        default = TINY_CHECKPOINT if self.embedded else None
        return ModelSpec(Path(cfg) if cfg else self.config,
                         Path(weight) if weight else default, trust_checkpoint=trust_checkpoint)

    def dataset(self, cache_root: Path, datasets_dir: str | None = None,
                max_images: int | None = None) -> CocoDetectionSet:
        """Its evaluation set: ``datasets_dir`` (COCO layout) when given; else the generated
        one for the embedded model, ``$DATASETS_DIR`` for the others."""
        if self.embedded and datasets_dir is None:
            return embedded_val_set(cache_root, max_images)
        return CocoDetectionSet.from_root(datasets_dir, max_images=max_images)


MODELS: dict[str, ModelEntry] = {
    "ssd300": ModelEntry("ssd300", CONFIG_DIR / "ssd300_coco.py", "accuracy.ssd300_coco", False,
                         "perf.cpu"),
    "tiny": ModelEntry("tiny", CONFIG_DIR / "ssd_tiny_synthetic.py",
                       "accuracy.ssd_tiny_synthetic", True, "perf.cpu_tiny"),
}


def get_model(name: str) -> ModelEntry:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def _generated_split(cache_root: Path, split: dict[str, Any]) -> Path:
    """Generate a split once under the cache (atomic via the store); its root directory."""
    return ArtifactStore(cache_root).get_or_build(
        "embedded-data", {"generator": split, "source": _generator_hash()},
        lambda tmp: make_coco_set(tmp, split["split"], split["num_images"], split["seed"],
                                  crowd_images=split["crowd_images"],
                                  empty_images=split["empty_images"]))


def embedded_val_set(cache_root: Path, max_images: int | None = None,
                     split: dict[str, Any] | None = None) -> CocoDetectionSet:
    """The embedded val split (or another generated ``split``)."""
    split = split or TINY_VAL
    d = _generated_split(cache_root, split)
    name = split["split"]
    return CocoDetectionSet(d / "annotations" / f"instances_{name}.json",
                            d / "images" / name, max_images)


def embedded_calibration(cache_root: Path) -> CalibrationImages:
    d = _generated_split(cache_root, TINY_CALIB)
    images = CalibrationImages.from_dir(d / "images" / TINY_CALIB["split"])
    return CalibrationImages(images.paths, f"generated split, seed {TINY_CALIB['seed']}")


def _generator_hash() -> str:
    return file_sha256(Path(__file__).resolve().parents[1] / "synthetic.py")


def calibration_method(expectations: Expectations) -> str:
    """The int8 calibration method for this CPU's weights (``int8_weight_bits``): the best
    method differs between 8-bit weights (VNNI: ``int8.calibration_method_vnni``) and the 7
    bits AVX2 leaves (``int8.calibration_method``)."""
    key = "int8.calibration_method_vnni" if int8_weight_bits() == 8 else "int8.calibration_method"
    return str(expectations.get(key))


class ModelBundle:
    """One model's artifacts, config, preprocessing and prepared runners (built lazily, once)."""

    def __init__(self, entry: ModelEntry, spec: ModelSpec, store: ArtifactStore,
                 expectations: Expectations, threads: int | None = None,
                 calib_images: str | os.PathLike[str] | None = None) -> None:
        self.entry, self.spec, self.threads = entry, spec, threads
        self.expectations = expectations
        self.artifacts = ModelArtifacts(
            spec, store, expectations.number("simplify.rel_err_max"),
            calibration=self._calibration(calib_images, store),
            calibration_method=calibration_method(expectations))
        self._runners: dict[tuple[str, str], Runner] = {}

    def _calibration(self, calib_images: str | os.PathLike[str] | None, store: ArtifactStore
                     ) -> CalibrationImages | None:
        """The user's ``--calib-images``; else the embedded model's generated calibration
        split, which also serves a random-init model (its scores mean nothing, only its
        speed does); else None (int8 unavailable, saying why)."""
        if calib_images is not None:
            limit = int(self.expectations.number("int8.calibration_images_max"))
            return CalibrationImages.from_dir(calib_images, limit)
        if self.entry.embedded or self.spec.checkpoint is None:
            return embedded_calibration(store.root)
        return None

    @functools.cached_property
    def cfg(self) -> Config:
        return load_config(self.spec.config)

    @functools.cached_property
    def settings(self) -> PreprocessSettings:
        return PreprocessSettings.from_config(self.cfg)

    def dataset(self, datasets_dir: str | None = None, max_images: int | None = None
                ) -> CocoDetectionSet:
        return self.entry.dataset(self.artifacts.store.root, datasets_dir, max_images)

    def timing_images(self, datasets_dir: str | None, count: int
                      ) -> tuple[CocoDetectionSet, str]:
        """Images to time on, and where they came from: the user's (``datasets_dir`` or
        ``$DATASETS_DIR``) when there are any, else the embedded generated split, as the perf
        tests do (engine-only time does not depend on what the pixels show)."""
        if datasets_dir is None and not os.environ.get("DATASETS_DIR"):
            why = "" if self.entry.embedded else " (no --datasets-dir or DATASETS_DIR)"
            return (embedded_val_set(self.artifacts.store.root, count),
                    f"generated images of the embedded split{why}")
        dataset = self.dataset(datasets_dir, count)
        return dataset, str(dataset.img_dir)

    def runner(self, backend: str, precision: str = "fp32") -> Runner:
        if (backend, precision) not in self._runners:
            self._runners[backend, precision] = get_backend(backend).prepare(
                self.artifacts, precision=precision, threads=self.threads)
        return self._runners[backend, precision]

    def use_engine(self, engine_dir: str | os.PathLike[str]) -> Runner:
        """Serve ``runner("tvm", <its precision>)`` from a prebuilt engine directory."""
        from ..backends.tvm_backend import TvmBackend

        runner = TvmBackend().from_engine_dir(engine_dir, self.artifacts, self.threads)
        self._runners["tvm", runner.precision] = runner
        return runner

    def postprocessor(self, cat_ids: list[int] | None = None) -> Postprocessor:
        if cat_ids is None and self.entry.embedded:
            cat_ids = sorted(c for c, _ in DEFAULT_CATEGORIES)
        # as many decoding threads as the backends have: the engine is idle meanwhile
        return Postprocessor(self.cfg, cat_ids, workers=self.threads or default_threads(),
                             store=self.artifacts.store)


def resolve_bundle(model: str, expectations: Expectations, store: ArtifactStore, *,
                   weight: str | os.PathLike[str] | None = None,
                   cfg: str | os.PathLike[str] | None = None, trust_checkpoint: bool = False,
                   threads: int | None = None,
                   calib_images: str | os.PathLike[str] | None = None) -> ModelBundle:
    """The one way the CLI and the test suite turn options into a model: ``model``'s entry,
    the user's config and weights in place of its own, artifacts in ``store``."""
    entry = get_model(model)
    spec = entry.spec(weight, cfg, trust_checkpoint)
    return ModelBundle(entry, spec, store, expectations, threads, calib_images)
