"""The bench module's bookkeeping, with a runner of known speed: what an end-to-end record is
divided by. No timing gate here (those are the perf tests'): the fake runner's delay is the
only clock that matters, and the checks leave a wide margin around it."""

from __future__ import annotations

import time

import numpy as np

from ssd_pipeline.backends.base import Runner
from ssd_pipeline.data import PreprocessSettings
from ssd_pipeline.postprocess import Detections
from ssd_pipeline.suite.bench import BenchSettings, SpeedLog


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
    ratio uses the engine-only time measured around it (the slow one), not the old record,
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
    assert rec.engine_only_images_per_s < 55  # 2 images per ~40 ms, measured around it
    # decoding runs ahead in threads: the data path costs the engine a little, not 4x
    assert 0.5 < rec.ratio_vs_engine_only <= 1.05
    assert rec.images_per_call == len(sample_set.images)
