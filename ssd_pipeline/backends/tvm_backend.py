"""Apache TVM (Relax) engine: our counterpart of Iluvatar's IGIE (see
:mod:`ssd_pipeline.engine.compile`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import UserError
from ..core.host import default_threads
from .base import Backend, Runner, check_batch

if TYPE_CHECKING:
    from ..artifacts.chain import ModelArtifacts
    from ..engine.compile import Engine, EngineSpec


class TvmRunner(Runner):
    def __init__(self, engine: Engine, spec: EngineSpec, threads: int, names: list[str]
                 ) -> None:
        import tvm

        super().__init__("tvm", spec.precision, threads, names, {
            "device": spec.target, "target": engine.record["spec"]["tvm_target"],
            "offload": spec.offload, "engine_batch": spec.batch or "dynamic",
            "engine": str(engine.path), "tvm": tvm.__version__,
            "compile_s": engine.record["compile_s"]})
        self.engine = engine
        self.spec = spec
        self._fn = engine.vm["main"]
        self._set_threads()

    def _set_threads(self) -> None:
        # Not runtime.config_threadpool: it pins the calling thread to one core, and the
        # oneDNN (OpenMP) threads started from it inherit that mask (measured: 2.5x slower).
        # TVM's own pool reads TVM_NUM_THREADS when it starts (prepare sets it).
        if self.engine.shim is not None:
            self.engine.shim.set_num_threads(self.threads)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        import tvm

        batch = check_batch(batch, (300, 300))
        if self.spec.batch is not None and batch.shape[0] != self.spec.batch:
            raise UserError(f"this TVM engine was built for batch {self.spec.batch}, got "
                            f"{batch.shape[0]}: rebuild with that batch or a dynamic one")
        outs = self._fn(tvm.runtime.tensor(batch))
        return [o.numpy() for o in outs]


class TvmBackend(Backend):
    name = "tvm"

    precisions = ("fp32", "bf16")

    def prepare(self, artifacts: ModelArtifacts, *, precision: str = "fp32",
                threads: int | None = None, batch_size: int | None = None) -> Runner:
        import os

        from ..engine.compile import EngineSpec, cached_engine

        self.check_precision(precision)
        threads = threads or default_threads()
        os.environ.setdefault("TVM_NUM_THREADS", str(threads))
        spec = EngineSpec(target="cpu", precision=precision, batch=None)
        engine = cached_engine(artifacts.store, artifacts.simplified_onnx_path, spec)
        return TvmRunner(engine, spec, threads,
                         list(engine.record["outputs"]))
