"""OpenVINO CPU runtime on the simplified ONNX: what many users pick for x86 CPUs, a second
speed peer beside ONNX Runtime (latency hint, explicit thread count, fp32 inference
precision so that it is compared like for like)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.cache import file_sha256
from ..core.host import default_threads, local_processes
from ..core.onnxfile import check_external_data
from .base import Backend, OpTime, Runner, check_batch

if TYPE_CHECKING:
    from ..artifacts.chain import ModelArtifacts


class OpenVinoRunner(Runner):
    def __init__(self, path: str, threads: int, precision: str) -> None:
        import openvino as ov

        check_external_data(path)
        core = ov.Core()
        model = core.read_model(path)
        # fp32 unless asked: OpenVINO would otherwise run bf16 on CPUs that have it. int8: the
        # QDQ model, whose quantized ops OpenVINO runs in int8 (the rest stays f32)
        hint = "bf16" if precision == "bf16" else "f32"
        self.path = path
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": hint}
        if local_processes() > 1:
            # several processes on this host (torchrun): OpenVINO pins each one's threads from
            # core 0 up, so they all share the same cores (measured, SSD300 bs 8, 2 cores:
            # 2 x 1 thread 1.16 img/s pinned, 2.22 unpinned; 1 x 2 threads 2.20)
            config["ENABLE_CPU_PINNING"] = False
        self.config = config
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        names = [o.get_any_name() for o in self.compiled.outputs]
        super().__init__("openvino", precision, threads, names,
                         {"device": "cpu", "openvino": ov.__version__,
                          "model_sha256": file_sha256(path)})

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        result = self.request.infer({0: check_batch(batch)})
        return [np.asarray(result[o], dtype=np.float32) for o in self.compiled.outputs]

    def profile(self, batch: np.ndarray, rounds: int) -> list[OpTime]:
        """OpenVINO's own per-layer counters (PERF_COUNT, as ``benchmark_app -pc``) on a
        second compilation with the same settings; each name carries the kernel that ran
        (e.g. ``brgconv_avx2_f32``), shapes from the runtime graph."""
        import statistics

        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(core.read_model(self.path), "CPU",
                                      {**self.config, "PERF_COUNT": True})
        request = compiled.create_infer_request()
        feed = {0: check_batch(batch)}
        request.infer(feed)  # warm-up, not counted
        seen: dict[str, list[Any]] = {}
        for _ in range(rounds):
            request.infer(feed)
            for info in request.profiling_info:
                if info.status == info.Status.EXECUTED:
                    seen.setdefault(info.node_name, []).append(info)

        def dims(ps: Any) -> tuple[int, ...]:
            return tuple(d.get_length() for d in ps) if ps.is_static else ()

        shapes = {op.get_friendly_name(): (
            tuple(dims(op.input(i).get_partial_shape()) for i in range(op.get_input_size())),
            dims(op.get_output_partial_shape(0)) if op.get_output_size() else None)
            for op in compiled.get_runtime_model().get_ordered_ops()}
        out = []
        for i, (name, infos) in enumerate(seen.items()):
            ins, outs = shapes.get(name, ((), None))
            conv = infos[0].node_type == "Convolution" and len(ins) > 1
            ms = statistics.median(x.real_time.total_seconds() for x in infos) * 1e3
            out.append(OpTime(i, f"{name} ({infos[0].exec_type})",
                              "conv" if conv else infos[0].node_type, ms, ins, outs,
                              ins[1] if conv else None))
        return out


class OpenVinoBackend(Backend):
    name = "openvino"

    precisions = ("fp32", "bf16", "int8")

    def prepare(self, artifacts: ModelArtifacts, *, precision: str = "fp32",
                threads: int | None = None, batch_size: int | None = None) -> Runner:
        self.check_precision(precision)
        path = (artifacts.qdq_onnx_path() if precision == "int8"
                else artifacts.simplified_onnx_path)
        return OpenVinoRunner(str(path), threads or default_threads(), precision)
