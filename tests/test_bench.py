"""The bench module's bookkeeping, with a runner of known speed: what an end-to-end record is
divided by. No timing gate here (those are the perf tests'): the fake runner's delay is the
only clock that matters, and the checks leave a wide margin around it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ssd_pipeline.backends.base import Runner
from ssd_pipeline.data import PreprocessSettings
from ssd_pipeline.postprocess import Detections
from ssd_pipeline.suite.bench import BenchSettings, SpeedLog, own_timer


class SleepyRunner(Runner):
    """Takes ``delay`` seconds per call; the delay can change between measurements, as a
    shared machine's speed does."""

    def __init__(self, delay: float) -> None:
        super().__init__("fake", "fp32", 1, ["out"])
        self.delay = delay

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        time.sleep(self.delay)
        return [np.zeros((batch.shape[0], 1), np.float32)]


def no_detections(outputs: list[np.ndarray], metas: list) -> list[Detections]:
    return [Detections(m.img_id, np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                       np.zeros(0, np.int64), np.zeros(0, np.int64)) for m in metas]


def test_end_to_end_is_divided_by_engine_only_measured_around_it(sample_set):
    """The engine slows down after its engine-only record was taken: the end-to-end record's
    ratio uses the engine-only time measured among its rounds (the slow one), not the old record,
    so the data path is not charged with the machine's drift."""
    runner = SleepyRunner(0.01)
    x = np.zeros((2, 3, 300, 300), np.float32)
    log = SpeedLog(lambda b, p: runner, lambda b: x,
                   BenchSettings(warmup=0, seconds=0.05, min_rounds=3, max_rounds=3), 1.0)
    old = log.engine_only("fake", "fp32", 2)
    runner.delay = 0.04
    rec = log.end_to_end("fake", "fp32", 2, sample_set.images, no_detections,
                         PreprocessSettings())
    assert old.images_per_s > 120  # 2 images per ~10 ms
    assert rec.engine_only_rounds >= 2
    assert rec.engine_only_images_per_s < 55  # 2 images per ~40 ms, measured among its rounds
    # decoding runs ahead in threads: the data path costs the engine a little, not 4x
    assert 0.5 < rec.ratio_vs_engine_only <= 1.05
    assert rec.images_per_call == len(sample_set.images)


