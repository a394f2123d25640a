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
           "| GFLOP/s | vs onnxruntime (medians) | e2e / engine (medians) |", "|" + "---|" * 12]
    for r in sorted(rows, key=_key):
        gf, ratio, e2e = (_cell(r, "gflops", "{:.0f}"), _cell(r, "ratio_vs_onnxruntime", "{:.2f}x"),
                          _cell(r, "ratio_vs_engine_only", "{:.2f}"))
        out.append(f"| {r['run']} | {r['mode']} | {r['backend']} | {r['precision']} | "
                   f"{r['batch']} | {r['images_per_s']:.2f} | {r['latency_ms_p50']:.1f} | "
                   f"{r['latency_ms_p90']:.1f} | {r['latency_ms_p99']:.1f} | {gf} | {ratio} | "
                   f"{e2e} |")
    return "\n".join(out)


REFERENCE_ACCURACY = ("torch", "fp32")  # what every per-class drop is measured against


def load_accuracy(path: Path) -> list[dict[str, Any]]:
    """Accuracy records (``evaluate --output``, ``run``'s or ``pytest -m accuracy``'s
    accuracy.json)."""
    data = read_json(path, "accuracy records")
    if not isinstance(data, list) or not all(isinstance(r, dict) and "metrics" in r
                                             for r in data):
        raise UserError(f"{path} is not a list of accuracy records: write one with "
                        "pytest -m accuracy (accuracy.json) or ssd-pipeline evaluate --output")
    return data


def _case(r: dict[str, Any]) -> str:
    return f"{r['backend']}/{r['precision']}"


def per_class_drops(records: list[dict[str, Any]], top: int = 10
                    ) -> list[tuple[str, str, float, float, float]]:
    """(case, class, reference AP, AP, drop) for every record against the PyTorch fp32
    record on the same data (same annotation hash and image count), worst drops first;
    ``top`` per case; classes whose AP did not change are left out, as are classes without
    ground truth. AP: per-class mAP@0.5:0.95."""
    refs = {(r.get("dataset_sha256"), r["num_images"]): r for r in records
            if (r["backend"], r["precision"]) == REFERENCE_ACCURACY}
    out = []
    for r in records:
        ref = refs.get((r.get("dataset_sha256"), r["num_images"]))
        if ref is None or ref is r:
            continue
        ref_pc, pc = ref["metrics"].get("per_class") or {}, r["metrics"].get("per_class") or {}
        rows = [(_case(r), name, ref_pc[name]["mAP"], pc[name]["mAP"],
                 ref_pc[name]["mAP"] - pc[name]["mAP"])
                for name in ref_pc if name in pc and ref_pc[name]["mAP"] is not None
                and pc[name]["mAP"] is not None and pc[name]["mAP"] != ref_pc[name]["mAP"]]
        out += sorted(rows, key=lambda t: -t[4])[:top]
    return out


