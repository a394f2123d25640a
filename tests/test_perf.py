"""Speed, with pytest-benchmark: engine-only (the original's number: input prepared, no
pre/post-processing) and end-to-end (JPEG decode + preprocess + engine + decode/NMS).

The records come from ``ssd_pipeline.suite.bench`` (the same the CLI and the main job use);
pytest-benchmark times the rounds and keeps the record in ``extra_info``. CPU floors are
ratios to ONNX Runtime fp32 measured in the same run (absolute times drift on shared
machines), of medians: one preempted round cannot decide a gate, as it moves a mean; a miss
fails with "got X img/s, expected >= Y". Run without -n: benchmarks are disabled under xdist.
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
def perf_bundle(pytestconfig, bundles):
    """The model the perf tests time (--perf-model): its runners and its floors."""
    from ssd_pipeline.suite.models import MODELS

    if pytestconfig.option.perf_model not in MODELS:
        raise pytest.UsageError(f"--perf-model: unknown {pytestconfig.option.perf_model!r}; "
                                f"known: {', '.join(MODELS)}")
    return bundles(pytestconfig.option.perf_model)


@pytest.fixture(scope="session")
def speed_log(pytestconfig, perf_bundle, perf_set):
    """Every speed record of this run; ratios use ONNX Runtime's number from the same run."""
    from ssd_pipeline.suite.bench import BenchSettings, first_batch, speed_log_for

    opt = pytestconfig.option
    settings = BenchSettings(warmup=opt.perf_warmup, seconds=opt.perf_seconds,
                             min_rounds=opt.perf_min_rounds)
    first = first_batch(perf_set.images, perf_bundle.settings, len(perf_set))
    return speed_log_for(perf_bundle, first, settings)


def require_or_say(expectations, key: str, name: str, got: float, floor_of: float,
                   unit: str) -> None:
    """The gate ``key`` on ``got`` (img/s) against ``floor x floor_of``; a measured-only key
    says so (a skip with the number) instead of passing."""
    if expectations.is_measured_only(key):
        pytest.skip(f"measured, not gated ({key} = measured_only): {got:.2f} img/s, "
                    f"{got / floor_of:.2f}x {unit}")
    floor = expectations.number(key)
    require_at_least(name, got, floor * floor_of,
                     f"{floor} x {unit} {floor_of:.2f} img/s; " + expectations.source(key)[:80])


def timer(benchmark):
    """pytest-benchmark as the bench module's timer: it owns the rounds and their stats."""
    if benchmark.disabled:
        pytest.skip("pytest-benchmark is disabled (under xdist -n or --benchmark-disable): "
                    "run perf tests without -n")

    def run(fn, rounds, setup=None):
        benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
        return list(benchmark.stats.stats.data)

    return run


@pytest.fixture(scope="session")
def perf_baseline(pytestconfig):
    """(records by case, machine) of --perf-baseline, or None."""
    from ssd_pipeline.core.errors import UserError
    from ssd_pipeline.suite.baseline import load_speed_baseline

    path = pytestconfig.option.perf_baseline
    try:
        return load_speed_baseline(path) if path else None
    except UserError as e:
        raise pytest.UsageError(f"--perf-baseline: {e}") from None