def test_end_to_end_engine_time_is_interleaved_with_its_rounds(sample_set):
    """A slow stretch of the host that covers the end-to-end rounds (here: the engine is 4x
    slower while the timer runs them) slows the engine-only calls made between those rounds
    too, so the ratio still charges the data path only with its own cost."""
    runner = SleepyRunner(0.01)
    x = np.zeros((2, 3, 300, 300), np.float32)
    log = SpeedLog(lambda b, p: runner, lambda b: x,
                   BenchSettings(warmup=0, seconds=0.05, min_rounds=4, max_rounds=4), 1.0)
    inside: list[float] = []

    def slow_while_timing(fn, rounds, setup):
        runner.delay = 0.04
        try:
            return own_timer(fn, rounds, lambda: (inside.append(runner.delay), setup()))
        finally:
            runner.delay = 0.01

    rec = log.end_to_end("fake", "fp32", 2, sample_set.images, no_detections,
                         PreprocessSettings(), slow_while_timing)
    calls = -(-len(sample_set.images) // 2)  # as many engine-only calls as a round's batches
    assert inside == [0.04] * 4  # before each of the 4 rounds
    assert rec.engine_only_rounds == 5 * calls  # and after the last, at the normal speed
    assert rec.engine_only_images_per_s_median < 55  # the median: 2 images per ~40 ms
    assert 0.5 < rec.ratio_vs_engine_only <= 1.05


class PreemptedRunner(SleepyRunner):
    """Fast, but its ``every``-th call is preempted: ``slow`` seconds, as a call is on a shared
    machine when a neighbour takes the core."""

    def __init__(self, delay: float, slow: float, every: int) -> None:
        super().__init__(delay)
        self.slow, self.every, self.calls = slow, every, 0

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        self.calls += 1
        time.sleep(self.slow if self.calls % self.every == 0 else self.delay)
        return [np.zeros((batch.shape[0], 1), np.float32)]


def test_ratio_is_of_medians_so_one_preempted_round_cannot_decide_it():
    """Two runners of equal speed, one preempted once in its five rounds (10x slower): the mean
    img/s shows the preemption, the ratio the gates read does not."""
    from ssd_pipeline.suite.bench import REFERENCE

    x = np.zeros((1, 3, 300, 300), np.float32)
    steady = SleepyRunner(0.01)
    preempted = PreemptedRunner(0.01, 0.1, every=4)  # its 4th call: the 2nd timed round
    log = SpeedLog(lambda b, p: steady if (b, p) == REFERENCE else preempted, lambda b: x,
                   BenchSettings(warmup=1, seconds=0.01, min_rounds=5, max_rounds=5), 1.0)
    rec = log.engine_only("fake", "fp32", 1)
    assert rec.rounds == 5 and rec.latency_ms_max > 80  # the preempted round was timed
    assert rec.images_per_s < 0.6 * rec.onnxruntime_images_per_s  # the mean took the hit
    assert 0.7 < rec.ratio_vs_onnxruntime < 1.4  # the medians did not


def test_a_record_above_the_peak_measures_the_peak_again_before_it_says_so():
    """A peak is a maximum: one measured while a neighbour held a core reads low (fp32 117
    against 229-232 GOP/s was seen). A record above it re-measures the ceilings and keeps the
    higher, and so does a record above the matmul (bf16's read 229 against 453 once); a
    record above every measurement still reads above its peak, for within_peak."""
    from ssd_pipeline.engine.peak import Ceiling
    from ssd_pipeline.suite.bench import PEAK_REMEASURES, REFERENCE

    x = np.zeros((1, 3, 300, 300), np.float32)
    runner = SleepyRunner(0.01)  # ~100 img/s: 1 GOP per image is ~100 GOP/s

    def ceilings_from(peaks: list[float], matmuls: list[float] | None = None):
        """The k-th measurement reads peaks[k] (and matmuls[k], else the same), the last
        one ever after."""
        def measure() -> dict[str, Ceiling]:
            measure.calls += 1
            k = measure.calls - 1
            peak = peaks[min(k, len(peaks) - 1)]
            matmul = peak if matmuls is None else matmuls[min(k, len(matmuls) - 1)]
            return {"fp32": Ceiling("fp32", 1, peak, "fma_avx512", matmul, "fake")}
        measure.calls = 0
        return measure

    settings = BenchSettings(warmup=0, seconds=0.01, min_rounds=3, max_rounds=3)
    disturbed = ceilings_from([50.0, 200.0])  # the first measurement read 4x low
    log = SpeedLog(lambda b, p: runner, lambda b: x, settings, 1.0, ceilings=disturbed)
    rec = log.engine_only(*REFERENCE, 1)
    assert disturbed.calls == 2 and rec.peak_gops == 200.0 and rec.peak_fraction < 1
    assert log.ceilings()["fp32"].peak_gops == 200.0

    slow_matmul = ceilings_from([1000.0], [40.0, 300.0])  # the peak right, the matmul low first
    log = SpeedLog(lambda b, p: runner, lambda b: x, settings, 1.0, ceilings=slow_matmul)
    rec = log.engine_only(*REFERENCE, 1)
    assert slow_matmul.calls == 2 and rec.achievable_gops == 300.0
    assert rec.roofline_fraction < 1

    low = ceilings_from([20.0])  # every measurement below what the record computes
    log = SpeedLog(lambda b, p: runner, lambda b: x, settings, 1.0, ceilings=low)
    rec = log.engine_only(*REFERENCE, 1)
    assert low.calls == 1 + PEAK_REMEASURES and rec.peak_fraction > 2


def test_an_engine_with_float32_layers_reads_each_precision_against_its_own_ceiling():
    """An int8 engine runs its stem (and without VNNI its big Winograd layers) in float32:
    those operations are read against the float32 ceilings, the rest against int8's. The
    fraction is the time the mix would take at the ceilings over the time it takes; counted
    all against int8, the same engine read 0.7 GOP at 400 GOP/s, about half of that."""
    from ssd_pipeline.engine.peak import Ceiling
    from ssd_pipeline.suite.bench import REFERENCE

    x = np.zeros((1, 3, 300, 300), np.float32)
    reference, engine = SleepyRunner(0.01), SleepyRunner(0.01)
    engine.precision = "int8"
    # 1 GOP per image in the graph; 0.5 of it (direct) runs in float32 as 0.2 (Winograd)
    engine.info.update({"precision": "int8", "conv_gop_saved_per_image": 0.3,
                        "float32_convolutions": 3, "float32_direct_gop_per_image": 0.5,
                        "float32_executed_gop_per_image": 0.2})
    ceilings = {"fp32": Ceiling("fp32", 1, 200.0, "fma_avx512", 100.0, "fake"),
                "int8": Ceiling("int8", 1, 800.0, "int8_avx512_vnni", 400.0, "fake")}
    log = SpeedLog(lambda b, p: reference if (b, p) == REFERENCE else engine, lambda b: x,
                   BenchSettings(warmup=0, seconds=0.01, min_rounds=3, max_rounds=3), 1.0,
                   ceilings=lambda: ceilings)
    rec = log.engine_only("fake", "int8", 1)
    seconds_at_matmul = 0.5 / 400 + 0.2 / 100  # per image: int8's part, float32's part
    assert rec.executed_gflop_per_image_by_precision == {"int8": 0.5, "fp32": 0.2}
    assert rec.executed_gflop_per_image == 0.7
    assert rec.roofline_fraction == pytest.approx(rec.images_per_s * seconds_at_matmul,
                                                  rel=1e-3)
    assert rec.peak_fraction == pytest.approx(rec.roofline_fraction / 2, rel=1e-3)
    assert rec.achievable_gops == pytest.approx(0.7 / seconds_at_matmul, rel=1e-3)
    all_int8 = rec.images_per_s * 0.7 / 400
    assert rec.roofline_fraction > 1.8 * all_int8
    # one precision: GOP/s over that precision's ceilings, as before
    ref = log.engine_only(*REFERENCE, 1)
    assert ref.executed_gflop_per_image_by_precision is None
    assert ref.roofline_fraction == pytest.approx(ref.images_per_s * 1.0 / 100, rel=1e-3)
    assert ref.achievable_gops == 100.0


def test_under_a_cap_a_backend_that_ignores_it_gets_no_capped_fractions(monkeypatch):
    """ONEDNN_MAX_CPU_ISA caps oneDNN and this suite, not ONNX Runtime's MLAS: its int8 read
    1.07x an AVX2-capped peak, which within_peak would have failed. Its records say why they
    have no fractions; a backend that keeps to the cap still gets them."""
    import ssd_pipeline.core.host as host
    import ssd_pipeline.suite.bench as bench
    from ssd_pipeline.engine.peak import Ceiling
    from ssd_pipeline.suite.bench import REFERENCE

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    # as on an AVX-512 host, where the cap takes flags away; both where the record's fractions
    # are decided and where its note is written (an AVX2 host's cap takes none)
    monkeypatch.setattr(bench, "cap_takes_flags", lambda: True)
    monkeypatch.setattr(host, "cap_takes_flags", lambda: True)
    x = np.zeros((1, 3, 300, 300), np.float32)
    mlas, capped = SleepyRunner(0.01), SleepyRunner(0.01)
    mlas.follows_isa_cap = False
    ceilings = {"fp32": Ceiling("fp32", 1, 20.0, "fma_avx2", 20.0, "fake")}  # below both
    log = SpeedLog(lambda b, p: mlas if (b, p) == REFERENCE else capped, lambda b: x,
                   BenchSettings(warmup=0, seconds=0.01, min_rounds=3, max_rounds=3), 1.0,
                   ceilings=lambda: ceilings)
    ref = log.engine_only(*REFERENCE, 1)
    assert ref.peak_fraction is None and ref.roofline_fraction is None
    assert "does not keep to the cap" in ref.ceiling_note
    assert "ONEDNN_MAX_CPU_ISA" in ref.ceiling_note
    rec = log.engine_only("fake", "fp32", 1)
    assert rec.ceiling_note is None and rec.peak_fraction > 1
