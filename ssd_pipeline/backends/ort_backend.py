"""ONNX Runtime (CPU execution provider) on the simplified ONNX: the speed peer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.cache import file_sha256
from ..core.host import default_threads
from ..core.onnxfile import check_external_data
from .base import Backend, OpTime, Runner, check_batch

if TYPE_CHECKING:
    from ..artifacts.chain import ModelArtifacts


CONV_OPS = ("Conv", "FusedConv", "QLinearConv")


def session_options(threads: int, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


class OrtRunner(Runner):
    follows_isa_cap = False  # MLAS picks its kernels from the CPU itself

    def __init__(self, path: str, threads: int, precision: str = "fp32") -> None:
        import onnxruntime as ort

        check_external_data(path)
        self.path = path
        self.session = ort.InferenceSession(path, session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        super().__init__("onnxruntime", precision, threads, names,
                         {"device": "cpu", "onnxruntime": ort.__version__,
                          "model_sha256": file_sha256(path)})

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: check_batch(batch)})

    def profile(self, batch: np.ndarray, rounds: int) -> list[OpTime]:
        """ONNX Runtime's own session profiler (``enable_profiling``): kernel time per node
        of the optimized graph, on a second session with the same options."""
        import json
        import statistics
        import tempfile

        import onnxruntime as ort

        feed = {self.input_name: check_batch(batch)}
        with tempfile.TemporaryDirectory(prefix="ssd-ort-profile-") as tmp:
            session = ort.InferenceSession(self.path, session_options(self.threads, f"{tmp}/ort"),
                                           providers=["CPUExecutionProvider"])
            for _ in range(rounds + 1):
                session.run(self.output_names, feed)
            with open(session.end_profiling()) as f:
                events = json.load(f)
        nodes: dict[str, list[dict[str, Any]]] = {}
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                nodes.setdefault(e["name"].removesuffix("_kernel_time"), []).append(e)
        out = []
        for i, (name, seen) in enumerate(sorted(nodes.items(), key=lambda kv: kv[1][0]["ts"])):
            timed = seen[1:] or seen  # the first run is the warm-up
            args = seen[0]["args"]

            def shape(entry: dict[str, list[int]]) -> tuple[int, ...]:
                return tuple(int(d) for d in next(iter(entry.values())))

            ins = tuple(shape(t) for t in args.get("input_type_shape", []))
            outs = [shape(t) for t in args.get("output_type_shape", [])]
            conv = args.get("op_name") in CONV_OPS and len(ins) > 1
            out.append(OpTime(i, name, "conv" if conv else str(args.get("op_name")),
                              statistics.median(e["dur"] for e in timed) / 1e3, ins,
                              outs[0] if outs else None, ins[1] if conv else None))
        return out


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    precisions = ("fp32", "int8")  # int8: ONNX Runtime's QDQ model (quantize_static)

    def prepare(self, artifacts: ModelArtifacts, *, precision: str = "fp32",
                threads: int | None = None, batch_size: int | None = None) -> Runner:
        self.check_precision(precision)
        if precision == "int8":
            return OrtRunner(str(artifacts.qdq_onnx_path()), threads or default_threads(),
                             "int8")
        return OrtRunner(str(artifacts.simplified_onnx_path), threads or default_threads())
