"""``ssd-pipeline``: export | compile | evaluate | bench | profile | report | run | roofline | info,
and the
seed-compatible ``python -m ssd_pipeline.export``.

Every entry point of the package is here (the top layer); each command resolves its model
through :func:`ssd_pipeline.suite.models.resolve_bundle`, as the test suite does.
Bad input ends with one line ``error: ...`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from . import backends
from .artifacts.export import OPSET, export_onnx
from .artifacts.simplify import simplify_onnx
from .core.cache import ArtifactStore, file_sha256
from .core.errors import UserError
from .core.expectations import Expectations
from .core.host import (
    STACK,
    cap_note,
    cap_summary,
    default_threads,
    has_vnni,
    machine_info,
    versions,
)
from .engine.compile import EngineSpec, cached_engine, cached_engine_dir
from .model import DEFAULT_CONFIG, ModelSpec
from .suite.bench import (
    REFERENCE,
    BenchSettings,
    first_batch,
    speed_log_for,
    tile_batch,
    write_records,
)
from .suite.distributed import (
    DEFAULT_TIMEOUT_S,
    THROUGHPUT_FORMAT,
    World,
    aggregate_throughput,
    broadcast_status,
    check_same_setup,
    close_world,
    init_world,
    setup_fingerprint,
)
from .suite.evaluate import accuracy_record, format_table
from .suite.job import run_job
from .suite.models import MODELS, ModelBundle, resolve_bundle
from .suite.profile import default_output, format_profile, profile_runner
from .suite.report import compare, load_accuracy, update_readme, write_report


def run_main(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command body; a :class:`UserError` becomes one line on stderr and exit 2."""
    try:
        cap_summary()  # an unknown ONEDNN_MAX_CPU_ISA level: refused before anything runs
        return fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--weight, --cfg, --trust-checkpoint: the seed's export flags, shared by every command."""
    p.add_argument("--weight", type=Path, default=None,
                   help="checkpoint (.pth); omitted: seeded random init, labelled as such")
    p.add_argument("--cfg", type=Path, default=None,
                   help=f"mmdet config file (default {DEFAULT_CONFIG.name})")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint fully (it can run code) instead of torch's "
                        "weights-only load; only for files you trust. Recorded in every record")
    p.add_argument("--calib-images", type=Path, default=None,
                   help="int8: directory of calibration images the model is not scored on "
                        "(e.g. a few hundred COCO train2017 images); the embedded model and a "
                        "random-init SSD300 calibrate on a generated split")


def _common(p: argparse.ArgumentParser, default_model: str = "ssd300") -> None:
    p.add_argument("--model", default=default_model, choices=list(MODELS),
                   help=f"ssd300 (needs --weight for real weights) or tiny (the embedded "
                        f"trained model); default {default_model}")
    add_model_args(p)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="artifact cache (default $SSD_PIPELINE_CACHE or ~/.cache/ssd_pipeline)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per backend (default: all cores)")
    p.add_argument("--expectations", type=Path, default=None, help="expectations TOML file")
    p.add_argument("--expect", action="append", default=[], metavar="KEY=VALUE",
                   help="override one expectation, e.g. accuracy.ssd300_coco.map_50_min=0.44")


def _selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", default=None,
                   help=f"comma list (default: every registered one: {','.join(backends.names())})")
    p.add_argument("--precisions", "--precision", dest="precisions", default=None,
                   help="comma list (default: every precision each backend offers on this CPU)")


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{flag} must be positive, got {value}")


def _batches(raw: str, flag: str) -> list[int]:
    try:
        sizes = [int(b) for b in raw.split(",") if b]
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {raw!r}") from None
    if not sizes or min(sizes) <= 0:
        raise UserError(f"{flag}: batch sizes must be positive, got {raw!r}")
    return sizes


def make_bundle(args: argparse.Namespace) -> ModelBundle:
    """The model the command works on: --model's entry, with --cfg/--weight in its place
    (and --onnx's graph in place of the export, --engine's engine in place of a build)."""
    _positive(args.threads, "--threads")
    bundle = resolve_bundle(args.model, Expectations.load(args.expectations, args.expect),
                            ArtifactStore(args.cache_dir), weight=args.weight, cfg=args.cfg,
                            trust_checkpoint=args.trust_checkpoint, threads=args.threads,
                            calib_images=getattr(args, "calib_images", None))
    if getattr(args, "onnx", None):
        bundle.artifacts.use_onnx(args.onnx)
    if getattr(args, "engine", None):
        args.engine_precision = bundle.use_engine(args.engine).precision
    return bundle


