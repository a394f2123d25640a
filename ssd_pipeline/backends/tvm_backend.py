"""Apache TVM (Relax) engine: our counterpart of Iluvatar's IGIE (see
:mod:`ssd_pipeline.engine.compile`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import UserError
from ..core.host import default_threads
from ..core.timing import conv_gop
from .base import Backend, OpTime, Runner, check_batch

if TYPE_CHECKING:
    from ..artifacts.chain import ModelArtifacts
    from ..engine.compile import Engine, EngineSpec

# the shim's winograd_products_ran(): what ran a timed Winograd call's products
PRODUCTS_BY = {1: "matmul", 2: "grouped_conv"}


def winograd_tile_of(ints: list[int]) -> int | None:
    """The Winograd output tile (2 or 4) a shim call asks for with its integer arguments
    (strides 2, padding 4, dilation 2, relu, and for float calls compute); None: direct."""
    from ..engine.compile import WINOGRAD_TILE

    return WINOGRAD_TILE.get(ints[9]) if len(ints) > 9 else None


def conv_label(weight_ohwi: tuple[int, ...], ints: list[int]) -> str:
    """``oneDNN conv 3x3 s1 d6 512->1024 +relu`` from the shim call's weight shape and its
    integer arguments; ``Winograd F(2x2) conv ...`` for the shim's Winograd path (its products on
    oneDNN's matmul)."""
    from ..engine.compile import RELU_POOL

    co, kh, kw, ci = weight_ohwi
    stride, dilation, relu = ints[0], ints[6], ints[8]
    tile = winograd_tile_of(ints)
    how = f"Winograd F({tile}x{tile})" if tile else "oneDNN"
    return (f"{how} conv {kh}x{kw} s{stride}" + (f" d{dilation}" if dilation > 1 else "")
            + f" {ci}->{co}" + (" +relu" if relu else "")
            + (" +maxpool 2x2 s2" if relu == RELU_POOL else ""))


class TvmRunner(Runner):
    def __init__(self, engine: Engine, spec: EngineSpec, threads: int, names: list[str]
                 ) -> None:
        import tvm

        super().__init__("tvm", spec.precision, threads, names, {
            "device": spec.target, "target": engine.record["spec"]["tvm_target"],
            "offload": spec.offload, "engine_batch": spec.batch or "dynamic",
            "engine": str(engine.path), "tvm": tvm.__version__,
            "compile_s": engine.record["compile_s"],
            **({"int8_weight_bits": q["weight_bits"],
                "calibration_method": q["method"],
                "calibration_images": q["num_images"],
                # what an int8 engine runs in float32: read against the float32 ceiling
                "float32_convolutions": q["float_gop"]["convolutions"],
                "float32_direct_gop_per_image": q["float_gop"]["direct_gop_per_image"],
                "float32_executed_gop_per_image": q["float_gop"]["executed_gop_per_image"]}
               if (q := engine.record.get("quantization")) else {}),
            # Winograd does fewer multiplies than the model's direct convolutions: perf records
            # read the engine's GOP/s against the peak by what it executes
            **({"winograd_convolutions": wino["convolutions"],
                "winograd_f4x4_convolutions": wino.get("f4x4_convolutions", 0),
                "conv_gop_saved_per_image": round(
                    wino["direct_gop_per_image"] - wino["executed_gop_per_image"], 4)}
               if (wino := engine.record.get("winograd")) else {})})
        self.engine = engine
        self.spec = spec
        self._fn = engine.vm["main"]
        # heads the engine returns channels-last (its convolutions' layout) are handed out as
        # NCHW views, the ONNX graph's layout, without a copy
        self._nhwc = [lay == "NHWC" for lay in engine.record.get("output_layouts", [])]
        # heads merged into one convolution (compile.merge_heads) come back as channel slices
        # of its output: (output, first channel, end channel) per ONNX output
        self._slices = engine.record.get("output_slices")
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
        if self.spec.target == "cuda":  # to the GPU and back: a copy each way
            outs = [o.numpy() for o in self._fn(tvm.runtime.tensor(batch, self.engine.device))]
        else:
            # the batch itself where TVM can take it (64-byte aligned, as the suite's batches
            # are: data.aligned_empty), else a copy
            wrap = (tvm.runtime.from_dlpack
                    if batch.ctypes.data % 64 == 0 and batch.flags.writeable
                    else tvm.runtime.tensor)
            outs = [np.from_dlpack(o) for o in self._fn(wrap(batch))]
        # views, not copies: each output is a fresh VM allocation the view keeps alive;
        # ``.numpy()`` copied the 12 heads for 0.27 ms per call (5% of the embedded model at bs 1)
        outs = [o.transpose(0, 3, 1, 2) if nhwc else o
                for o, nhwc in zip(outs, self._nhwc or [False] * len(outs), strict=True)]
        return [outs[i][:, a:b] for i, a, b in self._slices] if self._slices else outs

    def profile(self, batch: np.ndarray, rounds: int) -> list[OpTime]:
        """Per call of the Relax VM (its instrument hook, called around every Call
        instruction): generated kernels, oneDNN convolutions, and the VM's own builtins
        (allocation, shape bookkeeping) folded into one row. The shim's Winograd calls also
        time their input transform, products and output transform (``OpTime.phases_ms``)."""
        import statistics
        import time

        from ..engine.compile import winograd_gop, winograd_out_hw
        from ..engine.kernels import (
            CONV2D_NHWC,
            CONV2D_NHWC_ADD,
            CONV2D_NHWC_INT8,
            CONV2D_NHWC_INT8_ADD,
        )

        int8 = (CONV2D_NHWC_INT8, CONV2D_NHWC_INT8_ADD)

        self.run(batch)  # warm: oneDNN creates its primitives on the first call
        runs: list[list[tuple[str, float, list[tuple[int, ...]], list[int], list[float]]]] = []
        started: list[float] = []
        shim = self.engine.shim  # its Winograd calls time their phases while profiled
        float_conv = (CONV2D_NHWC, CONV2D_NHWC_ADD)

        def instrument(func: object, symbol: str, before: bool, ret: object, *args: object
                       ) -> int:
            now = time.perf_counter()
            if before:
                started.append(now)
            else:
                took = now - started.pop()
                if len(runs) == 1:  # shapes once: the hook's own cost lands in the timings
                    shapes = [tuple(int(d) for d in a.shape) for a in args
                              if hasattr(a, "shape")]
                    ints = [int(a) for a in args if isinstance(a, int)]
                else:
                    shapes, ints = [], []
                # read after `took`: the shim's three calls are not in the timings
                phases = ([shim.winograd_phase(k) for k in range(3)]
                          + [shim.winograd_products_ran()]
                          if shim is not None and str(symbol) in float_conv else [])
                runs[-1].append((str(symbol), took, shapes, ints, phases))
            return 0  # VMInstrumentReturnKind.NO_OP: go on as usual

        self.engine.vm.set_instrument(instrument)
        if shim is not None:
            shim.winograd_timing(1)
        try:
            for _ in range(rounds):
                runs.append([])
                self.run(batch)
        finally:
            self.engine.vm.set_instrument(None)
            if shim is not None:
                shim.winograd_timing(0)
        builtin = [sum(c[1] for c in run if c[0].startswith("vm.builtin.")) for run in runs]
        calls = [[c for c in run if not c[0].startswith("vm.builtin.")] for run in runs]
        if len({len(c) for c in calls}) != 1:
            raise RuntimeError("the VM ran a different number of calls in profiled runs")
        out = []
        for i, (symbol, _, shapes, ints, phases) in enumerate(calls[0]):
            ms = statistics.median(run[i][1] for run in calls) * 1e3
            timed = bool(phases) and phases[0] >= 0  # a Winograd call
            conv = symbol in (CONV2D_NHWC, CONV2D_NHWC_ADD, *int8)
            name = conv_label(shapes[1], ints) if conv else symbol
            if symbol in int8:
                name = name.replace("oneDNN conv", "oneDNN int8 conv")
            if symbol in (CONV2D_NHWC_ADD, CONV2D_NHWC_INT8_ADD):
                name = name.replace(" +relu", "") + " +add+relu"
            executed = None
            if conv and (tile := winograd_tile_of(ints)):
                n, h, w, _ = shapes[0]  # the output may be a fused pool's
                executed = n * winograd_gop(*winograd_out_hw(h, w, ints), shapes[1][3],
                                            shapes[1][0], tile, ints[6])
            elif conv:  # oneDNN skips the taps on padding: count what it multiplies
                n, h, w, c = shapes[0]
                o, kh, kw, _ = shapes[1]
                executed = conv_gop(n, (h, w), shapes[-1][1:3], (kh, kw), c, o, ints[0:2],
                                    ints[2:4], ints[6:8])
            out.append(OpTime(i, name, "conv" if conv else symbol.rstrip("0123456789_"),
                              ms, tuple(shapes[:-1]), shapes[-1] if shapes else None,
                              shapes[1] if conv else None, executed,
                              tuple(statistics.median(run[i][4][k] for run in calls) * 1e3
                                    for k in range(3)) if timed else None,
                              PRODUCTS_BY.get(int(phases[3])) if timed else None))
        out.append(OpTime(len(out), "vm.builtin.* (allocation, shapes)", "vm.builtin",
                          statistics.median(builtin) * 1e3))
        return out


