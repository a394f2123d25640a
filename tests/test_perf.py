"""Speed, with pytest-benchmark: engine-only (the original's number: input prepared, no
pre/post-processing) and end-to-end (JPEG decode + preprocess + engine + decode/NMS).

The records come from ``ssd_pipeline.suite.bench`` (the same the CLI and the main job use);
pytest-benchmark times the rounds and keeps the record in ``extra_info``. CPU floors are
ratios to ONNX Runtime fp32 measured in the same run (absolute times drift on shared
machines); a miss fails with "got X img/s, expected >= Y". Run without -n: benchmarks are
disabled under xdist.
"""

from __future__ import annotations

import pytest

from ssd_pipeline.core.gates import require_at_least

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
def speed_log(pytestconfig, ssd300, perf_set):
    """Every speed record of this run; ratios use ONNX Runtime's number from the same run."""
    from ssd_pipeline.suite.bench import BenchSettings, first_batch, speed_log_for

    opt = pytestconfig.option
    settings = BenchSettings(warmup=opt.perf_warmup, seconds=opt.perf_seconds,
                             min_rounds=opt.perf_min_rounds)
    first = first_batch(perf_set.images, ssd300.settings, len(perf_set))
    return speed_log_for(ssd300, first, settings)


def timer(benchmark):
    """pytest-benchmark as the bench module's timer: it owns the rounds and their stats."""
    if benchmark.disabled:
        pytest.skip("pytest-benchmark is disabled (under xdist -n or --benchmark-disable): "
                    "run perf tests without -n")

    def run(fn, rounds):
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
        return list(benchmark.stats.stats.data)

    return run


def test_engine_only(benchmark, backend_name, precision, perf_batch, speed_log, expectations):
    rec = speed_log.engine_only(backend_name, precision, perf_batch, timer(benchmark))
    benchmark.extra_info.update(rec.as_dict())
    key = f"perf.cpu.{backend_name}_{precision}_min_ratio"
    floor = expectations.number(key)
    ort = rec.onnxruntime_images_per_s
    require_at_least(f"{backend_name}/{precision} engine-only batch {perf_batch} img/s",
                     rec.images_per_s, floor * ort,
                     f"{floor} x onnxruntime's {ort:.2f} img/s in this run; "
                     + expectations.source(key)[:80])


def test_end_to_end(benchmark, backend_name, precision, e2e_batch, speed_log, perf_set,
                    ssd300, expectations):
    """Decode + preprocess (threads, ahead) + engine + mmdet decode/NMS, per image."""
    n = max(8, 2 * e2e_batch)  # two batches at least: decode of one overlaps the other
    images = (perf_set.images * (n // len(perf_set) + 1))[:n]
    rec = speed_log.end_to_end(backend_name, precision, e2e_batch, images,
                               ssd300.postprocessor(), ssd300.settings, timer(benchmark))
    benchmark.extra_info.update(rec.as_dict())
    floor = expectations.number("perf.cpu.end_to_end_min_ratio")
    require_at_least(f"{backend_name}/{precision} end-to-end batch {e2e_batch} img/s",
                     rec.images_per_s, floor * rec.engine_only_images_per_s,
                     f"{floor} x its engine-only {rec.engine_only_images_per_s:.2f} img/s")
