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


CI_MIN_ROUNDS = 5  # fewer rounds give no confidence interval (the record says so)
CI_METHOD = "95% percentile bootstrap of the mean call time, 2000 resamples, seed 0"


def summarize(samples_s: Sequence[float], batch: int) -> dict[str, float | int | str | None]:
    """Throughput, its spread and latency percentiles of per-call times for ``batch`` images
    a call. img/s = batch / mean call time (the original's fps = batch * 1000 / mean_ms)."""
    s = np.asarray(samples_s, dtype=np.float64)
    ms = s * 1e3
    ips = batch / s
    if len(s) >= CI_MIN_ROUNDS:
        means = np.random.default_rng(0).choice(s, (2000, len(s))).mean(axis=1)
        lo, hi = batch / np.percentile(means, 97.5), batch / np.percentile(means, 2.5)
        ci: tuple[float | None, float | None, str] = (float(lo), float(hi), CI_METHOD)
    else:
        ci = (None, None, f"none: {len(s)} rounds, fewer than {CI_MIN_ROUNDS}")
    return {
        "batch": batch,
        "rounds": len(s),
        "images_per_s": batch / float(s.mean()),
        "images_per_s_median": batch / float(np.median(s)),
        "images_per_s_stddev": float(ips.std(ddof=1)) if len(s) > 1 else 0.0,
        "images_per_s_ci95_low": ci[0],
        "images_per_s_ci95_high": ci[1],
        "ci95_method": ci[2],
        "latency_ms_iqr": float(np.percentile(ms, 75) - np.percentile(ms, 25)),
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
