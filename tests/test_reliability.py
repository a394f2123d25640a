"""Concurrent runs build each artifact once; repeated runs give identical metrics."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import child_env

ROOT = Path(__file__).resolve().parent.parent

SLOW_BUILD = """
import sys, time
from ssd_pipeline.core.cache import ArtifactStore
def build(tmp):
    time.sleep(2)
    (tmp / "a.txt").write_text("built")
d = ArtifactStore(sys.argv[1]).get_or_build("shared", {"k": 1}, build)
print((d / "a.txt").read_text())
"""


def test_two_processes_build_once(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_BUILD, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert outs == ["built", "built"]
    events = [json.loads(ln) for ln in (tmp_path / "events.jsonl").read_text().splitlines()]
    done = [e for e in events if e["event"] == "build-done"]
    assert len(done) == 1, events
    assert len({e["pid"] for e in events}) == 1, "only the builder logs build events"


def test_xdist_workers_share_artifacts(tmp_path):
    """pytest -n 2 on a fresh cache: both workers need the embedded model's ONNX; it is
    exported once (the other worker waits on the lock and finds it)."""
    cache = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider",
         "tests/test_parity.py", "-k", "onnx_vs_torch", "--models", "tiny",
         "--cache-dir", str(cache)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=child_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 passed" in proc.stdout, proc.stdout[-2000:]
    events = [json.loads(ln) for ln in (cache / "events.jsonl").read_text().splitlines()]
    for stage in ("onnx", "onnx-simplified"):
        done = [e for e in events if e["stage"] == stage and e["event"] == "build-done"]
        assert len(done) == 1, f"{stage} built {len(done)} times: {events}"


def test_accuracy_is_deterministic(bundles, store):
    from ssd_pipeline.suite.evaluate import accuracy_record

    tiny = bundles("tiny")
    dataset = tiny.dataset(max_images=24)
    runs = [accuracy_record(tiny.runner("onnxruntime"), dataset,
                            tiny.postprocessor(dataset.cat_ids), tiny.settings, 8,
                            {"weights": "determinism"})["metrics"] for _ in range(2)]
    assert runs[0] == runs[1]


def test_accuracy_records_survive_xdist(tmp_path):
    """pytest -n 2: each worker writes its records in files of their own and the session
    merges them; every (model, backend, precision) of the run is in accuracy.json, once."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider",
         "tests/test_accuracy.py", "-m", "accuracy", "--models", "tiny", "--backends",
         "torch,onnxruntime,tvm", "--precisions", "fp32", "--max-images", "16",
         "--batch-size", "8", "--records-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=child_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    records = json.loads((tmp_path / "accuracy.json").read_text())
    got = sorted((r["model"], r["backend"], r["precision"]) for r in records)
    assert got == [("tiny", b, "fp32") for b in ("onnxruntime", "torch", "tvm")], got
    assert all(r["num_images"] == 16 for r in records)


def test_perf_under_xdist_is_a_usage_error_and_plain_n_deselects_it():
    base = [sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider",
            "--collect-only"]
    bad = subprocess.run([*base, "-m", "perf"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=child_env())
    assert bad.returncode == 4, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "run the perf tests without -n" in bad.stderr
    plain = subprocess.run([*base, "tests/test_perf.py"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env=child_env())
    assert "perf tests are deselected under -n" in plain.stdout, plain.stdout[-2000:]
    assert "test_engine_only" not in plain.stdout, plain.stdout[-2000:]


def test_a_plain_run_times_batches_1_and_8_and_perf_by_name_adds_32():
    """The default run is CI's and must fit its time on a slow host: its speed tests take
    batch 1 and 8; -m perf (the README's table) adds 32; --perf-batches wins over both."""
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
            "tests/test_perf.py", "-k", "test_engine_only and onnxruntime-fp32"]

    def batches(*extra: str) -> list[str]:
        out = subprocess.run([*base, *extra], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env=child_env())
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return sorted(re.findall(r"\[(bs\d+)-", out.stdout))

    assert batches() == ["bs1", "bs8"]
    assert batches("-m", "perf") == ["bs1", "bs32", "bs8"]
    assert batches("--perf-batches", "2") == ["bs2"]


def test_runs_sharing_a_records_dir_keep_their_own_records(tmp_path):
    """A second pytest session started while one runs, on the same --records-dir (a test that
    starts pytest, a second terminal), neither deletes nor mixes the first one's records."""
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "tests/test_accuracy.py", "-m", "accuracy", "--models", "tiny", "--precisions",
            "fp32", "--batch-size", "8", "--records-dir", str(tmp_path)]
    # the slow session has ~15x the work of the quick one, so it finishes last
    slow = subprocess.Popen([*base, "--backends", "torch,onnxruntime,tvm", "--max-images",
                             "48"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env())
    quick = subprocess.run([*base, "--backends", "onnxruntime", "-k", "test_accuracy[",
                            "--max-images", "8"],
                           cwd=ROOT, capture_output=True, text=True, timeout=900,
                           env=child_env())
    assert quick.returncode == 0, quick.stdout[-2000:]
    out, _ = slow.communicate(timeout=900)
    assert slow.returncode == 0, out[-2000:]
    records = json.loads((tmp_path / "accuracy.json").read_text())
    backends = sorted(r["backend"] for r in records)
    # the last session to finish wrote the file: the slow one, with all of its records
    assert backends == ["onnxruntime", "torch", "tvm"], backends
    assert not (tmp_path / "accuracy.parts").exists()
