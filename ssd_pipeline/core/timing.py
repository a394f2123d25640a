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


def in_bounds_taps(size_in: int, size_out: int, kernel: int, stride: int, pad: int,
                   dilation: int) -> int:
    """(output position, kernel tap) pairs of one spatial axis whose input lies inside the
    ``size_in`` pixels, not on the padding: the MACs a convolution must do along that axis.
    oneDNN's direct convolutions skip the rest (SSD300's conv6, 3x3 dilation 6 with pad 6 on
    19x19, took 0.59 of the time of the same convolution on a 31x31 input that needs no pad:
    62% of its taps are in bounds); a kernel that multiplies the zeros does more work than
    counted, as Winograd does less."""
    return sum(1 for y in range(size_out) for t in range(kernel)
               if 0 <= y * stride - pad + t * dilation < size_in)


def conv_gop(batch: int, in_hw: Sequence[int], out_hw: Sequence[int], kernel_hw: Sequence[int],
             in_channels: int, out_channels: int, strides: Sequence[int] = (1, 1),
             pads: Sequence[int] = (0, 0), dilations: Sequence[int] = (1, 1)) -> float:
    """GOP (2 x MACs) of a convolution counted on in-bounds taps (``in_bounds_taps``, per axis:
    a tap is in bounds where both of its coordinates are); ``pads`` top and left,
    ``in_channels`` per group."""
    taps = math.prod(in_bounds_taps(i, o, k, s, p, d) for i, o, k, s, p, d in zip(
        in_hw, out_hw, kernel_hw, strides, pads, dilations, strict=True))
    return 2.0 * batch * taps * in_channels * out_channels / 1e9


def conv_gflop_per_image(onnx_path: str, *, padding_taps: bool = False) -> float:
    """GFLOP of the graph's convolutions for one image (2 x MACs), from ONNX shape inference,
    counted on in-bounds taps (``conv_gop``); with ``padding_taps``, every output element times
    its kernel, as a profile that knows shapes but not pads counts. SSD300 at 300x300: 65.6,
    68.7 with the padding's taps (conv6 alone 2.1 against 3.4; the heads of the 3x3 and 1x1
    levels most of the rest)."""
    import onnx

    from .onnxfile import load_onnx

    model = onnx.shape_inference.infer_shapes(load_onnx(onnx_path))
    shapes = {v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    total = 0.0
    for node in model.graph.node:
        if node.op_type != "Conv" or node.output[0] not in shapes \
                or node.input[1] not in weights:
            continue
        o, c_per_group, kh, kw = weights[node.input[1]]
        out = shapes[node.output[0]]
        if padding_taps:
            total += 2.0 * float(np.prod(out[1:])) * c_per_group * kh * kw / 1e9
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        in_hw, strides = shapes[node.input[0]][2:], a.get("strides", (1, 1))
        dilations = a.get("dilations", (1, 1))
        pads = a.get("pads", (0, 0, 0, 0))[:2]
        auto = a.get("auto_pad", b"NOTSET")
        if auto in (b"SAME_UPPER", b"SAME_LOWER"):  # the odd pixel: UPPER at the end, LOWER first
            total_pad = [max((y - 1) * s + (k - 1) * d + 1 - i, 0) for i, y, k, s, d in zip(
                in_hw, out[2:], (kh, kw), strides, dilations, strict=True)]
            pads = [t // 2 if auto == b"SAME_UPPER" else t - t // 2 for t in total_pad]
        total += conv_gop(1, in_hw, out[2:], (kh, kw), c_per_group, o, strides, pads,
                          dilations)
    return total