def _user_graph(p: argparse.ArgumentParser, engine: bool = False) -> None:
    p.add_argument("--onnx", type=Path, default=None,
                   help="an SSD ONNX of --model's config (raw head outputs, e.g. the "
                        "original's onnxsim output) instead of the suite's export")
    if engine:
        p.add_argument("--engine", type=Path, default=None,
                       help="a TVM engine directory ('compile --output DIR'): runs it as "
                            "backend tvm at the precision it was built for")


def _cases(args: argparse.Namespace) -> list[tuple[str, str]]:
    chosen = backends.select(args.backends)
    if getattr(args, "engine", None):
        chosen = ["tvm"]
    given = "--engine" if getattr(args, "engine", None) else "--onnx"
    if (getattr(args, "onnx", None) or getattr(args, "engine", None)) and "torch" in chosen:
        print(f"torch: skipped: it runs the PyTorch model, which {given} does not replace",
              file=sys.stderr)
        chosen = [b for b in chosen if b != "torch"] or ["tvm"]
    cases = backends.cases(chosen, getattr(args, "engine_precision", None) or args.precisions)
    if (capped := cap_summary()) is not None:
        print(f"note: {capped}", file=sys.stderr)
    if any(p == "int8" for _, p in cases) and not has_vnni():
        print(f"note: this CPU has no VNNI{cap_note()} (avx512_vnni / avx_vnni): int8 weights "
              "use 7 bits so vpmaddubsw's int16 pair sums cannot overflow, and int8 peaks at "
              "about 2x fp32 here (4x with VNNI)", file=sys.stderr)
    if not cases:
        raise UserError(f"none of backends {', '.join(chosen)} runs precision(s) "
                        f"{args.precisions} on this CPU")
    return sorted(cases, key=lambda c: c != REFERENCE)  # the reference of every ratio first


