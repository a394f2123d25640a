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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..backends import Runner
from ..core.gates import Verdict, drop_key, judge, parity_table
from ..parity import rel_errs
from .bench import REFERENCE, BenchSettings, SpeedRecord, first_batch, speed_log_for, write_records
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
    say(write_report([bench_path], out / "report.md", out / "report.png", records))
    verdicts = judge_run(bundle, records, parity, log.records)
    summary = {**spec.provenance(), "dataset": str(dataset.ann_file), "images": len(dataset),
               "accuracy": {f"{r['backend']}/{r['precision']}": r["metrics"]["bbox_mAP_50"]
                            for r in records},
               "parity_max_rel_err": parity, "verdicts": [asdict(v) for v in verdicts],
               "wall_s": round(time.perf_counter() - t_start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    say(f"done in {summary['wall_s']} s: {out}/accuracy.json, bench.json, report.md, report.png")
    say("verdicts (the test suite's gates and floors, fixtures/expectations.toml):")
    for v in verdicts:
        say("  " + v.line())
    failed = sum(v.status == "FAIL" for v in verdicts)
    say(f"{failed} of {len(verdicts)} gates FAILED" if failed else
        f"all {sum(v.status == 'PASS' for v in verdicts)} gates run PASSED "
        f"({sum(v.status == 'NOT RUN' for v in verdicts)} not run)")
    return summary


def judge_run(bundle: ModelBundle, accuracy: list[dict[str, Any]], parity: dict[str, float],
              speed: list[SpeedRecord]) -> list[Verdict]:
    """Every gate the test suite applies to what this run measured, with the same keys."""
    exp, entry = bundle.expectations, bundle.entry
    out: list[Verdict] = []
    for r in accuracy:
        case = f"{r['backend']}/{r['precision']}"
        for stat, leaf in (("bbox_mAP_50", "map_50_min"), ("bbox_mAP", "map_min")):
            key = f"{entry.expectations_key}.{leaf}"
            if bundle.spec.checkpoint is None:
                out.append(Verdict(key, case, "NOT RUN", "random-init weights: accuracy is "
                                   "gated only for a checkpoint (pass --weight)"))
            else:
                out.append(judge(exp, key, case, r["metrics"][stat]))
    ref = next((r for r in accuracy if (r["backend"], r["precision"]) == ("torch", "fp32")),
               None)
    for r in accuracy:
        if r["backend"] == "torch" or ref is None or bundle.spec.checkpoint is None:
            continue
        for stat in ("bbox_mAP", "bbox_mAP_50"):
            out.append(judge(exp, drop_key(exp, r["backend"], r["precision"]),
                             f"{r['backend']}/{r['precision']} {stat}",
                             ref["metrics"][stat] - r["metrics"][stat]))
    for case, err in parity.items():
        table = parity_table(case.rsplit("/", 1)[1])
        out.append(judge(exp, f"{table}.raw_rel_err_max", f"{case} vs torch/fp32", err))
    for s in speed:
        if (s.backend, s.precision) == REFERENCE:
            continue
        key = f"{entry.perf_key}.{s.backend}_{s.precision}_min_ratio"
        out.append(judge(exp, key, f"{s.backend}/{s.precision} batch {s.batch}",
                         s.ratio_vs_onnxruntime or 0.0))
    return out