def accuracy_markdown(records: list[dict[str, Any]], top: int = 5) -> str:
    """AP per backend/precision, then each one's worst per-class drops against PyTorch fp32."""
    out = ["| backend / precision | images | mAP@0.5 | mAP@0.5:0.95 | mAP_75 | AR@100 |",
           "|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["backend"] != "torch", _case(r))):
        m = r["metrics"]
        out.append(f"| {_case(r)} | {r['num_images']} | {m['bbox_mAP_50']:.4f} | "
                   f"{m['bbox_mAP']:.4f} | {m['bbox_mAP_75']:.4f} | {m['bbox_AR@100']:.4f} |")
    drops = per_class_drops(records, top)
    if drops:
        out += ["", f"Worst per-class mAP@0.5:0.95 drops against "
                f"{'/'.join(REFERENCE_ACCURACY)} (same data), {top} per case:", "",
                "| backend / precision | class | torch fp32 | this | drop |",
                "|---|---|---|---|---|"]
        out += [f"| {case} | {name} | {ref:.4f} | {ap:.4f} | {drop:+.4f} |"
                for case, name, ref, ap, drop in drops]
    unchanged = [_case(r) for r in records if _compared(r, records)
                 and not any(d[0] == _case(r) for d in drops)]
    if unchanged:
        out += ["", f"Per-class AP equal to {'/'.join(REFERENCE_ACCURACY)} in every class: "
                f"{', '.join(unchanged)}."]
    return "\n".join(out)


def _compared(r: dict[str, Any], records: list[dict[str, Any]]) -> bool:
    """Whether ``r`` has a PyTorch fp32 record on the same data to be compared with."""
    return (r["backend"], r["precision"]) != REFERENCE_ACCURACY and any(
        (q["backend"], q["precision"]) == REFERENCE_ACCURACY
        and q.get("dataset_sha256") == r.get("dataset_sha256")
        and q["num_images"] == r["num_images"] and q["metrics"].get("per_class")
        for q in records) and bool(r["metrics"].get("per_class"))


def plot(rows: list[dict[str, Any]], path: Path,
         accuracy: list[dict[str, Any]] | None = None) -> None:
    """Top left: engine-only throughput vs batch per backend/precision, error bars the 95%
    interval of img/s (dashed: end-to-end). Top right: latency p50/p90/p99 at the largest
    batch. With accuracy records, bottom left: AP per backend/precision; bottom right: the
    worst per-class drops against PyTorch fp32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 4 if accuracy else 2
    fig, axes = plt.subplots(panels // 2, 2, figsize=(14, 5 * (panels // 2)), squeeze=False)
    ax1, ax2 = axes[0]
    if rows:
        _throughput(ax1, rows)
        _latency(ax2, rows)
    else:
        for ax in (ax1, ax2):
            ax.text(0.5, 0.5, "no speed records given", ha="center", va="center")
            ax.set_axis_off()
    if accuracy:
        _ap_bars(axes[1][0], accuracy)
        _class_drops(axes[1][1], accuracy)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _throughput(ax: Any, rows: list[dict[str, Any]]) -> None:
    series: dict[tuple, list] = {}
    for r in rows:
        series.setdefault((r["run"], r["backend"], r["precision"], r["mode"]), []).append(r)
    # one colour per run/backend/precision: solid engine-only, dashed end-to-end
    colours = {k: f"C{i}" for i, k in enumerate(sorted({s[:3] for s in series}))}
    several_runs = len({k[0] for k in series}) > 1
    for (run, backend, precision, mode), pts in sorted(series.items()):
        pts.sort(key=lambda r: int(r["batch"]))
        label = f"{backend}/{precision} {mode}" + (f" [{run}]" if several_runs else "")
        ys = [p["images_per_s"] for p in pts]
        lo = [y - (p.get("images_per_s_ci95_low") or y) for y, p in zip(ys, pts, strict=True)]
        hi = [(p.get("images_per_s_ci95_high") or y) - y for y, p in zip(ys, pts, strict=True)]
        ax.errorbar([int(p["batch"]) for p in pts], ys, yerr=[lo, hi], capsize=4,
                    fmt="-o" if mode == "engine-only" else "--x", label=label,
                    color=colours[run, backend, precision])
    ax.set_xscale("log", base=2)
    batches = sorted({int(r["batch"]) for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s (bars: 95% interval)")
    ax.set_title("Throughput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _latency(ax: Any, rows: list[dict[str, Any]]) -> None:
    engine = [r for r in rows if r["mode"] == "engine-only"] or rows
    top = max(int(r["batch"]) for r in engine)
    sel = sorted((r for r in engine if int(r["batch"]) == top), key=_key)
    xs = range(len(sel))
    for q, w in [("p50", -0.25), ("p90", 0), ("p99", 0.25)]:
        ax.bar([x + w for x in xs], [r[f"latency_ms_{q}"] for r in sel], 0.25, label=q)
    ax.set_xticks(list(xs), [f"{r['backend']}/{r['precision']}" for r in sel],
                  rotation=20, fontsize=8)
    ax.set_ylabel("ms per batch")
    ax.set_title(f"{sel[0]['mode'].capitalize()} latency percentiles, batch {top}")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)


def _ap_bars(ax: Any, records: list[dict[str, Any]]) -> None:
    sel = sorted(records, key=lambda r: (r["backend"] != "torch", _case(r)))
    xs = range(len(sel))
    for key, label, w in [("bbox_mAP_50", "mAP@0.5", -0.2), ("bbox_mAP", "mAP@0.5:0.95", 0.2)]:
        vals = [r["metrics"][key] for r in sel]
        bars = ax.bar([x + w for x in xs], vals, 0.4, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(list(xs), [_case(r) for r in sel], rotation=20, fontsize=8)
    ax.set_ylabel("AP")
    ax.set_ylim(0, 1.15)  # room for the legend above the bars
    ax.set_title(f"COCO AP per backend ({sel[0]['num_images']} images)")
    ax.legend(loc="upper center", ncol=2)
    ax.grid(True, axis="y", alpha=0.3)


def _class_drops(ax: Any, records: list[dict[str, Any]], top: int = 5) -> None:
    drops = per_class_drops(records, top)
    if not drops:
        compared = [_case(r) for r in records if _compared(r, records)]
        ax.text(0.5, 0.5, "per-class AP equal to torch/fp32 in every class:\n"
                + ", ".join(compared) if compared else
                "no PyTorch fp32 record with per-class AP on the same data",
                ha="center", va="center", wrap=True)
        ax.set_title("Per-class drops vs torch/fp32")
        ax.set_axis_off()
        return
    cases = sorted({d[0] for d in drops})
    colours = {c: f"C{i}" for i, c in enumerate(cases)}
    labels = [f"{case}: {name}" for case, name, *_ in drops]
    ax.barh(range(len(drops)), [d[4] for d in drops],
            color=[colours[d[0]] for d in drops])
    ax.set_yticks(range(len(drops)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("per-class mAP@0.5:0.95 drop vs torch/fp32 (positive: worse)")
    ax.set_title(f"Worst {top} per-class drops per backend")
    ax.grid(True, axis="x", alpha=0.3)


def write_report(inputs: list[Path], markdown_path: Path | None, png_path: Path | None,
                 accuracy: list[dict[str, Any]] | None = None) -> str:
    """The report: speed table (and accuracy tables, with records given) as Markdown, and
    the PNG of :func:`plot`."""
    if not inputs and not accuracy:
        raise UserError("nothing to report: give speed records files and/or --accuracy")
    rows = load_runs(inputs) if inputs else []
    parts = [markdown(rows)] if rows else []
    if accuracy:
        parts.append(accuracy_markdown(accuracy))
    table = "\n\n".join(parts)
    if markdown_path:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(table + "\n")
    if png_path:
        png_path.parent.mkdir(parents=True, exist_ok=True)
        plot(rows, png_path, accuracy)
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
           f"{rows[0].get('gflop_per_image') or 0:.1f} GFLOP of convolutions per image (taps "
           "inside the input, not on padding) x img/s:",
           "",
           "| backend / precision | " + " | ".join(f"bs {b} img/s" for b in batches)
           + f" | GFLOP/s (bs {mid}) | of peak / of oneDNN matmul (bs {mid}) "
           "| vs ONNX Runtime fp32, medians (" + " / ".join(f"bs {b}" for b in batches) + ") |",
           "|---|" + "---|" * (len(batches) + 3)]
    for backend, precision in cases:
        cells = [by.get((backend, precision, b)) for b in batches]
        ips = [f"{c['images_per_s']:.2f}" if c else "" for c in cells]
        ratio = " / ".join(f"{c['ratio_vs_onnxruntime']:.2f}" if c else "-" for c in cells)
        gf = by.get((backend, precision, mid))
        gflops = f"{gf['gflops']:.0f}" if gf else ""
        frac = (f"{gf['peak_fraction']:.2f} / {gf['roofline_fraction']:.2f}"
                if gf and gf.get("peak_fraction") is not None else "-")
        out.append(f"| {backend} {precision} | {' | '.join(ips)} | {gflops} | {frac} | "
                   f"{ratio} |")
    fewer = sorted({(r["backend"], r["precision"], r["executed_gflop_per_image"],
                     r.get("winograd_convolutions"), r.get("winograd_f4x4_convolutions") or 0)
                    for r in rows if r.get("executed_gflop_per_image") is not None})

    def how(n: int | None, f4: int) -> str:
        if not n:
            return "some of them as Winograd"
        kinds = [f"{f4} as Winograd F(4x4, 3x3)"] if f4 else []
        kinds += [f"{n - f4} as Winograd F(2x2, 3x3)"] if n > f4 else []
        return " and ".join(kinds)

    if fewer:
        out += ["", "GFLOP/s counts every convolution as direct; " + "; ".join(
            f"{b} {p} runs {how(n, f4)} and executes {ex:.1f} GFLOP per image, which its peak "
            "and matmul fractions read" for b, p, ex, n, f4 in fewer) + "."]
    mixed = sorted({(r["backend"], r["precision"],
                     tuple(sorted(r["executed_gflop_per_image_by_precision"].items())))
                    for r in rows if r.get("executed_gflop_per_image_by_precision")})
    if mixed:
        out += ["", "; ".join(
            f"{b} {p} executes " + " and ".join(f"{g:.1f} GFLOP per image in {q}"
                                                for q, g in split)
            for b, p, split in mixed)
            + ": its fractions read each part against its own precision's ceilings."]
    ceilings = next((r["ceilings"] for r in rows if r.get("ceilings")), None)
    if ceilings:
        out += ["", "This run's ceilings (`ssd_pipeline/engine/peak.py`, same threads): "
                + "; ".join(f"{p} peak {c['peak_gops']:.0f} GOP/s ({c['peak_kernel']}), oneDNN "
                            f"matmul {c['achievable_gops']:.0f}" for p, c in ceilings.items())
                + "."]
    if e2e:
        out += ["", "End-to-end (JPEG decode + preprocessing + engine + mmdet decode/NMS) over "
                "the engine-only img/s measured around it (medians), same run: " + ", ".join(
                    f"{r['backend']} {r['precision']} bs {r['batch']} "
                    f"{r['ratio_vs_engine_only']:.2f}"
                    for r in sorted(e2e, key=lambda r: (r["backend"], r["precision"],
                                                        int(r["batch"])))) + "."]
    acc = read_json(accuracy_json, "accuracy records")
    if acc:
        first = acc[0]
        out += ["", f"Embedded model, {first['num_images']}-image val split "
                f"(`pytest -m accuracy --models tiny`, batch {first['batch_size']}):", "",
                "| backend / precision | mAP@0.5 | mAP@0.5:0.95 | mAP_75 | AR@100 | "
                "mAP@0.5:0.95 drop vs torch fp32 (points) |",
                "|---|---|---|---|---|---|"]
        ref = next((r["metrics"]["bbox_mAP"] for r in acc
                    if (r["backend"], r["precision"]) == ("torch", "fp32")), None)
        for r in sorted(acc, key=lambda r: (r["backend"] != "torch", r["backend"],
                                            r["precision"])):
            m = r["metrics"]
            drop = f"{(ref - m['bbox_mAP']) * 100:+.2f}" if ref is not None else "-"
            out.append(f"| {r['backend']} {r['precision']} | {m['bbox_mAP_50']:.4f} | "
                       f"{m['bbox_mAP']:.4f} | {m['bbox_mAP_75']:.4f} | {m['bbox_AR@100']:.4f} "
                       f"| {drop} |")
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
