"""Root conftest: every option of the suite, the report header, and the session fixtures that
build artifacts once per run (content-keyed cache, shared by xdist workers via file locks)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from ssd_pipeline.core.errors import UserError

# What the session shares through ``config.stash`` (not private attributes on config).
EXPECTATIONS = pytest.StashKey[Any]()
ACCURACY_RECORDS = pytest.StashKey[list]()
ACCURACY_PATH = pytest.StashKey[Path]()
SESSION_ID = pytest.StashKey[str]()  # one per run, shared by its xdist workers
WORLD = pytest.StashKey[Any]()  # this process's place under torchrun (World; size 1 without)


def under_xdist(config: pytest.Config) -> bool:
    """Tests run in xdist workers (the controller with -n, or a worker itself)."""
    return bool(getattr(config.option, "numprocesses", None)) or hasattr(config, "workerinput")


def selects_perf(markexpr: str) -> bool:
    """-m asks for perf tests by name (``perf``, ``perf and ...``), not ``not perf``."""
    return bool(re.search(r"(?<!not )\bperf\b", markexpr or ""))


def perf_batches(config: pytest.Config) -> str:
    """--perf-batches, else the sweep the run asks for: 1,8,32 (the README's table) under
    -m perf; 1,8 in a plain run, which is CI's and must fit its time on a slow host (bs 32's
    engine-only cases are ~11 min of a 2-core Zen 3's run)."""
    if config.option.perf_batches is not None:
        return config.option.perf_batches
    return "1,8,32" if selects_perf(config.option.markexpr) else "1,8"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("ssd_pipeline")
    g.addoption("--weight", default=os.environ.get("SSD300_WEIGHT"),
                help="SSD300 checkpoint (ssd300_coco_20210803_015428-d231a06e.pth); default "
                     "$SSD300_WEIGHT. Without it: seeded random-init weights (accuracy skips)")
    g.addoption("--trust-checkpoint", action="store_true",
                help="unpickle --weight fully (it can run code) instead of torch's weights-only "
                     "load; only for files you trust. Recorded in every record")
    g.addoption("--cfg", default=None, help="mmdet config (default: the packaged SSD300 one)")
    g.addoption("--calib-images", default=os.environ.get("CALIB_IMAGES_DIR"),
                help="SSD300 int8: calibration images never scored (e.g. a few hundred COCO "
                     "train2017 images; default $CALIB_IMAGES_DIR). Without them, SSD300 int8 "
                     "accuracy skips (random-init SSD300 calibrates on generated images)")
    g.addoption("--datasets-dir", default=os.environ.get("DATASETS_DIR"),
                help="COCO root with annotations/instances_val2017.json (default $DATASETS_DIR)")
    g.addoption("--max-images", type=int, default=None, help="accuracy on the first N images")
    g.addoption("--models", default="ssd300,tiny",
                help="models the accuracy and parity tests cover (default ssd300,tiny: tiny is "
                     "the embedded trained model and runs anywhere)")
    g.addoption("--backends", default=None,
                help="comma list of backends (default: every registered one)")
    g.addoption("--precisions", default=None,
                help="comma list of precisions (default: every one each backend offers; one "
                     "this CPU lacks is reported as a skip with the reason)")
    g.addoption("--batch-size", type=int, default=32, help="accuracy batch size (original: 32)")
    g.addoption("--threads", type=int, default=None, help="threads per backend (default: nproc)")
    g.addoption("--cache-dir", default=None,
                help="artifact cache (default $SSD_PIPELINE_CACHE or ~/.cache/ssd_pipeline)")
    g.addoption("--expectations", default=None, help="expectations TOML (default fixtures/)")
    g.addoption("--expect", action="append", default=[], metavar="KEY=VALUE",
                help="override one expectation, e.g. accuracy.ssd300_coco.map_50_min=0.44")
    g.addoption("--perf-model", default="ssd300",
                help="the model the perf tests time (default ssd300; tiny: the embedded model, "
                     "with its own floors)")
    g.addoption("--perf-batches", default=None,
                help="batch sizes of the perf tests (default: 1,8,32 under -m perf, 1,8 in a "
                     "run that does not ask for perf by name, as a plain pytest and CI do)")
    g.addoption("--perf-e2e-batches", default="1,8",
                help="batch sizes of the end-to-end perf tests (default 1,8)")
    g.addoption("--perf-seconds", type=float, default=3.0,
                help="target seconds per benchmark measurement (rounds are sized to it)")
    g.addoption("--perf-min-rounds", type=int, default=5,
                help="minimum benchmark rounds (default 5: the gates' medians then ignore two "
                     "preempted rounds)")
    g.addoption("--perf-warmup", type=int, default=1, help="warm-up calls before timing")
    g.addoption("--records-dir", default="out",
                help="where accuracy records (accuracy.json) are written (default ./out)")
    g.addoption("--perf-baseline", default=None, metavar="FILE",
                help="a saved --benchmark-json (or records file): fail a speed test whose ratio "
                     "to ONNX Runtime falls more than regression.ratio_drop_max below it")
    g.addoption("--accuracy-baseline", default=None, metavar="FILE",
                help="a saved accuracy.json: fail an accuracy test whose 12 COCO stats fall more "
                     "than regression.stat_drop_max below it (same data required)")
    g.addoption("--dist-timeout", type=float, default=300.0,
                help="under torchrun: seconds a rank waits for the others (accuracy tests)")
    g.addoption("--require-data", action="store_true",
                help="fail (not skip) tests whose data or checkpoint is missing: for CI gating")


def pytest_report_header(config: pytest.Config) -> list[str]:
    from ssd_pipeline.core.cache import default_cache_dir
    from ssd_pipeline.core.host import STACK, cap_summary, default_threads, versions

    opt = config.option
    stack = ", ".join(f"{k} {v}" for k, v in versions(*STACK).items())
    return [
        f"ssd_pipeline: {stack}",
        f"ssd_pipeline: backends={','.join(selected_backends(config))} "
        f"precisions={opt.precisions or 'all'} threads={opt.threads or default_threads()} "
        f"cache={opt.cache_dir or default_cache_dir()}",
        f"ssd_pipeline: weights={opt.weight or 'random-init (no --weight)'} "
        f"checkpoint_load={'trusted' if opt.trust_checkpoint else 'weights_only'} "
        f"datasets_dir={opt.datasets_dir or '(unset)'} require_data={opt.require_data}",
        *(f"ssd_pipeline: override {e}" for e in opt.expect),
        *([f"ssd_pipeline: {capped}"] if (capped := cap_summary()) else []),
        *(["ssd_pipeline: perf tests are deselected under -n (pytest-benchmark is off in xdist "
           "workers): run 'pytest -m perf' without -n"] if under_xdist(config) else []),
    ]


def pytest_configure(config: pytest.Config) -> None:
    import uuid

    worker = getattr(config, "workerinput", None)
    config.stash[SESSION_ID] = worker["ssd_session"] if worker else uuid.uuid4().hex[:12]
    try:
        sizes = [config.option.batch_size] + ([config.option.threads]
                                              if config.option.threads is not None else [])
        if any(v <= 0 for v in sizes):
            raise UserError("--batch-size and --threads must be positive")
        from ssd_pipeline.core.expectations import Expectations

        config.stash[EXPECTATIONS] = Expectations.load(config.option.expectations,
                                                       config.option.expect)
        selected_backends(config)
        from ssd_pipeline.core.host import cap_summary

        cap_summary()  # an unknown ONEDNN_MAX_CPU_ISA level: one line, before any test
    except UserError as e:
        raise pytest.UsageError(str(e)) from None
    from ssd_pipeline.suite.distributed import World, env_world_size, init_world

    config.stash[WORLD] = World()
    if env_world_size() > 1:
        if under_xdist(config):
            raise pytest.UsageError("torchrun and -n do not mix: under torchrun each rank is "
                                    "one process; drop -n")
        try:
            # every rank runs the same session; the accuracy tests shard their images over
            # the ranks and rank 0 alone judges (see test_accuracy.py)
            config.stash[WORLD] = init_world(config.option.dist_timeout)
        except UserError as e:
            raise pytest.UsageError(str(e)) from None
    if under_xdist(config) and selects_perf(config.option.markexpr):
        raise pytest.UsageError(
            "-m perf under -n: pytest-benchmark is off in xdist workers, so every speed test "
            "would skip and the run would be green; run the perf tests without -n")


def selected_backends(config: pytest.Config) -> list[str]:
    """--backends checked against the registry (the only list of backends)."""
    from ssd_pipeline.backends import select

    try:
        return select(config.option.backends)
    except UserError as e:
        raise pytest.UsageError(str(e)) from None


def precision_cases(config: pytest.Config, names: list[str]) -> list[Any]:
    """(backend, precision) params: every precision each backend offers, narrowed by
    --precisions; one this CPU cannot run is a skip that says why, never a vanished case."""
    from ssd_pipeline.backends import cases, get_backend

    try:
        pairs = cases(names, config.option.precisions, available_only=False)
    except UserError as e:
        raise pytest.UsageError(str(e)) from None
    params = []
    for name, precision in pairs:
        why = get_backend(name).unavailable(precision)
        marks = [pytest.mark.skip(reason=f"{name}/{precision}: {why}")] if why else []
        params.append(pytest.param(name, precision, marks=marks, id=f"{name}-{precision}"))
    return params


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The one place that turns --models, --backends and --precisions into test cases.

    ``backend_name`` runs once per selected backend; ``compared_backend`` once per selected
    backend but torch (the reference it is compared with); with ``precision``, once per
    precision that backend offers. A test about one backend says so with
    ``@pytest.mark.backend("tvm")``: its ``precision`` runs over that backend's precisions,
    and it is deselected when the backend is not selected (pytest_collection_modifyitems).
    """
    if "model_name" in metafunc.fixturenames:
        from ssd_pipeline.suite.models import MODELS

        chosen = [m.strip() for m in metafunc.config.option.models.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in MODELS]
        if unknown:
            raise pytest.UsageError(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
        metafunc.parametrize("model_name", chosen)
    for arg, option in (("perf_batch", "perf_batches"), ("e2e_batch", "perf_e2e_batches")):
        if arg in metafunc.fixturenames:
            raw = (perf_batches(metafunc.config) if option == "perf_batches"
                   else getattr(metafunc.config.option, option))
            try:
                sizes = [int(b) for b in raw.split(",") if b]
            except ValueError:
                raise pytest.UsageError(f"--{option.replace('_', '-')}: expected "
                                        f"comma-separated integers, got {raw!r}") from None
            if not sizes or min(sizes) <= 0:
                raise pytest.UsageError(f"--{option.replace('_', '-')}: batch sizes must be "
                                        "positive")
            metafunc.parametrize(arg, sizes, ids=[f"bs{b}" for b in sizes])
    selected = selected_backends(metafunc.config)
    for arg, skip in (("backend_name", ()), ("compared_backend", ("torch",))):
        if arg not in metafunc.fixturenames:
            continue
        names = [n for n in selected if n not in skip]
        if "precision" in metafunc.fixturenames:
            metafunc.parametrize((arg, "precision"), precision_cases(metafunc.config, names))
        else:
            metafunc.parametrize(arg, names)
        return
    marker = metafunc.definition.get_closest_marker("backend")
    if marker and "precision" in metafunc.fixturenames:
        params = precision_cases(metafunc.config, [marker.args[0]])
        metafunc.parametrize("precision", [pytest.param(*p.values[1:], marks=p.marks, id=p.id)
                                           for p in params])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the tests about a backend that --backends left out, and the speed tests
    under -n (they could only skip there; the summary says so)."""
    selected = set(selected_backends(config))
    xdist = under_xdist(config)
    keep, drop = [], []
    for item in items:
        needs = {m.args[0] for m in item.iter_markers("backend")}
        is_perf = xdist and item.get_closest_marker("perf") is not None
        (keep if needs <= selected and not is_perf else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """CPU model, flags that matter, TVM target, thread count and library versions."""
    from ssd_pipeline.core.host import machine_info as host_info

    machine_info["ssd_pipeline"] = host_info()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config
                            ) -> None:
    records = config.stash.get(ACCURACY_RECORDS, None)
    if records:
        from ssd_pipeline.suite.evaluate import format_table

        terminalreporter.section("ssd_pipeline accuracy")
        terminalreporter.write_line(format_table(records))
        terminalreporter.write_line(f"records: {config.stash[ACCURACY_PATH]}")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: every worker writes its records under its controller's session id."""
    node.workerinput["ssd_session"] = node.config.stash[SESSION_ID]


def _parts_dir(config: pytest.Config) -> Path:
    # per session: runs that share a records dir (a test starting pytest, a second terminal)
    # never mix or delete each other's records
    return Path(config.option.records_dir) / "accuracy.parts" / config.stash[SESSION_ID]


def write_record_part(config: pytest.Config, record: dict[str, Any]) -> None:
    """One accuracy record per (model, backend, precision), in a file of its own (written
    atomically): xdist workers never overwrite each other's; the session merges them."""
    import json

    d = _parts_dir(config)
    d.mkdir(parents=True, exist_ok=True)
    name = f"{record['model']}-{record['backend']}-{record['precision']}.json"
    tmp = d / f".{name}.{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, d / name)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Merge this session's accuracy records (from every worker) into accuracy.json; under
    torchrun every rank ends with rank 0's exit status (rank 0 judged the metrics)."""
    config = session.config
    world = config.stash.get(WORLD, None)
    if world is not None and world.distributed:
        from ssd_pipeline.suite.distributed import broadcast_status, close_world

        try:
            session.exitstatus = broadcast_status(world, int(exitstatus))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        close_world(world)
    parts = _parts_dir(config)
    if hasattr(config, "workerinput") or not parts.is_dir():
        return
    import json
    import shutil

    records = [json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))]
    out = Path(config.option.records_dir) / "accuracy.json"
    out.write_text(json.dumps(records, indent=1))
    shutil.rmtree(parts, ignore_errors=True)
    with contextlib.suppress(OSError):  # the last session out removes the empty parent
        parts.parent.rmdir()
    config.stash[ACCURACY_RECORDS] = records
    config.stash[ACCURACY_PATH] = out