class TvmBackend(Backend):
    name = "tvm"

    def from_engine_dir(self, engine_dir: str | Path, artifacts: ModelArtifacts,
                        threads: int | None = None) -> TvmRunner:
        """A runner on an engine directory built before (``ssd-pipeline compile --output``):
        its own record says what it was built for, and :func:`load_engine` checks that this
        TVM, CPU and shim can run it."""
        import dataclasses
        import json
        import os

        from ..engine.compile import META_FILE, EngineSpec, load_engine
        from ..engine.kernels import build_shim

        meta = Path(engine_dir) / META_FILE
        try:
            got = json.loads(meta.read_text())["spec"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--engine {engine_dir} is not an engine directory ({meta}: "
                            f"{e}); build one with 'ssd-pipeline compile --output DIR'"
                            ) from None
        names = {f.name for f in dataclasses.fields(EngineSpec)}
        spec = EngineSpec(**{k: v for k, v in got.items() if k in names})
        threads = threads or default_threads()
        os.environ.setdefault("TVM_NUM_THREADS", str(threads))
        shim = build_shim(artifacts.store) if spec.offload == "dnnl" else None
        engine = load_engine(engine_dir, spec, shim)
        return TvmRunner(engine, spec, threads, list(engine.record["outputs"]))

    precisions = ("fp32", "bf16", "int8")

    def prepare(self, artifacts: ModelArtifacts, *, precision: str = "fp32",
                threads: int | None = None, batch_size: int | None = None) -> Runner:
        import os

        from ..core.cache import file_sha256
        from ..engine.compile import EngineSpec, cached_engine

        self.check_precision(precision)
        threads = threads or default_threads()
        os.environ.setdefault("TVM_NUM_THREADS", str(threads))
        calibration = artifacts.calibration_path() if precision == "int8" else None
        spec = EngineSpec(target="cpu", precision=precision, batch=None,
                          calibration=calibration and file_sha256(calibration))
        engine = cached_engine(artifacts.store, artifacts.simplified_onnx_path, spec,
                               calibration)
        return TvmRunner(engine, spec, threads,
                         list(engine.record["outputs"]))
