"""Per-layer profile of one backend and precision at one batch size: where the engine spends
its time (as trtexec ``--dumpProfile`` or OpenVINO's ``benchmark_app -pc``).

The backend's runner times its operations (:meth:`Runner.profile`); here they are sorted,
given their share of the total and, for convolutions, GOP/s from their shapes."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import OpTime, Runner
from ..core.host import machine_info
from .bench import tile_batch

PROFILE_FORMAT = "ssd_pipeline.profile/1"
# a Winograd call's phases, as the shim times them (``OpTime.phases_ms``)
PHASES = ("input_transform", "products", "output_transform")


def conv_gop(op: OpTime) -> float | None:
    """Giga-operations (2 x MACs) of a convolution as executed: the backend's own count where it
    has one (TVM: Winograd products, in-bounds taps), else every output element takes one MAC
    per weight of its output channel, taps on padding included (a peer's profile has shapes,
    not pads). ONNX Runtime reports its NCHWc kernels' shapes, channels padded to whole
    blocks, so its figure includes that padding too."""
    if op.executed_gop is not None:
        return op.executed_gop
    if op.weight_shape is None or op.output_shape is None:
        return None
    return 2.0 * math.prod(op.output_shape) * math.prod(op.weight_shape[1:]) / 1e9


def profile_runner(runner: Runner, first: np.ndarray, batch: int, rounds: int,
                   model: dict[str, Any]) -> dict[str, Any]:
    """The profile record: every operation, slowest first, with its share of the profiled
    total; and the plain (unprofiled) time of the same call, so the hooks' cost shows."""
    x = tile_batch(first, batch)
    runner.run(x)
    plain = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        runner.run(x)
        plain.append(time.perf_counter() - t0)
    ops = runner.profile(x, rounds)
    total = sum(op.ms for op in ops)
    rows = []
    for op in sorted(ops, key=lambda o: -o.ms):
        gop = conv_gop(op)
        rows.append({"index": op.index, "name": op.name, "op": op.op, "ms": round(op.ms, 4),
                     "share": round(op.ms / total, 5) if total else None,
                     "input_shapes": [list(s) for s in op.input_shapes],
                     "output_shape": list(op.output_shape) if op.output_shape else None,
                     "gop": round(gop, 4) if gop is not None else None,
                     "gops_per_s": round(gop / (op.ms / 1e3), 2) if gop and op.ms else None,
                     **_phases(op, gop)})
    by_op: dict[str, dict[str, float]] = {}
    for r in rows:
        agg = by_op.setdefault(r["op"], {"calls": 0, "ms": 0.0})
        agg["calls"] += 1
        agg["ms"] += r["ms"]
    conv_ms = by_op.get("conv", {}).get("ms", 0.0)
    conv_gop_total = sum(r["gop"] or 0.0 for r in rows)
    return {
        "format": PROFILE_FORMAT, **runner.info, "batch": batch, "rounds": rounds,
        "statistic": "median per operation over the profiled rounds",
        "profiled_total_ms": round(total, 3),
        "plain_call_ms_median": round(float(np.median(plain)) * 1e3, 3),
        "conv_ms": round(conv_ms, 3),
        "conv_gop": round(conv_gop_total, 3),
        "conv_gops_per_s": round(conv_gop_total / (conv_ms / 1e3), 2) if conv_ms else None,
        "by_op": {k: {"calls": int(v["calls"]), "ms": round(v["ms"], 3),
                      "share": round(v["ms"] / total, 5) if total else None}
                  for k, v in sorted(by_op.items(), key=lambda kv: -kv[1]["ms"])},
        "winograd": _winograd_summary(rows, total), "rows": rows, "model": model,
        "machine": machine_info(),
    }


def _phases(op: OpTime, gop: float | None) -> dict[str, Any]:
    """A Winograd row's phases: ms each, and its products' GOP/s (the whole row's GOP is
    theirs: the transforms only add and scale)."""
    if op.phases_ms is None:
        return {}
    ms = dict(zip(PHASES, op.phases_ms, strict=True))
    return {"phases_ms": {k: round(v, 4) for k, v in ms.items()},
            "products_gops_per_s": round(gop / (ms["products"] / 1e3), 2)
            if gop and ms["products"] > 0 else None,
            "products_by": op.products_by}