def progress_stream(config: pytest.Config) -> Any:
    """Where a long test shows its progress (images done, img/s, ETA): the real terminal,
    past pytest's capture, when there is one and no xdist worker shares it; else nowhere."""
    import sys

    tty = sys.__stderr__ is not None and sys.__stderr__.isatty()
    return sys.__stderr__ if tty and not under_xdist(config) else False


def missing_data(config: pytest.Config, reason: str) -> None:
    """Skip with ``reason``, or fail under --require-data (a gate that did not run)."""
    if config.option.require_data:
        pytest.fail(f"--require-data: {reason}", pytrace=False)
    pytest.skip(reason)


# ---------------------------------------------------------------- session fixtures


@pytest.fixture(scope="session")
def expectations(pytestconfig: pytest.Config) -> Any:
    return pytestconfig.stash[EXPECTATIONS]


@pytest.fixture(scope="session")
def store(pytestconfig: pytest.Config) -> Any:
    from ssd_pipeline.core.cache import ArtifactStore

    try:
        return ArtifactStore(pytestconfig.option.cache_dir)
    except UserError as e:
        pytest.exit(f"error: {e}", returncode=4)


@pytest.fixture(scope="session")
def bundles(pytestconfig: pytest.Config, store: Any, expectations: Any) -> Any:
    """``bundles(name)``: a :class:`ModelBundle` (artifacts, config, runners), built once.
    ``ssd300`` takes --cfg/--weight; ``tiny`` is the embedded model with its own weights."""
    from ssd_pipeline.suite.models import MODELS, resolve_bundle

    opt = pytestconfig.option
    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            own = MODELS[name].embedded  # the embedded model brings its own config and weights
            try:
                cache[name] = resolve_bundle(
                    name, expectations, store, weight=None if own else opt.weight,
                    cfg=None if own else opt.cfg, trust_checkpoint=opt.trust_checkpoint,
                    threads=opt.threads, calib_images=None if own else opt.calib_images)
            except UserError as e:
                pytest.exit(f"error: {e}", returncode=4)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def ssd300(bundles: Any) -> Any:
    return bundles("ssd300")


