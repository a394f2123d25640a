"""``ssd-pipeline``: export | compile | evaluate | bench | report | run | info.

Bad input ends with one line ``error: ...`` and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError


def run_main(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command body; a :class:`UserError` becomes one line on stderr and exit 2."""
    try:
        return fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _common(p: argparse.ArgumentParser, default_model: str = "ssd300") -> None:
    from .export import add_model_args

    p.add_argument("--model", default=default_model,
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


def make_bundle(args: argparse.Namespace) -> Any:
    """The model the command works on: --model's entry, with --cfg/--weight overrides."""
    from .cache import ArtifactStore
    from .expectations import Expectations
    from .model import ModelSpec
    from .models import ModelBundle, get_model

    exp = Expectations.load(args.expectations, args.expect)
    entry = get_model(args.model)
    spec = entry.spec(args.weight)
    if args.cfg:
        spec = ModelSpec(args.cfg, spec.checkpoint)
    return ModelBundle(entry, spec, ArtifactStore(args.cache_dir),
                       exp.number("simplify.rel_err_max"), args.threads)


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx
    from .simplify import simplify_onnx

    spec = make_bundle(args).spec
    info = export_onnx(spec, args.output, args.opset)
    print(f"exported {info['path']}: {info['nodes']} nodes, {info['bytes'] / 1e6:.1f} MB "
          f"in {info['export_s']:.1f} s ({spec.weights_label})")
    if args.simplified:
        from .expectations import Expectations

        tol = Expectations.load(args.expectations, args.expect).number("simplify.rel_err_max")
        s = simplify_onnx(args.output, args.simplified, tol)
        print(f"simplified {args.simplified}: {s['nodes_before']} -> {s['nodes_after']} nodes "
              f"in {s['simplify_s']:.1f} s, max relative error {s['max_rel_err']:.1e}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import accuracy_record, format_table

    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    bundle = make_bundle(args)
    dataset = bundle.entry.dataset(bundle.artifacts.store.root, args.datasets_dir,
                                   args.max_images)
    post = bundle.postprocessor(dataset.cat_ids)
    records = [accuracy_record(bundle.runner(name.strip(), args.precision), dataset, post,
                               bundle.settings, args.batch_size, bundle.spec.weights_label,
                               progress=not args.quiet)
               for name in args.backends.split(",")]
    print(format_table(records))
    if args.output:
        args.output.write_text(json.dumps(records, indent=1))
        print(f"wrote {args.output}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import shutil

    from .compile import EngineSpec

    spec = EngineSpec(target=args.target, precision=args.precision, batch=args.batch,
                      offload=args.offload, cuda_arch=args.cuda_arch)
    arts = make_bundle(args).artifacts
    if spec.target == "cuda":
        # built, not loaded: this TVM runtime cannot run CUDA engines
        d = arts.engine_dir(spec)
        record = json.loads((d / "engine.json").read_text())
    else:
        engine = arts.tvm_engine(spec)
        d, record = engine.path, engine.record
    print(f"engine {d} ({spec.target}/{spec.precision}, batch {spec.batch or 'dynamic'}, "
          f"offload {spec.offload}): compiled in {record['compile_s']:.1f} s")
    if args.output:
        shutil.copytree(d, args.output, dirs_exist_ok=True)
        print(f"copied to {args.output}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(write_report(args.inputs, args.markdown, args.plot))
    for p in (args.markdown, args.plot):
        if p:
            print(f"wrote {p}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .job import run_job

    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    try:
        perf_batches = [int(b) for b in args.perf_batches.split(",") if b]
    except ValueError:
        raise UserError(f"--perf-batches: expected integers, got {args.perf_batches!r}") from None
    run_job(make_bundle(args), [b.strip() for b in args.backends.split(",")],
            args.datasets_dir, args.max_images, args.batch_size, perf_batches,
            args.perf_seconds, args.out)
    return 0


def cmd_roofline(args: argparse.Namespace) -> int:
    from .timing import matmul_roofline

    r = matmul_roofline(args.n, args.threads)
    print(f"{r['n']}^3 matrix product on {r['threads']} threads: "
          f"fp32 {r['fp32_gflops']:.0f} GFLOP/s, bf16 {r['bf16_gflops']:.0f} GFLOP/s")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .artifacts import versions
    from .backends import default_threads, names

    print(json.dumps({"backends": names(), "threads": default_threads(),
                      "versions": versions("torch", "mmdet", "mmcv", "onnx", "onnxruntime",
                                           "apache-tvm", "openvino")}, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .export import OPSET

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

    v = sub.add_parser("evaluate", help="COCO accuracy per backend")
    _common(v)
    v.add_argument("--backends", default="torch,onnxruntime,tvm,openvino")
    v.add_argument("--precision", default="fp32")
    v.add_argument("--datasets-dir", default=None,
                   help="COCO root for ssd300 (default $DATASETS_DIR); tiny uses its own set")
    v.add_argument("--max-images", type=int, default=None)
    v.add_argument("--batch-size", type=int, default=32)
    v.add_argument("--output", type=Path, default=None, help="write the JSON records here")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(fn=cmd_evaluate)

    c = sub.add_parser("compile", help="ONNX -> TVM engine (cached by content)")
    _common(c)
    c.add_argument("--target", default="cpu", help="cpu | cuda")
    c.add_argument("--precision", default="fp32", help="cpu: fp32 | bf16; cuda: fp32 | fp16")
    c.add_argument("--batch", type=int, default=None, help="static batch (default: dynamic)")
    c.add_argument("--offload", default="dnnl", help="cpu: dnnl (oneDNN convolutions) | none")
    c.add_argument("--cuda-arch", default="sm_90")
    c.add_argument("--output", type=Path, default=None, help="also copy the engine here")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("report", help="benchmark JSON -> Markdown table + PNG plot")
    r.add_argument("inputs", type=Path, nargs="+", help="pytest --benchmark-json files")
    r.add_argument("--markdown", type=Path, default=None)
    r.add_argument("--plot", type=Path, default=None)
    r.set_defaults(fn=cmd_report)

    j = sub.add_parser("run", help="the main job: every stage, every backend, one report")
    _common(j, default_model="tiny")
    j.add_argument("--backends", default="torch,onnxruntime,tvm,openvino")
    j.add_argument("--datasets-dir", default=None,
                   help="COCO root for --model ssd300 (default $DATASETS_DIR)")
    j.add_argument("--max-images", type=int, default=None)
    j.add_argument("--batch-size", type=int, default=8)
    j.add_argument("--perf-batches", default="1,8")
    j.add_argument("--perf-seconds", type=float, default=2.0)
    j.add_argument("--out", type=Path, default=Path("out"))
    j.set_defaults(fn=cmd_run)

    f = sub.add_parser("roofline", help="fp32/bf16 matrix-product GFLOP/s on these threads")
    f.add_argument("--n", type=int, default=4096)
    f.add_argument("--threads", type=int, default=None)
    f.set_defaults(fn=cmd_roofline)

    i = sub.add_parser("info", help="versions, backends, threads")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_main(args.fn, args)


if __name__ == "__main__":
    raise SystemExit(main())