def cmd_export(args: argparse.Namespace) -> int:
    spec = make_bundle(args).spec
    info = export_onnx(spec, args.output, args.opset)
    print(f"exported {info['path']}: {info['nodes']} nodes, {info['bytes'] / 1e6:.1f} MB "
          f"in {info['export_s']:.1f} s ({spec.weights_label})")
    if args.simplified:
        tol = Expectations.load(args.expectations, args.expect).number("simplify.rel_err_max")
        s = simplify_onnx(args.output, args.simplified, tol)
        print(f"simplified {args.simplified}: {s['nodes_before']} -> {s['nodes_after']} nodes "
              f"in {s['simplify_s']:.1f} s, max relative error {s['max_rel_err']:.1e}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _positive(args.batch_size, "--batch-size")
    if args.dist_timeout <= 0:
        raise UserError(f"--dist-timeout must be positive, got {args.dist_timeout}")
    world = init_world(args.dist_timeout)
    try:
        bundle = make_bundle(args)
        cases = _cases(args)
        dataset = bundle.dataset(args.datasets_dir, args.max_images)
        post = bundle.postprocessor(dataset.cat_ids)
        runners = [bundle.runner(name, precision) for name, precision in cases]
        check_same_setup(world, lambda: setup_fingerprint(
            bundle.spec.weights_label, bundle.artifacts.simplified_onnx_path, runners, dataset,
            args.batch_size))
        records = [accuracy_record(runner, dataset, post, bundle.settings, args.batch_size,
                                   bundle.spec.provenance(), progress=not args.quiet,
                                   world=world)
                   for runner in runners]
        if world.is_main:
            done = [r for r in records if r is not None]
            print(format_table(done))
            if args.output:
                args.output.write_text(json.dumps(done, indent=1))
                print(f"wrote {args.output}")
        return broadcast_status(world, 0)
    finally:
        close_world(world)


def cmd_compile(args: argparse.Namespace) -> int:
    import shutil

    arts = make_bundle(args).artifacts
    calibration = arts.calibration_path() if args.precision == "int8" else None
    spec = EngineSpec(target=args.target, precision=args.precision, batch=args.batch,
                      offload=args.offload, cuda_arch=args.cuda_arch,
                      calibration=calibration and file_sha256(calibration),
                      winograd=args.winograd)
    onnx_path = arts.simplified_onnx_path
    if spec.target == "cuda":
        # built, not loaded: a CUDA engine loads only where a GPU is (load_engine)
        d = cached_engine_dir(arts.store, onnx_path, spec)
        record = json.loads((d / "engine.json").read_text())
    else:
        engine = cached_engine(arts.store, onnx_path, spec, calibration)
        d, record = engine.path, engine.record
    print(f"engine {d} ({spec.target}/{spec.precision}, batch {spec.batch or 'dynamic'}, "
          f"offload {spec.offload}): compiled in {record['compile_s']:.1f} s")
    if args.output:
        shutil.copytree(d, args.output, dirs_exist_ok=True)
        print(f"copied to {args.output}")
    return 0


def _bench_settings(args: argparse.Namespace) -> BenchSettings:
    if args.perf_seconds <= 0:
        raise UserError(f"--perf-seconds must be positive, got {args.perf_seconds}")
    return BenchSettings(seconds=args.perf_seconds)


def cmd_bench(args: argparse.Namespace) -> int:
    batches = _batches(args.perf_batches, "--perf-batches")
    settings = _bench_settings(args)
    world = init_world()
    try:
        if args.throughput or world.distributed:
            return bench_throughput(args, world, batches)
    finally:
        close_world(world)
    bundle = make_bundle(args)
    cases = _cases(args)
    dataset, source = bundle.timing_images(args.datasets_dir, max(batches))
    print(f"timing on {len(dataset)} images: {source}")
    first = first_batch(dataset.images, bundle.settings, len(dataset))
    log = speed_log_for(bundle, first, settings)
    for batch in batches:
        for name, precision in cases:
            log.engine_only(name, precision, batch)
    path = write_records(args.output, log.records)
    print(write_report([path], None, None))
    print(f"wrote {path}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    _positive(args.batch, "--batch")
    _positive(args.rounds, "--rounds")
    _positive(args.top, "--top")
    bundle = make_bundle(args)
    chosen = backends.select(args.backend)
    if len(chosen) != 1:
        raise UserError(f"--backend: profile one backend at a time, got {args.backend!r}")
    runner = bundle.runner(chosen[0], args.precision)  # checks the precision
    dataset, source = bundle.timing_images(args.datasets_dir, args.batch)
    first = first_batch(dataset.images, bundle.settings, min(args.batch, len(dataset)))
    record = profile_runner(runner, first, args.batch, args.rounds, bundle.spec.provenance())
    record["images"] = source
    print(format_profile(record, args.top))
    path = args.output or default_output(Path("out"), record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return 0


def bench_throughput(args: argparse.Namespace, world: World, batches: list[int]) -> int:
    """Aggregate img/s of every rank together (torchrun), or of this one process: compare
    ``torchrun --nproc-per-node P ... bench --threads T`` with ``bench --throughput
    --threads P*T``."""
    bundle = make_bundle(args)
    cases = _cases(args)
    dataset, _ = bundle.timing_images(args.datasets_dir, max(batches))
    first = first_batch(dataset.images, bundle.settings, len(dataset))
    runners = [bundle.runner(name, precision) for name, precision in cases]
    check_same_setup(world, lambda: setup_fingerprint(
        bundle.spec.weights_label, bundle.artifacts.simplified_onnx_path, runners, dataset,
        max(batches)))
    rows = []
    for batch in batches:
        x = tile_batch(first, batch)
        for runner in runners:
            r = aggregate_throughput(world, lambda rn=runner, xb=x: rn.run(xb), batch,
                                     args.perf_seconds)
            rows.append({"backend": runner.backend, "precision": runner.precision,
                         "threads_per_process": runner.threads, **r})
    if world.is_main:
        print("| backend | precision | batch | processes x threads | img/s (all together) |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['backend']} | {r['precision']} | {r['batch']} | {r['processes']} x "
                  f"{r['threads_per_process']} | {r['aggregate_images_per_s']:.2f} |")
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"format": THROUGHPUT_FORMAT,
                                           "machine": machine_info(), **bundle.spec.provenance(),
                                           "rows": rows}, indent=1))
        print(f"wrote {args.output}")
    return broadcast_status(world, 0)