@pytest.fixture(scope="session")
def model_spec(ssd300: Any) -> Any:
    return ssd300.spec


@pytest.fixture(scope="session")
def artifacts(ssd300: Any) -> Any:
    return ssd300.artifacts


@pytest.fixture(scope="session")
def mmdet_cfg(ssd300: Any) -> Any:
    return ssd300.cfg


@pytest.fixture(scope="session")
def preprocess_settings(ssd300: Any) -> Any:
    return ssd300.settings


@pytest.fixture(scope="session")
def runners(ssd300: Any) -> Any:
    """``runners(name, precision)``: an SSD300 runner, prepared once per session."""
    return ssd300.runner


@pytest.fixture(scope="session")
def sample_set(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Four synthetic images of different sizes and aspect ratios, COCO-format."""
    from ssd_pipeline.data import CocoDetectionSet
    from ssd_pipeline.synthetic import make_coco_set

    root = tmp_path_factory.mktemp("samples")
    ann = make_coco_set(root, "val2017", 4, seed=11,
                        sizes=[(640, 480), (427, 640), (500, 500), (1000, 250)])
    return CocoDetectionSet(ann, root / "images" / "val2017")


@pytest.fixture(scope="session")
def sample_batch(sample_set: Any, preprocess_settings: Any) -> Any:
    """The sample images preprocessed into one batch (with their metas)."""
    from ssd_pipeline.data import batches

    return next(batches(sample_set.images, len(sample_set), preprocess_settings))


@pytest.fixture(scope="session")
def head_outputs(bundles: Any, sample_batch: Any) -> Any:
    """``head_outputs(model, backend, precision="fp32")``: raw outputs on the sample batch,
    computed once per session (the references the parity tests compare against)."""
    cache: dict[tuple[str, str, str], Any] = {}

    def get(model: str, backend: str, precision: str = "fp32") -> Any:
        key = (model, backend, precision)
        if key not in cache:
            cache[key] = bundles(model).runner(backend, precision).run(sample_batch.array)
        return cache[key]

    return get
