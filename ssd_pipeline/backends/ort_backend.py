"""ONNX Runtime (CPU execution provider) on the simplified ONNX: the speed peer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..core.cache import file_sha256
from ..core.host import default_threads
from ..core.onnxfile import check_external_data
from .base import Backend, Runner, check_batch

if TYPE_CHECKING:
    from ..artifacts.chain import ModelArtifacts


class OrtRunner(Runner):
    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime as ort

        check_external_data(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        super().__init__("onnxruntime", "fp32", threads, names,
                         {"device": "cpu", "onnxruntime": ort.__version__,
                          "model_sha256": file_sha256(path)})

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: check_batch(batch)})


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    precisions = ("fp32",)

    def prepare(self, artifacts: ModelArtifacts, *, precision: str = "fp32",
                threads: int | None = None, batch_size: int | None = None) -> Runner:
        self.check_precision(precision)
        return OrtRunner(str(artifacts.simplified_onnx_path), threads or default_threads())
