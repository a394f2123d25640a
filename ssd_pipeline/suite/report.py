"""Speed records (pytest-benchmark JSON of ``pytest -m perf``, or the records file of ``bench``
and ``run``; one file or several, for comparison) -> Markdown table + PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from .bench import RECORDS_FORMAT


def read_json(path: Path, what: str) -> Any:
    """A JSON file, or one line saying why it cannot be read (``what``: which file it is)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not JSON ({e.msg} at line {e.lineno})") from None


def runs_of(data: Any, path: Path) -> list[dict[str, Any]]:
    """The speed records of a parsed pytest-benchmark file or records file, as flat rows."""
    if isinstance(data, dict) and data.get("format") == RECORDS_FORMAT:
        found = data.get("records") or []
    elif isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        found = [b.get("extra_info") or {} for b in data["benchmarks"]]
    else:
        raise UserError(f"{path} is neither a pytest-benchmark file nor a records file: "
                        "write one with pytest -m perf --benchmark-json FILE or "
                        "ssd-pipeline bench --output FILE")
    return [{"run": Path(path).stem, **r} for r in found if "images_per_s" in r]


def machine_of(data: Any) -> dict[str, Any]:
    """The machine a parsed speed file ran on (pytest-benchmark's or ours)."""
    return (data.get("machine_info") or {}).get("ssd_pipeline") or data.get("machine") or {}


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """Flat rows: one per speed record (pytest-benchmark keeps ours in ``extra_info``)."""
    rows = []
    for path in paths:
        rows += runs_of(read_json(path, "benchmark file"), path)
    if not rows:
        raise UserError(f"no ssd_pipeline perf records in {', '.join(map(str, paths))}")
    return rows


SpeedKey = tuple[str, str, str, int]  # mode, backend, precision, batch


def speed_key(r: dict[str, Any]) -> SpeedKey:
    """Which case a speed record measured: what a comparison matches rows by."""
    return (r["mode"], r["backend"], r["precision"], int(r["batch"]))


def compare(old: Path, new: Path) -> str:
    """Two runs side by side, one row per case in either, with the change: img/s (raw, only
    meaningful on like machines) and the ratio to ONNX Runtime fp32 (which travels)."""
    a = {speed_key(r): r for r in load_runs([old])}
    b = {speed_key(r): r for r in load_runs([new])}
    out = [f"| mode | backend | precision | batch | img/s {old.stem} | img/s {new.stem} | "
           f"change | ratio {old.stem} | ratio {new.stem} | change |", "|" + "---|" * 10]

    def pct(x: Any, y: Any) -> str:
        return f"{(y / x - 1) * 100:+.1f}%" if x and y else ""

    def num(r: dict[str, Any] | None, key: str, fmt: str) -> str:
        return fmt.format(r[key]) if r and r.get(key) is not None else "-"

    for k in sorted(set(a) | set(b)):
        ra, rb = a.get(k), b.get(k)
        ratio_change = ""
        if ra and rb and ra.get("ratio_vs_onnxruntime") and rb.get("ratio_vs_onnxruntime"):
            ratio_change = f"{rb['ratio_vs_onnxruntime'] - ra['ratio_vs_onnxruntime']:+.2f}"
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {num(ra, 'images_per_s', '{:.2f}')}"
                   f" | {num(rb, 'images_per_s', '{:.2f}')} | "
                   f"{pct(ra and ra['images_per_s'], rb and rb['images_per_s'])} | "
                   f"{num(ra, 'ratio_vs_onnxruntime', '{:.2f}')} | "
                   f"{num(rb, 'ratio_vs_onnxruntime', '{:.2f}')} | {ratio_change} |")
    return "\n".join(out)


def _key(r: dict[str, Any]) -> tuple:
    return (r["run"], r["mode"], r["backend"], r["precision"], int(r["batch"]))


def _cell(r: dict[str, Any], key: str, fmt: str) -> str:
    return fmt.format(r[key]) if r.get(key) is not None else ""


def markdown(rows: list[dict[str, Any]]) -> str:
    out = ["| run | mode | backend | precision | batch | img/s | p50 ms | p90 ms | p99 ms "
           "| GFLOP/s | vs onnxruntime | e2e / engine |", "|" + "---|" * 12]
    for r in sorted(rows, key=_key):
        gf, ratio, e2e = (_cell(r, "gflops", "{:.0f}"), _cell(r, "ratio_vs_onnxruntime", "{:.2f}x"),
                          _cell(r, "ratio_vs_engine_only", "{:.2f}"))
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


