"""The main job (``ssd-pipeline run``): export -> simplify -> compile -> accuracy -> parity ->
speed -> report, for every backend and precision, with nothing to download by default.

By default it runs the embedded model (``--model tiny``: a small SSD trained here, with its
generated val set); ``--model ssd300 --weight W --datasets-dir D`` runs the real thing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from . import backends
from .data import batches
from .evaluate import accuracy_record, format_table
from .models import ModelBundle
from .parity import rel_errs
from .report import write_report
from .timing import conv_gflop_per_image, measure, rounds_for, summarize


def say(msg: str) -> None:
    print(msg, flush=True)


def cases(names: list[str]) -> list[tuple[str, str]]:
    return [(n, p) for n in names for p in backends.get_backend(n).precisions]


def run_job(bundle: ModelBundle, names: list[str], datasets_dir: str | None,
            max_images: int | None, batch_size: int, perf_batches: list[int],
            perf_seconds: float, out: Path) -> dict[str, Any]:
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    arts = bundle.artifacts
    weights = arts.spec.weights_label
    say(f"[1/6] model {bundle.entry.name} ({arts.spec.config.name}), weights {weights}")
    if arts.spec.checkpoint is None:
        say("      no --weight: seeded random weights. Accuracy below shows that every stage "
            "runs and agrees, not that the model detects anything.")
    # the dataset first: a missing one is reported before anything is exported or compiled
    dataset = bundle.entry.dataset(arts.store.root, datasets_dir, max_images)
    t = time.perf_counter()
    info = arts.build_info()
    ex, si = info["export"], info["simplify"]
    say(f"[2/6] ONNX: {ex['nodes']} nodes, {ex['bytes'] / 1e6:.0f} MB (export {ex['export_s']:.1f}"
        f" s); onnxsim: {si['nodes_before']} -> {si['nodes_after']} nodes, checked to "
        f"{si['max_rel_err']:.1e} ({time.perf_counter() - t:.1f} s incl. cache)")
    say("[3/6] preparing backends (TVM engines compile once, then come from the cache)")
    runners = {}
    for name, precision in cases(names):
        t = time.perf_counter()
        runners[name, precision] = bundle.runner(name, precision)
        extra = runners[name, precision].info.get("compile_s")
        say(f"      {name}/{precision}: ready in {time.perf_counter() - t:.1f} s"
            + (f" (engine compiled in {extra:.1f} s when built)" if extra else ""))
    say(f"[4/6] accuracy on {len(dataset)} images of {dataset.ann_file}")
    post = bundle.postprocessor(dataset.cat_ids)
    settings = bundle.settings
    records = []
    for runner in runners.values():
        records.append(accuracy_record(runner, dataset, post, settings, batch_size, weights,
                                       progress=sys.stderr.isatty()))
    say(format_table(records))
    (out / "accuracy.json").write_text(json.dumps(records, indent=1))

    say("[5/6] parity of raw head outputs against torch (first batch)")
    first = next(batches(dataset.images, min(batch_size, len(dataset)), settings)).array
    ref = runners["torch", "fp32"].run(first) if ("torch", "fp32") in runners else None
    parity = {}
    for key, runner in runners.items():
        if ref is not None and key != ("torch", "fp32"):
            errs = rel_errs(runner.run(first), ref, runner.output_names)
            parity["/".join(key)] = max(errs.values())
            say(f"      {'/'.join(key)}: max relative error {parity['/'.join(key)]:.2e}")

    say(f"[6/6] engine-only speed, batches {perf_batches}, {runners[next(iter(runners))].threads}"
        " threads")
    gflop = conv_gflop_per_image(str(arts.simplified_onnx_path))
    benches = []
    for batch in perf_batches:
        x = first if len(first) == batch else _tile(first, batch)
        ort_ips = None
        for (name, precision), runner in sorted(runners.items(),
                                                key=lambda kv: kv[0][0] != "onnxruntime"):
            one = measure(lambda r=runner, x=x: r.run(x), 1, 1)[0]
            stats = summarize(measure(lambda r=runner, x=x: r.run(x), 0,
                                      rounds_for(one, perf_seconds, 3, 100)), batch)
            if name == "onnxruntime":
                ort_ips = stats["images_per_s"]
            rec = {"mode": "engine-only", **runner.info, **stats,
                   "gflops": stats["images_per_s"] * gflop}
            if ort_ips:
                rec["ratio_vs_onnxruntime"] = stats["images_per_s"] / ort_ips
            benches.append({"name": f"{name}-{precision}-bs{batch}", "extra_info": rec})
    bench_path = out / "bench.json"
    bench_path.write_text(json.dumps({"benchmarks": benches}, indent=1))
    table = write_report([bench_path], out / "report.md", out / "report.png")
    say(table)
    summary = {"weights": weights, "dataset": str(dataset.ann_file), "images": len(dataset),
               "accuracy": {f"{r['backend']}/{r['precision']}": r["metrics"]["bbox_mAP_50"]
                            for r in records},
               "parity_max_rel_err": parity, "wall_s": round(time.perf_counter() - t_start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    say(f"done in {summary['wall_s']} s: {out}/accuracy.json, bench.json, report.md, report.png")
    return summary


def _tile(x: Any, batch: int) -> Any:
    import numpy as np

    return np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))
