"""Speed, measured one way for everyone: the perf tests (through pytest-benchmark), the
``bench`` command and the main job all make their records here.

Engine-only is the original's number (input prepared, no pre/post-processing); end-to-end is
JPEG decode + preprocessing (threads, ahead) + engine + mmdet decode/NMS. Ratios are to ONNX
Runtime fp32 at the same batch in the same run: absolute times drift on shared machines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..backends import Runner
from ..core.host import cap_note, cap_takes_flags, machine_info
from ..core.timing import conv_gflop_per_image, measure, rounds_for, summarize
from ..data import ImageRecord, PreprocessSettings, aligned_empty, batches
from ..engine.peak import PEAK_MARGIN, Ceiling, measure_ceilings
from ..postprocess import Postprocessor
from .evaluate import predict
from .models import ModelBundle

REFERENCE = ("onnxruntime", "fp32")  # what every speed ratio is taken against
RECORDS_FORMAT = "ssd_pipeline.speed/1"
PEAK_REMEASURES = 2  # a record above its precision's peak re-measures the ceilings this often

# ``timer(fn, rounds, setup)`` -> seconds per call of ``fn``, ``setup`` called untimed before
# each: pytest-benchmark's in the perf tests (``pedantic``'s setup), ours elsewhere. Either way
# the rounds are sized by the same rule.
Timer = Callable[[Callable[[], Any], int, Callable[[], Any] | None], list[float]]


def own_timer(fn: Callable[[], Any], rounds: int, setup: Callable[[], Any] | None = None
              ) -> list[float]:
    out = []
    for _ in range(rounds):
        if setup is not None:
            setup()
        out += measure(fn, 0, 1)
    return out


@dataclass(frozen=True)
class BenchSettings:
    warmup: int = 1  # untimed calls first
    seconds: float = 3.0  # target length of one measurement: rounds are sized to it
    # five: the median, which every gate reads, then ignores two preempted rounds
    min_rounds: int = 5
    max_rounds: int = 200


@dataclass
class SpeedRecord:
    """One measurement: flat, units in the key names (timm's benchmark.py style)."""

    mode: str  # "engine-only" or "end-to-end"
    backend: str
    precision: str
    batch: int
    threads: int
    rounds: int
    images_per_s: float
    images_per_s_median: float
    images_per_s_stddev: float  # of per-round img/s
    images_per_s_ci95_low: float | None
    images_per_s_ci95_high: float | None
    ci95_method: str
    latency_ms_iqr: float
    latency_ms_mean: float
    latency_ms_min: float
    latency_ms_max: float
    latency_ms_p50: float  # per call of ``batch`` images
    latency_ms_p90: float
    latency_ms_p99: float
    gflop_per_image: float | None = None
    gflops: float | None = None  # GFLOP/s of the convolutions
    # what the backend executes per image where it does fewer multiplies than the direct
    # convolutions (Winograd): the peak and roofline fractions read this, not gflop_per_image
    executed_gflop_per_image: float | None = None
    # this run's ceilings of the record's precision (ssd_pipeline.engine.peak): the
    # register-resident peak and oneDNN's matmul, in GOP/s, and the fractions gflops reaches
    peak_gops: float | None = None
    peak_fraction: float | None = None
    achievable_gops: float | None = None
    roofline_fraction: float | None = None
    # an engine that runs some convolutions in another precision (int8's float32 stem): what
    # it executes in each, each read against its own ceilings (the two above are the mix's)
    executed_gflop_per_image_by_precision: dict[str, float] | None = None
    ceiling_note: str | None = None  # why a record has no fractions where others do
    # ratios are of medians (``images_per_s_median``), and so are the gates that read them: on
    # a shared machine one preempted round of three moved a mean by 40% (CI, SSD300 TVM int8 at
    # batch 32: 7.31 img/s by the mean against 12.0 in a quiet run); img/s stays the
    # original's mean-based figure
    onnxruntime_images_per_s: float | None = None
    onnxruntime_images_per_s_median: float | None = None
    ratio_vs_onnxruntime: float | None = None
    # end-to-end only: engine-only img/s measured between its rounds (see SpeedLog.end_to_end)
    engine_only_images_per_s: float | None = None
    engine_only_images_per_s_median: float | None = None
    engine_only_rounds: int | None = None
    ratio_vs_engine_only: float | None = None
    images_per_call: int | None = None  # end-to-end only
    runner: dict[str, Any] = field(default_factory=dict)  # the runner's own record
    model: dict[str, Any] = field(default_factory=dict)  # weights and how they were read

    def as_dict(self) -> dict[str, Any]:
        """Flat: what pytest-benchmark's extra_info and the records file hold."""
        d = asdict(self)
        return {**d.pop("runner"), **d.pop("model"), **d}


def tile_batch(array: np.ndarray, batch: int) -> np.ndarray:
    """``batch`` rows from a preprocessed batch (its images repeat as needed)."""
    out = aligned_empty((batch, *array.shape[1:]), array.dtype)
    out[...] = np.resize(array, out.shape)
    return out


class SpeedLog:
    """The speed measurements of one run, so that every ratio uses ONNX Runtime's number from
    the same run (measured on demand when its own case has not run yet)."""

    def __init__(self, runner_for: Callable[[str, str], Runner],
                 input_for: Callable[[int], np.ndarray], settings: BenchSettings,
                 gflop_per_image: float, model: dict[str, Any] | None = None,
                 ceilings: Callable[[], dict[str, Ceiling]] | None = None) -> None:
        self.runner_for, self.input_for = runner_for, input_for
        self.settings, self.gflop_per_image = settings, gflop_per_image
        self.model = model or {}
        self._ceilings_fn = ceilings
        self._ceilings: dict[str, Ceiling] | None = None
        self.engine_only_records: dict[tuple[str, str, int], SpeedRecord] = {}
        self.records: list[SpeedRecord] = []

    def _rounds(self, fn: Callable[[], Any]) -> int:
        """Rounds of ``fn`` for one measurement, sized by its first (untimed) calls."""
        s = self.settings
        first = measure(fn, s.warmup, 1)[0]
        return rounds_for(first, s.seconds, s.min_rounds, s.max_rounds)

    def _sample(self, fn: Callable[[], Any], timer: Timer | None,
                setup: Callable[[], Any] | None = None) -> list[float]:
        return (timer or own_timer)(fn, self._rounds(fn), setup)

    def _record(self, mode: str, runner: Runner, stats: dict[str, Any],
                **extra: Any) -> SpeedRecord:
        """``stats``: :func:`summarize` of the samples, computed once by the caller, whose
        ratios read its figures."""
        rec = SpeedRecord(mode=mode, backend=runner.backend, precision=runner.precision,
                          threads=runner.threads, runner=dict(runner.info), model=self.model,
                          **stats, **extra)
        self.records.append(rec)
        return rec

    def ceilings(self) -> dict[str, Ceiling]:
        """This run's ceilings per precision, measured once (before the first timing)."""
        if self._ceilings is None:
            self._ceilings = self._ceilings_fn() if self._ceilings_fn else {}
        return self._ceilings

    def _fractions(self, runner: Runner, gop_by_precision: dict[str, float],
                   images_per_s: float) -> dict[str, Any]:
        if cap_takes_flags() and not runner.follows_isa_cap:
            # its kernels use the whole CPU, which the capped ceilings do not measure (seen:
            # ONNX Runtime int8 at 1.07x an AVX2-capped peak)
            return {"ceiling_note": f"{runner.backend} does not keep to the cap: this run's "
                                    f"ceilings{cap_note()} do not bound it"}
        return self._against_ceiling(gop_by_precision, images_per_s)

    def _against_ceiling(self, gop_by_precision: dict[str, float], images_per_s: float
                         ) -> dict[str, Any]:
        """Peak and roofline fractions of ``images_per_s`` for an engine that executes
        ``gop_by_precision`` GOP per image in each precision: the time its operations would
        take at each precision's ceiling, against the time they take. One precision: GOP/s
        over the ceiling. Several (an int8 engine's float32 stem, and without VNNI its float32
        Winograd layers): each read against its own, and the record's ceilings are what the
        mix would reach (the operations over that time)."""
        total = sum(gop_by_precision.values())
        if total <= 0 or not all(p in self.ceilings() for p in gop_by_precision):
            return {}

        def bounds() -> tuple[float, float]:  # seconds per image at the peaks, the matmuls
            cs = self.ceilings()
            return (sum(g / cs[p].peak_gops for p, g in gop_by_precision.items()),
                    sum(g / cs[p].achievable_gops for p, g in gop_by_precision.items()))

        peak_s, matmul_s = bounds()
        for _ in range(PEAK_REMEASURES):
            above = images_per_s * max(peak_s, matmul_s) > 1 + PEAK_MARGIN
            if not above or self._ceilings_fn is None:
                break
            # above the peak or the matmul: measured again before the record says so, since
            # a ceiling taken while a neighbour held a core reads low (seen: fp32 peak 117
            # against 229-232 GOP/s; bf16 matmul 229 against 453, a roofline fraction of 1.66)
            again = self._ceilings_fn()
            self._ceilings = {p: old.best(again[p]) if p in again else old
                              for p, old in self.ceilings().items()}
            peak_s, matmul_s = bounds()
        mixed = ({"executed_gflop_per_image_by_precision":
                  {p: round(g, 4) for p, g in gop_by_precision.items()}}
                 if len(gop_by_precision) > 1 else {})
        return {"peak_gops": round(total / peak_s, 2),
                "peak_fraction": round(images_per_s * peak_s, 4),
                "achievable_gops": round(total / matmul_s, 2),
                "roofline_fraction": round(images_per_s * matmul_s, 4), **mixed}

    def reference(self, batch: int) -> SpeedRecord:
        """ONNX Runtime fp32's engine-only record at ``batch`` in this run."""
        key = (*REFERENCE, batch)
        if key not in self.engine_only_records:
            self.engine_only(*REFERENCE, batch)
        return self.engine_only_records[key]

    def engine_only(self, backend: str, precision: str, batch: int,
                    timer: Timer | None = None) -> SpeedRecord:
        key = (backend, precision, batch)
        if timer is None and key in self.engine_only_records:  # measured once per run
            return self.engine_only_records[key]
        runner = self.runner_for(backend, precision)
        x = self.input_for(batch)
        self.ceilings()
        stats = summarize(self._sample(lambda: runner.run(x), timer), batch)
        ips, median = stats["images_per_s"], stats["images_per_s_median"]
        if (backend, precision) == REFERENCE:
            ref, ref_median = ips, median
        else:
            r = self.reference(batch)
            ref, ref_median = r.images_per_s, r.images_per_s_median
        saved = float(runner.info.get("conv_gop_saved_per_image") or 0.0)
        executed = self.gflop_per_image - saved
        by_precision = {precision: executed}
        if runner.info.get("float32_convolutions"):  # an int8 engine's float32 layers
            direct = float(runner.info["float32_direct_gop_per_image"])
            by_precision = {precision: self.gflop_per_image - direct,
                            "fp32": float(runner.info["float32_executed_gop_per_image"])}
        rec = self._record("engine-only", runner, stats,
                           gflop_per_image=self.gflop_per_image,
                           gflops=ips * self.gflop_per_image, onnxruntime_images_per_s=ref,
                           onnxruntime_images_per_s_median=ref_median,
                           ratio_vs_onnxruntime=median / ref_median,
                           executed_gflop_per_image=round(executed, 4) if saved else None,
                           **self._fractions(runner, by_precision, ips))
        self.engine_only_records[key] = rec
        return rec

    def end_to_end(self, backend: str, precision: str, batch: int, images: list[ImageRecord],
                   post: Postprocessor, preprocess: PreprocessSettings,
                   timer: Timer | None = None) -> SpeedRecord:
        """``images`` (at least two batches: decoding one overlaps the engine on the other)
        through the whole data path; latencies per batch, comparable with engine-only.

        The engine-only time it is divided by is measured in between: as many engine-only
        calls as a round has batches (untimed by ``timer``) before each end-to-end round and
        after the last. Not the engine-only record: that one may be minutes old, and on a
        shared machine the drift between two moments can exceed the data path's cost (SSD300
        TVM fp32 at batch 8: the data path costs ~11% in a quiet process, yet one run read
        0.82 against an old record). Interleaved, a slow stretch of the host that covers some
        rounds slows both sides alike; timed in two halves around the end-to-end rounds, as
        before, a stretch that covered those rounds only was charged to the data path."""
        runner = self.runner_for(backend, precision)
        n = len(images)

        def job() -> None:
            dets, _ = predict(runner, images, post, preprocess, batch)
            if len(dets) != n:
                raise AssertionError(f"got detections for {len(dets)} images, expected {n}")

        x = self.input_for(batch)
        engine: list[float] = []

        def engine_call() -> None:
            engine.extend(measure(lambda: runner.run(x), 0, -(-n // batch)))

        samples = [t * batch / n for t in self._sample(job, timer, engine_call)]
        engine_call()
        engine_median = batch / float(np.median(engine))
        stats = summarize(samples, batch)
        return self._record("end-to-end", runner, stats,
                            engine_only_images_per_s=batch / float(np.mean(engine)),
                            engine_only_images_per_s_median=engine_median,
                            engine_only_rounds=len(engine),
                            ratio_vs_engine_only=stats["images_per_s_median"] / engine_median,
                            images_per_call=n)


def first_batch(images: list[ImageRecord], settings: PreprocessSettings,
                size: int) -> np.ndarray:
    """The first ``size`` images, preprocessed: what engine-only timing feeds the runners."""
    return next(batches(images[:size], size, settings)).array


def speed_log_for(bundle: ModelBundle, first: np.ndarray, settings: BenchSettings
                  ) -> SpeedLog:
    """A :class:`SpeedLog` for ``bundle``'s runners, fed with the preprocessed batch ``first``
    (its images repeated to fill larger batches); GFLOP per image from the simplified ONNX."""
    return SpeedLog(bundle.runner, lambda b: tile_batch(first, b), settings,
                    conv_gflop_per_image(str(bundle.artifacts.simplified_onnx_path)),
                    bundle.spec.provenance(),
                    lambda: measure_ceilings(bundle.artifacts.store, bundle.threads))


def write_records(path: Path, records: list[SpeedRecord]) -> Path:
    """The records file (``bench`` and the main job): records plus the machine they ran on.
    ``report`` reads it, as it reads pytest-benchmark's JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": RECORDS_FORMAT, "machine": machine_info(),
                                "records": [r.as_dict() for r in records]}, indent=1))
    return path
