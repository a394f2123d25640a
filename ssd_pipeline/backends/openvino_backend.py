"""OpenVINO CPU runtime on the simplified ONNX: what many users pick for x86 CPUs, a second
speed peer beside ONNX Runtime (latency hint, explicit thread count, fp32 inference
precision so that it is compared like for like)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..core.cache import file_sha256
from ..core.host import default_threads, local_processes
from ..core.onnxfile import check_external_data
from .base import Backend, Runner, check_batch

if TYPE_CHECKING:
    from ..artifacts.chain import ModelArtifacts


class OpenVinoRunner(Runner):
    def __init__(self, path: str, threads: int, precision: str) -> None:
        import openvino as ov

        check_external_data(path)
        core = ov.Core()
        model = core.read_model(path)
        # fp32 unless asked: OpenVINO would otherwise run bf16 on CPUs that have it
        hint = "f32" if precision == "fp32" else "bf16"
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": hint}
        if local_processes() > 1:
            # several processes on this host (torchrun): OpenVINO pins each one's threads from
            # core 0 up, so they all share the same cores (measured, SSD300 bs 8, 2 cores:
            # 2 x 1 thread 1.16 img/s pinned, 2.22 unpinned; 1 x 2 threads 2.20)
            config["ENABLE_CPU_PINNING"] = False
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        names = [o.get_any_name() for o in self.compiled.outputs]
        super().__init__("openvino", precision, threads, names,
                         {"device": "cpu", "openvino": ov.__version__,
                          "model_sha256": file_sha256(path)})

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        result = self.request.infer({0: check_batch(batch)})
        return [np.asarray(result[o], dtype=np.float32) for o in self.compiled.outputs]


class OpenVinoBackend(Backend):
    name = "openvino"

    precisions = ("fp32", "bf16")

    def prepare(self, artifacts: ModelArtifacts, *, precision: str = "fp32",
                threads: int | None = None, batch_size: int | None = None) -> Runner:
        self.check_precision(precision)
        return OpenVinoRunner(str(artifacts.simplified_onnx_path), threads or default_threads(),
                              precision)