def against_baseline(benchmark, perf_baseline, rec, expectations) -> None:
    """The regression gate: this run's ratio to ONNX Runtime against the baseline's (ratios
    travel between machines); raw times only between like machines, else it says why."""
    from ssd_pipeline.core.gates import require
    from ssd_pipeline.core.host import machine_info
    from ssd_pipeline.suite.baseline import raw_times_comparable, speed_key

    if perf_baseline is None:
        return
    rows, machine = perf_baseline
    d = rec.as_dict()
    base = rows.get(speed_key(d))
    if base is None:
        benchmark.extra_info["baseline"] = "no such case in the baseline"
        return
    why = raw_times_comparable(machine, machine_info())
    benchmark.extra_info["baseline"] = {
        "ratio_vs_onnxruntime": base.get("ratio_vs_onnxruntime"),
        "images_per_s": base["images_per_s"] if why is None else why}
    if rec.ratio_vs_onnxruntime is not None and base.get("ratio_vs_onnxruntime") is not None \
            and (rec.backend, rec.precision) != ("onnxruntime", "fp32"):
        require(expectations, "regression.ratio_drop_max",
                f"{rec.backend}/{rec.precision} batch {rec.batch}: ratio to onnxruntime "
                f"{rec.ratio_vs_onnxruntime:.3f} vs the baseline's "
                f"{base['ratio_vs_onnxruntime']:.3f}, drop",
                base["ratio_vs_onnxruntime"] - rec.ratio_vs_onnxruntime)


def within_peak(rec) -> None:
    """No backend computes faster than the CPU can: convolution GOP/s at most the run's
    register-resident peak of its precision plus PEAK_MARGIN (the op count includes padding
    taps a backend may skip). Above it, the op count or the peak measurement is wrong."""
    from ssd_pipeline.engine.peak import PEAK_MARGIN

    if rec.peak_fraction is not None and rec.peak_fraction > 1 + PEAK_MARGIN:
        pytest.fail(f"{rec.backend}/{rec.precision} batch {rec.batch}: {rec.gflops:.0f} GOP/s "
                    f"is {rec.peak_fraction:.2f}x this run's {rec.precision} peak "
                    f"({rec.peak_gops:.0f} GOP/s, margin {PEAK_MARGIN:.0%})", pytrace=False)


def test_engine_only(benchmark, backend_name, precision, perf_batch, speed_log, perf_bundle,
                     expectations, perf_baseline):
    rec = speed_log.engine_only(backend_name, precision, perf_batch, timer(benchmark))
    benchmark.extra_info.update(rec.as_dict())
    benchmark.extra_info["ceilings"] = {p: c.as_dict() for p, c in speed_log.ceilings().items()}
    within_peak(rec)
    against_baseline(benchmark, perf_baseline, rec, expectations)
    require_or_say(expectations, floor_key(perf_bundle.entry.perf_key, backend_name, precision),
                   f"{backend_name}/{precision} engine-only batch {perf_batch} median img/s",
                   rec.images_per_s_median, rec.onnxruntime_images_per_s_median,
                   "onnxruntime fp32's median in this run")


def floor_key(perf_key: str, backend: str, precision: str) -> str:
    """The expectations key of an engine-only floor. int8 has one per ISA: a VNNI CPU
    (``vpdpbusd``: u8 x s8 into int32, 4x its fp32 rate) reads ``<backend>_int8_vnni_min_ratio``,
    any other ``<backend>_int8_min_ratio`` (AVX2's int8 runs at ~1.8x its fp32)."""
    from ssd_pipeline.core.host import has_vnni

    isa = "_vnni" if precision == "int8" and has_vnni() else ""
    return f"{perf_key}.{backend}_{precision}{isa}_min_ratio"


def test_end_to_end(benchmark, backend_name, precision, e2e_batch, speed_log, perf_set,
                    perf_bundle, expectations):
    """Decode + preprocess (threads, ahead) + engine + mmdet decode/NMS, per image."""
    n = max(8, 2 * e2e_batch)  # two batches at least: decode of one overlaps the other
    images = (perf_set.images * (n // len(perf_set) + 1))[:n]
    rec = speed_log.end_to_end(backend_name, precision, e2e_batch, images,
                               perf_bundle.postprocessor(), perf_bundle.settings,
                               timer(benchmark))
    benchmark.extra_info.update(rec.as_dict())
    require_or_say(expectations, f"{perf_bundle.entry.perf_key}.end_to_end_min_ratio",
                   f"{backend_name}/{precision} end-to-end batch {e2e_batch} median img/s",
                   rec.images_per_s_median, rec.engine_only_images_per_s_median,
                   "its engine-only median")
