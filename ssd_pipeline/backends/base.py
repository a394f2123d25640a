"""The one backend interface: ``prepare(artifacts, ...) -> runner``, ``runner.run(batch)``.

A runner takes a float32 NCHW batch (already preprocessed) and returns the 12 raw head
outputs as float32 arrays, class-score maps first, in the order of ``output_names``.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError

if TYPE_CHECKING:
    from ..artifacts import ModelArtifacts


def default_threads() -> int:
    """Cores this process may use (affinity-aware, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_precisions() -> tuple[str, ...]:
    """fp32, plus bf16 where the CPU has avx512_bf16 (what bf16 kernels need to be fast)."""
    from ..compile import cpu_flags

    return ("fp32", "bf16") if "avx512_bf16" in cpu_flags() else ("fp32",)


class Runner(ABC):
    """A prepared model on one backend."""

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


class Backend(ABC):
    """Factory of runners; subclasses set ``name`` and ``precisions``."""

    name: str = ""
    precisions: tuple[str, ...] = ("fp32",)

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise UserError(f"backend {self.name!r} has no precision {precision!r}; "
                            f"choose one of {', '.join(self.precisions)}")

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