README_BEGIN = "<!-- measured:begin (generated by ssd-pipeline report --readme; do not edit) -->"
README_END = "<!-- measured:end -->"


def readme_tables(perf_json: Path, accuracy_json: Path) -> str:
    """The README's "Measured here" tables, from a ``pytest -m perf --benchmark-json`` file
    and an accuracy records file (``pytest -m accuracy``'s accuracy.json)."""
    data = read_json(perf_json, "benchmark file")
    every = runs_of(data, perf_json)
    rows = [r for r in every if r["mode"] == "engine-only"]
    e2e = [r for r in every if r["mode"] == "end-to-end"]
    host = machine_of(data)
    when = str(data.get("datetime", ""))[:10]
    batches = sorted({int(r["batch"]) for r in rows})
    mid = 8 if 8 in batches else batches[-1]
    cases = sorted({(r["backend"], r["precision"]) for r in rows},
                   key=lambda c: (c != ("onnxruntime", "fp32"), c))
    by = {(r["backend"], r["precision"], int(r["batch"])): r for r in rows}
    out = [f"Engine-only throughput, SSD300 ({rows[0].get('weights', 'weights unknown')}), "
           f"{host.get('cpu_model', 'CPU unknown')} (LLVM `{host.get('llvm_cpu', '?')}`), "
           f"{host.get('threads', '?')} threads, one `pytest -m perf` run ({when}); GFLOP/s = "
           f"{rows[0].get('gflop_per_image') or 0:.1f} GFLOP of convolutions per image x img/s:",
           "",
           "| backend / precision | " + " | ".join(f"bs {b} img/s" for b in batches)
           + f" | GFLOP/s (bs {mid}) | vs ONNX Runtime fp32 ("
           + " / ".join(f"bs {b}" for b in batches) + ") |",
           "|---|" + "---|" * (len(batches) + 2)]
    for backend, precision in cases:
        cells = [by.get((backend, precision, b)) for b in batches]
        ips = [f"{c['images_per_s']:.2f}" if c else "" for c in cells]
        ratio = " / ".join(f"{c['ratio_vs_onnxruntime']:.2f}" if c else "-" for c in cells)
        gf = by.get((backend, precision, mid))
        gflops = f"{gf['gflops']:.0f}" if gf else ""
        out.append(f"| {backend} {precision} | {' | '.join(ips)} | {gflops} | {ratio} |")
    if e2e:
        out += ["", "End-to-end (JPEG decode + preprocessing + engine + mmdet decode/NMS) over "
                "engine-only img/s, same run: " + ", ".join(
                    f"{r['backend']} {r['precision']} bs {r['batch']} "
                    f"{r['ratio_vs_engine_only']:.2f}"
                    for r in sorted(e2e, key=lambda r: (r["backend"], r["precision"],
                                                        int(r["batch"])))) + "."]
    acc = read_json(accuracy_json, "accuracy records")
    if acc:
        first = acc[0]
        out += ["", f"Embedded model, {first['num_images']}-image val split "
                f"(`pytest -m accuracy --models tiny`, batch {first['batch_size']}):", "",
                "| backend / precision | mAP@0.5 | mAP@0.5:0.95 | mAP_75 | AR@100 |",
                "|---|---|---|---|---|"]
        for r in sorted(acc, key=lambda r: (r["backend"] != "torch", r["backend"],
                                            r["precision"])):
            m = r["metrics"]
            out.append(f"| {r['backend']} {r['precision']} | {m['bbox_mAP_50']:.4f} | "
                       f"{m['bbox_mAP']:.4f} | {m['bbox_mAP_75']:.4f} | {m['bbox_AR@100']:.4f} |")
    return "\n".join(out)


def update_readme(readme: Path, perf_json: Path, accuracy_json: Path) -> bool:
    """Rewrite the generated block of ``readme``; True when it changed."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise UserError(f"{readme} has no generated block ({README_BEGIN} ... {README_END})")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_BEGIN}\n{readme_tables(perf_json, accuracy_json)}\n{README_END}{tail}"
    readme.write_text(new)
    return new != text
