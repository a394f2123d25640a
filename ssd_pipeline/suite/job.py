"""The main job (``ssd-pipeline run``): export -> simplify -> compile -> accuracy -> parity ->
speed -> report, for every backend and precision, with nothing to download by default.

By default it runs the embedded model (``--model tiny``: a small SSD trained here, with its
generated val set); ``--model ssd300 --weight W --datasets-dir D`` runs the real thing.
Its speed table comes from the same records (:mod:`.bench`) the perf tests write.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..backends import Runner
from ..parity import rel_errs
from .bench import BenchSettings, first_batch, speed_log_for, write_records
from .evaluate import accuracy_record, format_table
from .models import ModelBundle
from .report import write_report


def say(msg: str) -> None:
    print(msg, flush=True)


def run_job(bundle: ModelBundle, cases: list[tuple[str, str]], datasets_dir: str | None,
            max_images: int | None, batch_size: int, perf_batches: list[int],
            bench: BenchSettings, out: Path) -> dict[str, Any]:
    """``cases``: (backend, precision) pairs, as :func:`ssd_pipeline.backends.cases` selects."""
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    arts, spec = bundle.artifacts, bundle.spec
    say(f"[1/6] model {bundle.entry.name} ({spec.config.name}), weights {spec.weights_label}"
        f" (checkpoint load: {spec.checkpoint_load})")
    if spec.checkpoint is None:
        say("      no --weight: seeded random weights. Accuracy below shows that every stage "
            "runs and agrees, not that the model detects anything.")
    # the dataset first: a missing one is reported before anything is exported or compiled
    dataset = bundle.dataset(datasets_dir, max_images)
    t = time.perf_counter()
    info = arts.build_info()
    ex, si = info["export"], info["simplify"]
    say(f"[2/6] ONNX: {ex['nodes']} nodes, {ex['bytes'] / 1e6:.0f} MB (export {ex['export_s']:.1f}"
        f" s); onnxsim: {si['nodes_before']} -> {si['nodes_after']} nodes, checked to "
        f"{si['max_rel_err']:.1e} ({time.perf_counter() - t:.1f} s incl. cache)")
    say("[3/6] preparing backends (TVM engines compile once, then come from the cache)")
    runners: dict[tuple[str, str], Runner] = {}
    for name, precision in cases:
        t = time.perf_counter()
        runners[name, precision] = bundle.runner(name, precision)
        built = runners[name, precision].info.get("compile_s")
        say(f"      {name}/{precision}: ready in {time.perf_counter() - t:.1f} s"
            + (f" (engine compiled in {built:.1f} s when built)" if built else ""))
    say(f"[4/6] accuracy on {len(dataset)} images of {dataset.ann_file}")
    post = bundle.postprocessor(dataset.cat_ids)
    records = [accuracy_record(runner, dataset, post, bundle.settings, batch_size,
                               spec.provenance(), progress=sys.stderr.isatty())
               for runner in runners.values()]
    say(format_table(records))
    (out / "accuracy.json").write_text(json.dumps(records, indent=1))

    say("[5/6] parity of raw head outputs against torch (first batch)")
    first = first_batch(dataset.images, bundle.settings, min(batch_size, len(dataset)))
    parity = {}
    if ("torch", "fp32") in runners:
        ref = runners["torch", "fp32"].run(first)
        for key, runner in runners.items():
            if key != ("torch", "fp32"):
                errs = rel_errs(runner.run(first), ref, runner.output_names)
                parity["/".join(key)] = max(errs.values())
                say(f"      {'/'.join(key)}: max relative error {parity['/'.join(key)]:.2e}")
    else:
        say("      torch is not among --backends: no reference to compare with")

    threads = next(iter(runners.values())).threads
    say(f"[6/6] engine-only speed, batches {perf_batches}, {threads} threads")
    log = speed_log_for(bundle, first, bench)
    for batch in perf_batches:
        for name, precision in cases:
            log.engine_only(name, precision, batch)
    bench_path = write_records(out / "bench.json", log.records)
    say(write_report([bench_path], out / "report.md", out / "report.png"))
    summary = {**spec.provenance(), "dataset": str(dataset.ann_file), "images": len(dataset),
               "accuracy": {f"{r['backend']}/{r['precision']}": r["metrics"]["bbox_mAP_50"]
                            for r in records},
               "parity_max_rel_err": parity, "wall_s": round(time.perf_counter() - t_start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    say(f"done in {summary['wall_s']} s: {out}/accuracy.json, bench.json, report.md, report.png")
    return summary
