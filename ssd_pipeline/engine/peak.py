"""This CPU's ceilings per precision, on the engines' threads, independent of any engine.

- **peak**: a register-resident loop of the instruction each precision's convolutions are
  made of (``kernels/peak.cc``): fp32 FMA, int8 ``vpmaddubsw``+``vpmaddwd`` (AVX2, what oneDNN
  issues without VNNI) or ``vpdpbusd`` (VNNI), bf16 ``vdpbf16ps``. Nothing can exceed it.
- **achievable**: oneDNN's own matmul on a large square problem: what a library reaches once
  memory and blocking are paid for.

Every perf record reads its convolutions' GOP/s against both (``peak_fraction``,
``roofline_fraction``); this module owns every roofline-based number of the suite.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from ..core.cache import ArtifactStore
from ..core.host import cpu_flags, default_threads

# precision -> the loops that measure its peak, best instruction set first, with the CPU flags
# each needs (the first one this CPU has is used)
PEAK_KERNELS: dict[str, list[tuple[str, frozenset[str]]]] = {
    "fp32": [("fma_avx512", frozenset({"avx512f"})), ("fma_avx2", frozenset({"avx2", "fma"}))],
    "int8": [("int8_avx512_vnni", frozenset({"avx512f", "avx512_vnni"})),
             ("int8_avx_vnni", frozenset({"avx2", "avx_vnni"})),
             ("int8_avx2", frozenset({"avx2"}))],
    "bf16": [("bf16_avx512", frozenset({"avx512f", "avx512_bf16"}))],
}
MATMUL_DTYPE = {"fp32": "f32", "bf16": "bf16", "int8": "int8"}
MATMUL_N = 2048  # 17 GOP per call: compute-bound, ~0.05-0.1 s on 2 cores
PEAK_MARGIN = 0.05  # a measured GOP/s above peak x (1 + margin) is a counting error


@dataclass(frozen=True)
class Ceiling:
    precision: str
    threads: int
    peak_gops: float
    peak_kernel: str
    achievable_gops: float
    achievable_how: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def best(self, other: Ceiling) -> Ceiling:
        """The higher of two measurements of one ceiling: both are maxima, and a shared
        machine only ever makes a measurement lower."""
        return Ceiling(self.precision, self.threads, max(self.peak_gops, other.peak_gops),
                       self.peak_kernel, max(self.achievable_gops, other.achievable_gops),
                       self.achievable_how)


def peak_kernel(precision: str, flags: frozenset[str] | None = None) -> str | None:
    """The loop that measures ``precision``'s peak on this CPU (None: it has none)."""
    flags = cpu_flags() if flags is None else flags
    return next((k for k, need in PEAK_KERNELS.get(precision, []) if need <= flags), None)


def _timed_peak(lib: Any, kernel: str, threads: int, seconds: float) -> float:
    iters = 100_000
    while True:  # size the loop to ~``seconds``, then keep the best
        t0 = time.perf_counter()
        lib.peak(kernel, threads, iters)
        took = time.perf_counter() - t0
        if took > seconds / 4 or iters > 1 << 34:
            break
        iters *= max(2, int(seconds / 4 / max(took, 1e-6)))
    # best of five: a peak is a maximum, and a shared machine only ever makes a run slower
    return max(lib.peak(kernel, threads, iters) for _ in range(5)) / 1e9


def measure_ceilings(store: ArtifactStore, threads: int | None = None,
                     precisions: tuple[str, ...] = ("fp32", "bf16", "int8"),
                     seconds: float = 0.4) -> dict[str, Ceiling]:
    """Peak and achievable GOP/s of each of ``precisions`` this CPU has an instruction for."""
    import tvm_ffi

    from .kernels import build_peak

    threads = threads or default_threads()
    lib = tvm_ffi.load_module(str(build_peak(store)))
    out = {}
    for p in precisions:
        kernel = peak_kernel(p)
        if kernel is None:
            continue
        peak = _timed_peak(lib, kernel, threads, seconds)
        achievable = lib.matmul(MATMUL_DTYPE[p], MATMUL_N, 3, threads) / 1e9
        out[p] = Ceiling(p, threads, round(peak, 1), kernel, round(achievable, 1),
                         f"oneDNN matmul {MATMUL_N}^3 {MATMUL_DTYPE[p]}")
    return out