def _winograd_summary(rows: list[dict[str, Any]], total_ms: float) -> dict[str, Any] | None:
    """Where a Winograd engine's time goes: its calls' phases summed, the products' GOP/s (to
    hold against ``ssd-pipeline roofline``'s matmul) and the transforms' share of the whole
    profiled time, the part no faster matmul can take away. None without timed phases."""
    timed = [r for r in rows if "phases_ms" in r]
    if not timed:
        return None
    ms = {k: sum(r["phases_ms"][k] for r in timed) for k in PHASES}
    gop = sum(r["gop"] or 0.0 for r in timed)
    transforms = ms["input_transform"] + ms["output_transform"]
    return {"calls": len(timed), **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
            "calls_ms": round(sum(r["ms"] for r in timed), 3),
            "products_gop": round(gop, 3),
            "products_gops_per_s": round(gop / (ms["products"] / 1e3), 2)
            if ms["products"] > 0 else None,
            "transforms_share": round(transforms / total_ms, 4) if total_ms else None}


def format_profile(record: dict[str, Any], top: int) -> str:
    """The slowest ``top`` operations as a Markdown table, then time per operation kind."""
    r = record
    head = (f"{r['backend']}/{r['precision']}, batch {r['batch']}, {r['threads']} threads: "
            f"{r['profiled_total_ms']:.1f} ms profiled (plain call {r['plain_call_ms_median']:.1f}"
            f" ms); convolutions {r['conv_ms']:.1f} ms = "
            f"{r['conv_ms'] / r['profiled_total_ms']:.0%}"
            + (f" at {r['conv_gops_per_s']:.0f} GOP/s" if r["conv_gops_per_s"] else ""))
    w = r.get("winograd")
    if w:
        head += (f"\nWinograd, {w['calls']} calls of {w['calls_ms']:.1f} ms: products "
                 f"{w['products_ms']:.1f} ms"
                 + (f" at {w['products_gops_per_s']:.0f} GOP/s" if w["products_gops_per_s"]
                    else "")
                 + f", transforms {w['input_transform_ms']:.1f} ms in + "
                 f"{w['output_transform_ms']:.1f} ms out = {w['transforms_share']:.0%} of the "
                 "profiled time (compare the products with `ssd-pipeline roofline`'s matmul)")
    out = [head, "", "| # | operation | kind | output | ms | share | GOP/s |"
           + (" Winograd in / products / out ms |" if w else ""),
           "|---|---|---|---|---|---|---|" + ("---|" if w else "")]
    for row in r["rows"][:top]:
        shape = "x".join(map(str, row["output_shape"])) if row["output_shape"] else ""
        gops = f"{row['gops_per_s']:.0f}" if row["gops_per_s"] else ""
        name = row["name"] if len(row["name"]) <= 60 else "..." + row["name"][-57:]
        phases = ""
        if w:  # a column only Winograd rows fill
            ph = row.get("phases_ms")
            phases = (" " + " / ".join(f"{ph[k]:.1f}" for k in PHASES)
                      + (" (grouped conv)" if row.get("products_by") == "grouped_conv" else "")
                      if ph else "") + " |"
        out.append(f"| {row['index']} | {name} | {row['op']} | {shape} | "
                   f"{row['ms']:.2f} | {row['share']:.1%} | {gops} |{phases}")
    out += ["", "| kind | calls | ms | share |", "|---|---|---|---|"]
    out += [f"| {k} | {v['calls']} | {v['ms']:.2f} | {v['share']:.1%} |"
            for k, v in r["by_op"].items()]
    return "\n".join(out)


def default_output(out_dir: Path, record: dict[str, Any]) -> Path:
    return out_dir / f"profile-{record['backend']}-{record['precision']}-bs{record['batch']}.json"
