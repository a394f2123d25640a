"""pytest-benchmark JSON (one file or several, for comparison) -> Markdown table + PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """Flat rows: one per benchmark with an ssd_pipeline record in its extra_info."""
    rows = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"benchmark file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not JSON ({e.msg} at line {e.lineno})") from None
        benches = data.get("benchmarks") if isinstance(data, dict) else None
        if not isinstance(benches, list):
            raise UserError(f"{path} is not a pytest-benchmark file (no 'benchmarks' list): "
                            "write one with pytest -m perf --benchmark-json FILE")
        for b in benches:
            info = b.get("extra_info") or {}
            if "images_per_s" in info:
                rows.append({"run": Path(path).stem, **info})
    if not rows:
        raise UserError(f"no ssd_pipeline perf records in {', '.join(map(str, paths))}")
    return rows


def _key(r: dict[str, Any]) -> tuple:
    return (r["run"], r["mode"], r["backend"], r["precision"], int(r["batch"]))


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| run | mode | backend | precision | batch | img/s | p50 ms | p90 ms | p99 ms "
           "| GFLOP/s | vs onnxruntime | e2e / engine |", "|" + "---|" * 12]
    for r in sorted(rows, key=_key):
        gf = f"{r['gflops']:.0f}" if "gflops" in r else ""
        ratio = f"{r['ratio_vs_onnxruntime']:.2f}x" if "ratio_vs_onnxruntime" in r else ""
        e2e = f"{r['ratio_vs_engine_only']:.2f}" if "ratio_vs_engine_only" in r else ""
        out.append(f"| {r['run']} | {r['mode']} | {r['backend']} | {r['precision']} | "
                   f"{r['batch']} | {r['images_per_s']:.2f} | {r['latency_ms_p50']:.1f} | "
                   f"{r['latency_ms_p90']:.1f} | {r['latency_ms_p99']:.1f} | {gf} | {ratio} | "
                   f"{e2e} |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: throughput vs batch per backend (solid: engine-only, dashed: end-to-end).
    Right: engine-only latency p50/p90/p99 per backend at the largest batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    series: dict[tuple, list] = {}
    for r in rows:
        series.setdefault((r["run"], r["backend"], r["precision"], r["mode"]), []).append(r)
    # one colour per run/backend/precision: solid engine-only, dashed end-to-end
    colours = {k: f"C{i}" for i, k in enumerate(sorted({s[:3] for s in series}))}
    several_runs = len({k[0] for k in series}) > 1
    for (run, backend, precision, mode), pts in sorted(series.items()):
        pts.sort(key=lambda r: int(r["batch"]))
        label = f"{backend}/{precision} {mode}" + (f" [{run}]" if several_runs else "")
        ax1.plot([int(p["batch"]) for p in pts], [p["images_per_s"] for p in pts],
                 "-o" if mode == "engine-only" else "--x", label=label,
                 color=colours[run, backend, precision])
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("images / s")
    ax1.set_title("Throughput")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    engine = [r for r in rows if r["mode"] == "engine-only"]
    if engine:
        top = max(int(r["batch"]) for r in engine)
        sel = sorted((r for r in engine if int(r["batch"]) == top), key=_key)
        xs = range(len(sel))
        for q, w in [("p50", -0.25), ("p90", 0), ("p99", 0.25)]:
            ax2.bar([x + w for x in xs], [r[f"latency_ms_{q}"] for r in sel], 0.25, label=q)
        ax2.set_xticks(list(xs), [f"{r['backend']}/{r['precision']}" for r in sel],
                      rotation=20, fontsize=8)
        ax2.set_ylabel("ms per batch")
        ax2.set_title(f"Engine-only latency, batch {top}")
        ax2.legend()
        ax2.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(inputs: list[Path], markdown_path: Path | None, png_path: Path | None
                 ) -> str:
    rows = load_runs(inputs)
    table = markdown(rows)
    if markdown_path:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(table + "\n")
    if png_path:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, png_path)
    return table