def cmd_report(args: argparse.Namespace) -> int:
    if args.compare:
        if len(args.inputs) != 2:
            raise UserError(f"--compare takes two files, OLD and NEW; got {len(args.inputs)}")
        print(compare(*args.inputs))
        return 0
    if args.readme:
        if len(args.inputs) != 1 or not args.accuracy:
            raise UserError("--readme takes one pytest --benchmark-json file and --accuracy "
                            "(the accuracy.json of pytest -m accuracy)")
        changed = update_readme(args.readme, args.inputs[0], args.accuracy)
        print(f"{'updated' if changed else 'unchanged'}: {args.readme}")
        return 0
    accuracy = load_accuracy(args.accuracy) if args.accuracy else None
    print(write_report(args.inputs, args.markdown, args.plot, accuracy))
    for p in (args.markdown, args.plot):
        if p:
            print(f"wrote {p}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    _positive(args.batch_size, "--batch-size")
    batches = _batches(args.perf_batches, "--perf-batches")
    settings = _bench_settings(args)
    bundle = make_bundle(args)
    summary = run_job(bundle, _cases(args), args.datasets_dir, args.max_images,
                      args.batch_size, batches, settings, args.out)
    return 1 if any(v["status"] == "FAIL" for v in summary["verdicts"]) else 0


def cmd_roofline(args: argparse.Namespace) -> int:
    from .engine.peak import PEAK_KERNELS, measure_ceilings

    _positive(args.threads, "--threads")
    ceilings = measure_ceilings(ArtifactStore(args.cache_dir), args.threads)
    print("| precision | threads | peak GOP/s | peak loop | achievable GOP/s | how | "
          "achievable / peak |\n|---|---|---|---|---|---|---|")
    for c in ceilings.values():
        print(f"| {c.precision} | {c.threads} | {c.peak_gops:.0f} | {c.peak_kernel} | "
              f"{c.achievable_gops:.0f} | {c.achievable_how} | "
              f"{c.achievable_gops / c.peak_gops:.2f} |")
    for p in PEAK_KERNELS:
        if p not in ceilings:
            print(f"{p}: this CPU has none of the instructions its peak is measured with"
                  f"{cap_note()} "
                  f"({', '.join(sorted(set().union(*(n for _, n in PEAK_KERNELS[p]))))})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps({"backends": backends.names(), "threads": default_threads(),
                      "versions": versions(*STACK)}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssd-pipeline", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="checkpoint -> ONNX (raw head outputs, no NMS)")
    _common(e)
    e.add_argument("--output", type=Path, required=True)
    e.add_argument("--simplified", type=Path, default=None,
                   help="also write the onnxsim-simplified model here")
    e.add_argument("--opset", type=int, default=OPSET)
    e.set_defaults(fn=cmd_export)

    v = sub.add_parser("evaluate", help="COCO accuracy per backend and precision")
    _common(v)
    _selection(v)
    _user_graph(v, engine=True)
    v.add_argument("--datasets-dir", default=None,
                   help="COCO root for ssd300 (default $DATASETS_DIR); tiny uses its own set")
    v.add_argument("--max-images", type=int, default=None)
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--output", type=Path, default=None, help="write the JSON records here")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="under torchrun: seconds a rank waits for the others before the run "
                        f"ends with an error naming the step (default {DEFAULT_TIMEOUT_S:g})")
    v.set_defaults(fn=cmd_evaluate)

    c = sub.add_parser("compile", help="ONNX -> TVM engine (cached by content)")
    _common(c)
    c.add_argument("--target", default="cpu", help="cpu | cuda")
    _user_graph(c)
    c.add_argument("--precision", default="fp32",
                   help="cpu: fp32 | bf16 | int8 (calibrated: see --calib-images); "
                        "cuda: fp32 | fp16")
    c.add_argument("--batch", type=int, default=None, help="static batch (default: dynamic)")
    c.add_argument("--offload", default="dnnl", help="cpu: dnnl (oneDNN convolutions) | none")
    c.add_argument("--no-winograd", dest="winograd", action="store_false",
                   help="keep every convolution direct (by default the larger 3x3 stride-1 "
                   "ones run as Winograd F(4x4) or F(2x2) at fp32 and bf16, and, on a CPU "
                   "without VNNI, stay float32 Winograd in an int8 engine)")
    c.add_argument("--cuda-arch", default="sm_90")
    c.add_argument("--output", type=Path, default=None, help="also copy the engine here")
    c.set_defaults(fn=cmd_compile)

    b = sub.add_parser("bench", help="engine-only speed per backend, precision and batch")
    _common(b, default_model="tiny")
    _selection(b)
    _user_graph(b, engine=True)
    b.add_argument("--datasets-dir", default=None,
                   help="images to time (default: the model's own set; $DATASETS_DIR for ssd300)")
    b.add_argument("--perf-batches", default="1,8")
    b.add_argument("--perf-seconds", type=float, default=3.0)
    b.add_argument("--output", type=Path, default=Path("out/bench.json"),
                   help="records file (default out/bench.json); 'report' reads it")
    b.add_argument("--throughput", action="store_true",
                   help="aggregate img/s instead of per-call timing (always so under torchrun:"
                        " all processes together, like OpenVINO's throughput hint)")
    b.set_defaults(fn=cmd_bench)

    pr = sub.add_parser("profile", help="time per operation of one backend/precision/batch")
    _common(pr, default_model="tiny")
    pr.add_argument("--backend", default="tvm",
                    help="tvm (default), onnxruntime or openvino: each through its own profiler")
    pr.add_argument("--precision", default="fp32")
    pr.add_argument("--batch", type=int, default=8)
    pr.add_argument("--rounds", type=int, default=10,
                    help="profiled runs; each operation's time is its median over them")
    pr.add_argument("--top", type=int, default=10, help="rows printed (the JSON has all)")
    pr.add_argument("--datasets-dir", default=None,
                    help="images to feed (default: the model's own set; $DATASETS_DIR for ssd300)")
    pr.add_argument("--output", type=Path, default=None,
                    help="JSON file (default out/profile-BACKEND-PRECISION-bsN.json)")
    pr.set_defaults(fn=cmd_profile)

    r = sub.add_parser("report", help="speed (and accuracy) records -> Markdown + PNG plots")
    r.add_argument("inputs", type=Path, nargs="*",
                   help="pytest --benchmark-json files or records files of 'bench'/'run'")
    r.add_argument("--markdown", type=Path, default=None)
    r.add_argument("--plot", type=Path, default=None)
    r.add_argument("--compare", action="store_true",
                   help="two files, OLD NEW: side by side with the change per row")
    r.add_argument("--readme", type=Path, default=None,
                   help="rewrite this README's generated 'Measured here' block instead")
    r.add_argument("--accuracy", type=Path, default=None,
                   help="accuracy records (accuracy.json of pytest -m accuracy, run or "
                        "evaluate --output): AP and worst per-class drops vs torch fp32")
    r.set_defaults(fn=cmd_report)

    j = sub.add_parser("run", help="the main job: every stage, every backend, one report")
    _common(j, default_model="tiny")
    _selection(j)
    j.add_argument("--datasets-dir", default=None,
                   help="COCO root for --model ssd300 (default $DATASETS_DIR)")
    j.add_argument("--max-images", type=int, default=None)
    j.add_argument("--batch-size", type=int, default=8)
    j.add_argument("--perf-batches", default="1,8")
    j.add_argument("--perf-seconds", type=float, default=2.0)
    j.add_argument("--out", type=Path, default=Path("out"))
    j.set_defaults(fn=cmd_run)

    f = sub.add_parser("roofline", help="this CPU's ceilings per precision on these threads: "
                       "peak (register-resident loops) and achievable (oneDNN matmul) GOP/s")
    f.add_argument("--threads", type=int, default=None)
    f.add_argument("--cache-dir", type=Path, default=None,
                   help="where the ceiling kernels are built (default $SSD_PIPELINE_CACHE)")
    f.set_defaults(fn=cmd_roofline)

    i = sub.add_parser("info", help="versions, backends, threads")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_main(args.fn, args)


def export_parser() -> argparse.ArgumentParser:
    """The seed's ``export.py`` flags: --weight, --cfg, --output (plus --opset, --trust-...)."""
    p = argparse.ArgumentParser(prog="python -m ssd_pipeline.export",
                                description="Export the checkpoint to ONNX (raw head outputs, "
                                            "no NMS), as the original's export.py.")
    add_model_args(p)
    p.add_argument("--output", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--opset", type=int, default=OPSET)
    return p


def export_main(argv: list[str] | None = None) -> int:
    """``python -m ssd_pipeline.export --weight W --cfg C --output O``."""

    def go(args: argparse.Namespace) -> int:
        spec = ModelSpec(args.cfg or DEFAULT_CONFIG, args.weight,
                         trust_checkpoint=args.trust_checkpoint)
        info = export_onnx(spec, args.output, args.opset)
        print(f"exported {info['path']}: {info['nodes']} nodes, "
              f"{info['bytes'] / 1e6:.1f} MB in {info['export_s']:.1f} s")
        return 0

    return run_main(go, export_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
