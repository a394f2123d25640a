"""Speed, with pytest-benchmark: engine-only (the original's number: input prepared, no
pre/post-processing) and end-to-end (JPEG decode + preprocess + engine + decode/NMS).

CPU floors are ratios to ONNX Runtime fp32 measured in the same run (absolute times drift on
shared machines); a miss fails with "got X img/s, expected >= Y". Run without -n: benchmarks
are disabled under xdist.
"""

from __future__ import annotations

import pytest

from ssd_pipeline.gates import require_at_least
from ssd_pipeline.timing import measure, rounds_for, summarize

pytestmark = pytest.mark.perf


@pytest.fixture(scope="session")
def perf_set(tmp_path_factory):
    """32 JPEGs of varied sizes, as a user's images would be."""
    from ssd_pipeline.data import CocoDetectionSet
    from ssd_pipeline.synthetic import make_coco_set

    root = tmp_path_factory.mktemp("perf")
    ann = make_coco_set(root, "val2017", 32, seed=21)
    return CocoDetectionSet(ann, root / "images" / "val2017")


@pytest.fixture(scope="session")
def perf_input(perf_set, preprocess_settings):
    """``perf_input(batch)``: a preprocessed batch (images repeat past 32)."""
    import numpy as np

    from ssd_pipeline.data import batches

    arr = next(batches(perf_set.images, len(perf_set), preprocess_settings)).array

    def get(batch: int):
        return np.ascontiguousarray(np.resize(arr, (batch, *arr.shape[1:])))

    return get


@pytest.fixture(scope="session")
def gflop_per_image(artifacts):
    from ssd_pipeline.timing import conv_gflop_per_image

    return conv_gflop_per_image(str(artifacts.simplified_onnx_path))


@pytest.fixture(scope="session")
def perf_log():
    """Engine-only results of this run, keyed (backend, precision, batch): ratios use them."""
    return {}


def timed(benchmark, pytestconfig, fn, batch: int) -> dict:
    """Benchmark ``fn`` (one call = ``batch`` images) with rounds sized to --perf-seconds."""
    if benchmark.disabled:
        pytest.skip("pytest-benchmark is disabled (under xdist -n or --benchmark-disable): "
                    "run perf tests without -n")
    opt = pytestconfig.option
    first = measure(fn, warmup=opt.perf_warmup, rounds=1)[0]
    rounds = rounds_for(first, opt.perf_seconds, opt.perf_min_rounds, 200)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
    return summarize(benchmark.stats.stats.data, batch)


def baseline(perf_log, runners, perf_input, pytestconfig, batch: int) -> float:
    """ONNX Runtime fp32 img/s at ``batch`` in this run (measured here if its test has not)."""
    key = ("onnxruntime", "fp32", batch)
    if key not in perf_log:
        ort = runners("onnxruntime")
        x = perf_input(batch)
        opt = pytestconfig.option
        first = measure(lambda: ort.run(x), opt.perf_warmup, 1)[0]
        rounds = rounds_for(first, opt.perf_seconds, opt.perf_min_rounds, 200)
        perf_log[key] = summarize(measure(lambda: ort.run(x), 0, rounds), batch)
    return perf_log[key]["images_per_s"]


def test_engine_only(benchmark, pytestconfig, backend_name, precision, perf_batch, runners,
                     perf_input, perf_log, gflop_per_image, expectations):
    runner = runners(backend_name, precision)
    x = perf_input(perf_batch)
    stats = timed(benchmark, pytestconfig, lambda: runner.run(x), perf_batch)
    perf_log[backend_name, precision, perf_batch] = stats
    ort = baseline(perf_log, runners, perf_input, pytestconfig, perf_batch)
    ratio = stats["images_per_s"] / ort
    benchmark.extra_info.update({
        "mode": "engine-only", **runner.info, **stats,
        "gflops": stats["images_per_s"] * gflop_per_image,
        "onnxruntime_images_per_s": ort, "ratio_vs_onnxruntime": ratio})
    key = f"perf.cpu.{backend_name}_{precision}_min_ratio"
    floor = expectations.number(key)
    require_at_least(f"{backend_name}/{precision} engine-only batch {perf_batch} img/s",
                     stats["images_per_s"], floor * ort,
                     f"{floor} x onnxruntime's {ort:.2f} img/s in this run; "
                     + expectations.source(key)[:80])


def test_end_to_end(benchmark, pytestconfig, backend_name, precision, e2e_batch, runners,
                    perf_set, preprocess_settings, mmdet_cfg, perf_log, perf_input,
                    expectations):
    """Decode + preprocess (threads, ahead) + engine + mmdet decode/NMS, per image."""
    from ssd_pipeline.evaluate import predict
    from ssd_pipeline.postprocess import Postprocessor

    runner = runners(backend_name, precision)
    post = Postprocessor(mmdet_cfg)
    n = max(8, 2 * e2e_batch)  # two batches at least: decode of one overlaps the other
    images = (perf_set.images * (n // len(perf_set) + 1))[:n]

    def job():
        dets, _ = predict(runner, images, post, preprocess_settings, e2e_batch)
        assert len(dets) == n

    stats = timed(benchmark, pytestconfig, job, n)
    for k in [k for k in stats if k.startswith("latency_ms_")]:
        stats[k] *= e2e_batch / n  # per batch, comparable with engine-only latencies
    engine = perf_log.get((backend_name, precision, e2e_batch))
    if engine is None:
        x = perf_input(e2e_batch)
        engine = summarize(measure(lambda: runner.run(x), 1, 3), e2e_batch)
    ratio = stats["images_per_s"] / engine["images_per_s"]
    benchmark.extra_info.update({
        "mode": "end-to-end", **runner.info, **stats, "batch": e2e_batch, "images": n,
        "engine_only_images_per_s": engine["images_per_s"], "ratio_vs_engine_only": ratio})
    floor = expectations.number("perf.cpu.end_to_end_min_ratio")
    require_at_least(f"{backend_name}/{precision} end-to-end batch {e2e_batch} img/s",
                     stats["images_per_s"], floor * engine["images_per_s"],
                     f"{floor} x its engine-only {engine['images_per_s']:.2f} img/s")
