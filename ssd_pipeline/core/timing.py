"""Timing shared by the perf tests and the CLI: warm-up, rounds, percentiles, and flat
records with units in their keys (timm's benchmark.py style)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def rounds_for(call_s: float, target_s: float, min_rounds: int, max_rounds: int) -> int:
    """Rounds so that one measurement lasts about ``target_s`` (bounded)."""
    return max(min_rounds, min(max_rounds, math.ceil(target_s / max(call_s, 1e-6))))


def measure(fn: Callable[[], Any], warmup: int, rounds: int) -> list[float]:
    """Seconds per call for ``rounds`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summarize(samples_s: Sequence[float], batch: int) -> dict[str, float]:
    """Throughput and latency percentiles of per-call times for ``batch`` images a call."""
    s = np.asarray(samples_s, dtype=np.float64)
    ms = s * 1e3
    return {
        "batch": batch,
        "rounds": len(s),
        "images_per_s": batch / float(s.mean()),
        "latency_ms_mean": float(ms.mean()),
        "latency_ms_min": float(ms.min()),
        "latency_ms_max": float(ms.max()),
        "latency_ms_p50": float(np.percentile(ms, 50)),
        "latency_ms_p90": float(np.percentile(ms, 90)),
        "latency_ms_p99": float(np.percentile(ms, 99)),
    }


def conv_gflop_per_image(onnx_path: str) -> float:
    """GFLOP of the graph's convolutions for one image (2 x MACs), from ONNX shape inference.
    SSD300 at 300x300: 68.7 (34.4 GMAC)."""
    import onnx

    from .onnxfile import load_onnx

    model = onnx.shape_inference.infer_shapes(load_onnx(onnx_path))
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.output]}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        if node.op_type == "Conv" and node.output[0] in shapes and node.input[1] in weights:
            _, c_per_group, kh, kw = weights[node.input[1]]
            n_out = float(np.prod(shapes[node.output[0]][1:]))
            total += 2.0 * n_out * c_per_group * kh * kw
    return total / 1e9


def matmul_roofline(n: int = 4096, threads: int | None = None, seconds: float = 2.0
                    ) -> dict[str, float]:
    """GFLOP/s of a large fp32 and bf16 matrix product (torch: MKL/oneDNN) on ``threads``:
    the ceiling the engines' GFLOP/s are read against."""
    import torch

    from .host import default_threads

    torch.set_num_threads(threads or default_threads())
    out: dict[str, float] = {"n": n, "threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        one = measure(lambda a=a, b=b: torch.mm(a, b), 1, 1)[0]
        t = measure(lambda a=a, b=b: torch.mm(a, b), 0, rounds_for(one, seconds, 2, 50))
        out[f"{name}_gflops"] = 2 * n**3 / min(t) / 1e9
    return out
