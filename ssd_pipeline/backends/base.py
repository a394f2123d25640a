"""The one backend interface: ``prepare(artifacts, ...) -> runner``, ``runner.run(batch)``.

A runner takes a float32 NCHW batch (already preprocessed) and returns the 12 raw head
outputs as float32 arrays, class-score maps first, in the order of ``output_names``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import UserError
from ..core.host import cap_note, cpu_flags

if TYPE_CHECKING:
    from ..artifacts.chain import ModelArtifacts


@dataclass(frozen=True)
class OpTime:
    """One operation of one profiled run: what ran, on which shapes, and for how long.
    ``weight_shape`` is set for convolutions (output channels first, the rest multiplied
    give the MACs per output element); ``ms`` is the median over the profiled runs."""

    index: int  # position in execution order
    name: str  # the backend's own name for it (TVM function symbol, ONNX node name)
    op: str  # operation kind: "conv", or the backend's op type
    ms: float
    input_shapes: tuple[tuple[int, ...], ...] = ()
    output_shape: tuple[int, ...] | None = None
    weight_shape: tuple[int, ...] | None = None
    # GOP (2 x MACs) the backend multiplies, where it knows: Winograd's tile products (16 per
    # 2x2 output tile instead of 36), a direct convolution's in-bounds taps
    # (core.timing.conv_gop); else the profile counts every output element times its kernel
    executed_gop: float | None = None
    # a Winograd convolution's phases, ms (medians like ``ms``): input transform, products
    # (oneDNN's), output transform; where its threads run apart, their mean
    phases_ms: tuple[float, float, float] | None = None
    # what ran a Winograd convolution's products: "matmul" (oneDNN's batched matmul) or
    # "grouped_conv" (one grouped 1x1 convolution, where the shim's rule takes it: the end of
    # MakeWino in engine/kernels/dnnl_conv.cc)
    products_by: str | None = None


class Runner(ABC):
    """A prepared model on one backend."""

    # whether its kernels keep to ONEDNN_MAX_CPU_ISA (oneDNN's, and ours, read it): a capped
    # run's ceilings do not bound one that does not
    follows_isa_cap = True

    def __init__(self, backend: str, precision: str, threads: int, output_names: list[str],
                 info: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.precision = precision
        self.threads = threads
        self.output_names = output_names
        self.info = {"backend": backend, "precision": precision, "threads": threads,
                     **(info or {})}

    @abstractmethod
    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Raw head outputs for ``batch`` (float32, N x 3 x H x W)."""

    def profile(self, batch: np.ndarray, rounds: int) -> list[OpTime]:
        """Time per operation of ``run(batch)``: one untimed run, then the median of
        ``rounds`` profiled runs per operation, in execution order."""
        raise UserError(f"backend {self.backend!r} has no per-layer profiler here; profile "
                        "tvm (its VM's call instrument), onnxruntime (its session profiler) "
                        "or openvino (its PERF_COUNT counters)")


class Backend(ABC):
    """Factory of runners; subclasses set ``name`` and ``precisions`` (all they offer; a
    precision this host cannot run is named by :meth:`unavailable`)."""

    name: str = ""
    precisions: tuple[str, ...] = ("fp32",)

    def unavailable(self, precision: str) -> str | None:
        """Why this host cannot run ``precision`` (None: it can)."""
        if precision == "bf16" and "avx512_bf16" not in cpu_flags():
            return f"bf16 needs a CPU with avx512_bf16 (this one has none{cap_note()})"
        return None

    def available_precisions(self) -> tuple[str, ...]:
        return tuple(p for p in self.precisions if self.unavailable(p) is None)

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise UserError(f"backend {self.name!r} has no precision {precision!r}; "
                            f"choose one of {', '.join(self.precisions)}")
        why = self.unavailable(precision)
        if why:
            raise UserError(f"backend {self.name!r} cannot run {precision} here: {why}; "
                            f"choose one of {', '.join(self.available_precisions())}")

    @abstractmethod
    def prepare(self, artifacts: ModelArtifacts, *, precision: str = "fp32",
                threads: int | None = None, batch_size: int | None = None) -> Runner:
        """Build or load what this backend runs; the result is ready for ``run``."""


def check_batch(batch: np.ndarray, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise UserError(f"expected a float32 N x 3 x H x W batch, got shape {batch.shape}")
    if expected_hw and tuple(batch.shape[2:]) != expected_hw:
        raise UserError(f"expected input {expected_hw[0]}x{expected_hw[1]}, got {batch.shape[2:]}")
    return np.ascontiguousarray(batch, dtype=np.float32)
