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
from ..core.host import versions
from ..model import ModelSpec, build_model, head_outputs_module
from .export import OPSET, export_onnx
from .simplify import simplify_onnx

if TYPE_CHECKING:
    import torch

ONNX_FILE = "model.onnx"
INFO_FILE = "info.json"


class ModelArtifacts:
    """Lazily built, cached artifacts of one :class:`ModelSpec`: the detector, its ONNX and the
    simplified ONNX. Backends prepare from these; engines are built from the simplified ONNX."""

    def __init__(self, spec: ModelSpec, store: ArtifactStore, simplify_rel_err_max: float,
                 opset: int = OPSET) -> None:
        self.spec = spec
        self.store = store
        self.simplify_rel_err_max = simplify_rel_err_max
        self.opset = opset

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
        """The onnxsim-simplified ONNX file: what ONNX Runtime and TVM consume."""
        return self.simplified_dir / ONNX_FILE

    def build_info(self) -> dict[str, Any]:
        """Export and simplification records (times, sizes, node counts)."""
        return {
            "export": json.loads((self.onnx_dir / INFO_FILE).read_text()),
            "simplify": json.loads((self.simplified_dir / INFO_FILE).read_text()),
        }
