"""The artifact chain for one model: config + checkpoint -> ONNX -> simplified ONNX.

Each step is built once per content key in the :class:`~ssd_pipeline.cache.ArtifactStore`
(so pytest sessions, xdist workers and CLI runs share them) and is a pure function of its
inputs: the key holds the input file hashes, the settings and the library versions.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.cache import ArtifactStore, file_sha256
from ..core.errors import UserError
from ..core.host import int8_weight_bits, versions
from ..data import CalibrationImages, PreprocessSettings
from ..model import ModelSpec, build_model, head_outputs_module, load_config
from .calibrate import (
    CALIBRATION_FILE,
    FORMAT,
    ORT_RANGES_FILE,
    QDQ_FILE,
    quantize_qdq,
    write_calibration,
)
from .export import OPSET, export_onnx
from .simplify import simplify_onnx

if TYPE_CHECKING:
    import torch

ONNX_FILE = "model.onnx"
INFO_FILE = "info.json"


def check_detector_onnx(path: Path, cfg: Any) -> Path:
    """``path`` if it is an ONNX graph of this config's detector: one image input
    [N, 3, S, S] and two raw outputs (class scores, box deltas) per feature level."""
    from ..core.onnxfile import load_onnx

    if not path.is_file():
        raise UserError(f"--onnx {path} does not exist or is not a file")
    model = load_onnx(path)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    size = int(cfg.get("input_size", 300))
    levels = len(cfg.model.bbox_head.anchor_generator.strides)
    dims = [d.dim_value or d.dim_param for d in inputs[0].type.tensor_type.shape.dim] \
        if len(inputs) == 1 else []
    if len(dims) != 4 or dims[1:] != [3, size, size]:
        raise UserError(f"--onnx {path}: input {[i.name for i in inputs]} of shape {dims} does "
                        f"not fit this model (one input [N, 3, {size}, {size}]): pass the ONNX "
                        "exported from the --model/--cfg you give")
    if len(model.graph.output) != 2 * levels:
        raise UserError(f"--onnx {path}: {len(model.graph.output)} outputs, this model has "
                        f"{2 * levels} raw head outputs (scores and boxes for {levels} levels, "
                        "no NMS): export it with 'ssd-pipeline export'")
    # channels per output: anchors x (classes + background) and anchors x 4 per level (SSD's
    # anchor generator: 2 + 2 x len(ratios) anchors)
    head = cfg.model.bbox_head
    anchors = [2 + 2 * len(r) for r in head.anchor_generator.ratios]
    want = sorted([a * (head.num_classes + 1) for a in anchors] + [a * 4 for a in anchors])
    got = sorted(o.type.tensor_type.shape.dim[1].dim_value for o in model.graph.output)
    if got != want:
        raise UserError(f"--onnx {path}: output channels {got} do not fit this model's heads "
                        f"{want} ({head.num_classes} classes): pass the ONNX exported from the "
                        "--model/--cfg you give")
    return path


class ModelArtifacts:
    """Lazily built, cached artifacts of one :class:`ModelSpec`: the detector, its ONNX and the
    simplified ONNX. Backends prepare from these; engines are built from the simplified ONNX."""

    def __init__(self, spec: ModelSpec, store: ArtifactStore, simplify_rel_err_max: float,
                 opset: int = OPSET, calibration: CalibrationImages | None = None,
                 calibration_method: str = "minmax") -> None:
        self.spec = spec
        self.store = store
        self.simplify_rel_err_max = simplify_rel_err_max
        self.opset = opset
        self.calibration = calibration  # int8: images never scored; None: int8 unavailable
        self.calibration_method = calibration_method
        self.user_onnx: Path | None = None  # set by use_onnx: the user's graph, not an export

    def use_onnx(self, path: str | Path) -> None:
        """Run every ONNX consumer (ONNX Runtime, OpenVINO, TVM, calibration) on the user's
        ONNX (e.g. the original's ``onnxsim ssd.onnx ssd_opt.onnx`` output), refusing one that
        does not fit this model's input and heads."""
        self.user_onnx = check_detector_onnx(Path(path), load_config(self.spec.config))

    @functools.cached_property
    def torch_model(self) -> torch.nn.Module:
        """The mmdet detector (eval mode, CPU)."""
        return build_model(self.spec)

    @functools.cached_property
    def torch_head_outputs(self) -> torch.nn.Module:
        """Module: batch -> 12 raw head outputs (what the ONNX graph computes)."""
        return head_outputs_module(self.torch_model)

    def _onnx_inputs(self) -> dict[str, Any]:
        return {"model": self.spec.describe() | {"checkpoint": None}, "opset": self.opset,
                "seed": self.spec.seed,
                "versions": versions("torch", "mmdet", "mmcv", "mmengine", "onnx")}

    @functools.cached_property
    def onnx_dir(self) -> Path:
        def build(tmp: Path) -> None:
            info = export_onnx(self.spec, tmp / ONNX_FILE, self.opset)
            (tmp / INFO_FILE).write_text(json.dumps(info | {"path": None}))

        return self.store.get_or_build("onnx", self._onnx_inputs(), build)

    @property
    def onnx_path(self) -> Path:
        """The exported, unsimplified ONNX file."""
        return self.onnx_dir / ONNX_FILE

    @functools.cached_property
    def simplified_dir(self) -> Path:
        src = self.onnx_path
        inputs = {"onnx_sha256": file_sha256(src), "rel_err_max": self.simplify_rel_err_max,
                  "versions": versions("onnxsim", "onnx", "onnxruntime")}

        def build(tmp: Path) -> None:
            info = simplify_onnx(src, tmp / ONNX_FILE, self.simplify_rel_err_max)
            (tmp / INFO_FILE).write_text(json.dumps(info))

        return self.store.get_or_build("onnx-simplified", inputs, build)

    @property
    def simplified_onnx_path(self) -> Path:
        """The onnxsim-simplified ONNX file: what ONNX Runtime and TVM consume (the user's,
        after :meth:`use_onnx`)."""
        return self.user_onnx or self.simplified_dir / ONNX_FILE

    def build_info(self) -> dict[str, Any]:
        """Export and simplification records (times, sizes, node counts)."""
        return {
            "export": json.loads((self.onnx_dir / INFO_FILE).read_text()),
            "simplify": json.loads((self.simplified_dir / INFO_FILE).read_text()),
        }

    def _calibration_images(self) -> CalibrationImages:
        if self.calibration is None:
            raise UserError("int8 needs calibration images the model is not scored on: pass "
                            "--calib-images DIR (e.g. a few hundred COCO train2017 images)")
        return self.calibration

    def _calibration_inputs(self, method: str) -> dict[str, Any]:
        images = self._calibration_images()
        return {"onnx_sha256": file_sha256(self.simplified_onnx_path), "method": method,
                "images_sha256": images.sha256, "num_images": len(images.paths),
                "weight_bits": int8_weight_bits(), "versions": versions("onnxruntime"),
                "format": FORMAT}

    def _calibration_batches(self) -> Any:
        settings = PreprocessSettings.from_config(load_config(self.spec.config))
        return self._calibration_images().arrays(settings)

    def calibration_path(self, method: str | None = None) -> Path:
        """Our engine's int8 calibration record (activation ranges by convolution)."""
        method = method or self.calibration_method
        images = self._calibration_images()

        def build(tmp: Path) -> None:
            write_calibration(self.simplified_onnx_path, self._calibration_batches(), method,
                              tmp, {"images_sha256": images.sha256,
                                    "images_source": images.source})

        return self.store.get_or_build("calibration", self._calibration_inputs(method),
                                       build) / CALIBRATION_FILE

    def qdq_onnx_path(self, method: str | None = None) -> Path:
        """ONNX Runtime's QDQ int8 model from the same images and method: what the int8
        peers (ONNX Runtime, OpenVINO) run."""
        method = method or self.calibration_method
        ranges = self.calibration_path(method).with_name(ORT_RANGES_FILE)

        def build(tmp: Path) -> None:
            info = quantize_qdq(self.simplified_onnx_path, ranges, method, tmp / QDQ_FILE)
            (tmp / INFO_FILE).write_text(json.dumps(info))

        return self.store.get_or_build("onnx-qdq", self._calibration_inputs(method),
                                       build) / QDQ_FILE
