"""The accuracy run under torchrun: 2 processes on one host and 2 "nodes" on localhost give
the single-process metrics exactly; mismatched ranks, a hung rank and a dead rank end the run
with one line and no metric."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssd_pipeline.postprocess import Detections
from ssd_pipeline.suite.distributed import (
    World,
    detections_to_rows,
    rows_to_detections,
    shard,
)
from tests.helpers import child_env

pytestmark = pytest.mark.distributed

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
COMPARED = ("per_class", "num_detections")


def test_shards_are_whole_batches_covering_every_image_once():
    recs = list(range(23))  # 3 batches of 8, the last one partial
    parts = [shard(recs, 8, World(r, 2)) for r in range(2)]
    assert parts[0] == (recs[0:8] + recs[16:23], [0, 2])
    assert parts[1] == (recs[8:16], [1])
    # more ranks than batches: the extra ranks get nothing, nobody gets twice
    many = [shard(recs, 8, World(r, 5))[0] for r in range(5)]
    assert sorted(x for p in many for x in p) == recs and many[3] == many[4] == []


def test_detections_travel_as_numbers_exactly():
    rng = np.random.default_rng(0)
    dets = [Detections(7, rng.random((3, 4), dtype=np.float32) * 600,
                       rng.random(3, dtype=np.float32), np.array([0, 5, 79]),
                       np.array([1, 6, 90])),
            Detections(9, np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                       np.zeros(0, np.int64), np.zeros(0, np.int64))]
    back = rows_to_detections(*detections_to_rows(dets))
    assert [d.img_id for d in back] == [7, 9]
    for a, b in zip(dets, back, strict=True):
        for field in ("boxes", "scores", "labels", "category_ids"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
            assert getattr(a, field).dtype == getattr(b, field).dtype


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluate_args(store, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "ssd-pipeline"), "evaluate", "--threads", "1", "--quiet",
            "--cache-dir", str(store.root), "--output", str(out), *extra]


def run(cmd: list[str], timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=child_env(**env), cwd=REPO)


def torchrun(*args: str) -> list[str]:
    return [str(BIN / "torchrun"), *args]


def assert_same_metrics(single: Path, multi: Path, world: int) -> None:
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert [(r["backend"], r["precision"]) for r in a] == [(r["backend"], r["precision"])
                                                            for r in b]
    for x, y in zip(a, b, strict=True):
        keys = [k for k in x["metrics"] if k.startswith("bbox_") or k in COMPARED]
        assert {k: y["metrics"][k] for k in keys} == {k: x["metrics"][k] for k in keys}, \
            f"{x['backend']}: {world} processes differ from one"
        assert y["detections_sha256"] == x["detections_sha256"]  # every box, bit for bit
        assert y["world_size"] == world and sum(y["images_per_rank"]) == x["num_images"]
        assert y["threads_per_rank"] == [1] * world


@pytest.fixture(scope="module")
def single_tiny(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "single.json"
    p = run(evaluate_args(store, out, "--model", "tiny", "--backends", "onnxruntime,tvm",
                          "--batch-size", "8"))
    assert p.returncode == 0, p.stderr
    return out


def test_two_processes_equal_one(store, tmp_path, single_tiny):
    out = tmp_path / "two.json"
    p = run(torchrun("--standalone", "--nproc-per-node", "2",
                     *evaluate_args(store, out, "--model", "tiny", "--backends",
                                    "onnxruntime,tvm", "--batch-size", "8")))
    assert p.returncode == 0, p.stderr
    assert_same_metrics(single_tiny, out, 2)
    assert p.stdout.count("| onnxruntime | fp32 |") == 1  # rank 0 alone reports


def node_cmds(store, outs: list[Path], extra: list[list[str]], port: int) -> list[list[str]]:
    return [torchrun("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                     "--master-addr", "127.0.0.1", "--master-port", str(port),
                     *evaluate_args(store, outs[rank], *extra[rank]))
            for rank in range(2)]


def run_nodes(cmds: list[list[str]], timeout: float = 600, **env: str
              ) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=child_env(**env), cwd=REPO) for c in cmds]
    done = []
    for proc, cmd in zip(procs, cmds, strict=True):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


def test_two_nodes_on_localhost_equal_one(store, tmp_path, single_tiny):
    outs = [tmp_path / "node0.json", tmp_path / "node1.json"]
    args = ["--model", "tiny", "--backends", "onnxruntime,tvm", "--batch-size", "8"]
    results = run_nodes(node_cmds(store, outs, [args, args], free_port()))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr + results[1].stderr
    assert_same_metrics(single_tiny, outs[0], 2)
    assert not outs[1].exists()  # records are written once, by rank 0


def test_more_ranks_than_batches(store, tmp_path):
    args = ["--model", "tiny", "--backends", "onnxruntime", "--batch-size", "8",
            "--max-images", "8"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert run(evaluate_args(store, one, *args)).returncode == 0
    p = run(torchrun("--standalone", "--nproc-per-node", "2", *evaluate_args(store, two, *args)))
    assert p.returncode == 0, p.stderr
    assert_same_metrics(one, two, 2)
    assert json.loads(two.read_text())[0]["images_per_rank"] == [8, 0]


def test_random_init_ssd300_on_generated_coco(store, tmp_path):
    from ssd_pipeline.data import COCO80_CATEGORY_IDS
    from ssd_pipeline.synthetic import make_coco_set

    make_coco_set(tmp_path / "coco", "val2017", 12, seed=31,
                  categories=[(c, f"class{c}") for c in COCO80_CATEGORY_IDS])
    args = ["--model", "ssd300", "--backends", "onnxruntime", "--precisions", "fp32",
            "--batch-size", "4", "--datasets-dir", str(tmp_path / "coco")]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    p = run(evaluate_args(store, one, *args))
    assert p.returncode == 0, p.stderr
    p = run(torchrun("--standalone", "--nproc-per-node", "2", *evaluate_args(store, two, *args)))
    assert p.returncode == 0, p.stderr
    assert_same_metrics(one, two, 2)


def error_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error: ")]


def test_mismatched_rank_refuses_to_start(store, tmp_path):
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    base = ["--model", "tiny", "--backends", "onnxruntime"]
    results = run_nodes(node_cmds(store, outs, [[*base, "--batch-size", "8"],
                                                [*base, "--batch-size", "4"]], free_port()))
    assert all(r.returncode != 0 for r in results)
    lines = error_lines(results[0].stderr) + error_lines(results[1].stderr)
    assert lines and all("rank 1 differs from rank 0 in batch_size: batch_size is 4 on rank 1, "
                         "8 on rank 0" in ln for ln in lines), lines
    assert not outs[0].exists() and not outs[1].exists()


def run_with_fault(store, out: Path, fault: str) -> subprocess.CompletedProcess:
    """Two processes on the embedded model with the fault drill ``fault`` (RANK:exit|hang)."""
    return run(torchrun("--standalone", "--nproc-per-node", "2",
                        *evaluate_args(store, out, "--model", "tiny", "--backends",
                                       "onnxruntime", "--dist-timeout", "10")),
               timeout=300, SSD_PIPELINE_FAULT=fault)


def test_hung_rank_is_named_within_the_timeout(store, tmp_path):
    p = run_with_fault(store, tmp_path / "hang.json", "1:hang")
    assert p.returncode != 0
    (line,) = error_lines(p.stderr)
    assert "Ranks 1 failed to pass monitoredBarrier" in line and "no metric" in line
    assert not (tmp_path / "hang.json").exists()


def test_dead_rank_ends_the_run_without_a_metric(store, tmp_path):
    p = run_with_fault(store, tmp_path / "dead.json", "1:exit")
    assert p.returncode != 0
    assert "rank 1: fault drill" in p.stderr and "exitcode  : 3" in p.stderr
    assert not (tmp_path / "dead.json").exists()


def pytest_args(records: Path, *extra: str) -> list[str]:
    return ["-m", "pytest", "tests/test_accuracy.py", "-m", "accuracy", "--models", "tiny",
            "--backends", "onnxruntime", "--threads", "1", "--batch-size", "8",
            "--records-dir", str(records), "-q", "-p", "no:cacheprovider", *extra]


@pytest.mark.parametrize("floor, status", [("0.60", 0), ("0.99", 1)])
def test_pytest_under_torchrun_every_rank_exits_with_rank0s_verdict(tmp_path, single_tiny,
                                                                     floor, status):
    """Two "nodes" (one torchrun each, so each rank's own exit status is seen): the gathered
    metric equals one process's; a floor rank 0 fails fails both ranks."""
    port = free_port()
    cmds = [torchrun("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                     "--master-addr", "127.0.0.1", "--master-port", str(port),
                     *pytest_args(tmp_path, "--expect",
                                  f"accuracy.ssd_tiny_synthetic.map_min={floor}"))
            for rank in range(2)]
    results = run_nodes(cmds)
    assert [r.returncode != 0 for r in results] == [bool(status)] * 2, \
        results[0].stdout[-2000:] + results[1].stdout[-2000:]
    assert "rank 1 of 2 ran its share of the images" in results[1].stdout
    records = json.loads((tmp_path / "accuracy.json").read_text())
    ort = next(r for r in records if r["backend"] == "onnxruntime")
    ref = next(r for r in json.loads(single_tiny.read_text()) if r["backend"] == "onnxruntime")
    assert ort["world_size"] == 2
    assert {k: v for k, v in ort["metrics"].items() if k.startswith("bbox_")} == \
        {k: v for k, v in ref["metrics"].items() if k.startswith("bbox_")}


def test_aggregate_throughput_of_two_processes(store, tmp_path):
    """``bench`` under torchrun: all ranks' images over the longest rank's time, one file."""
    out = tmp_path / "tp.json"
    p = run(torchrun("--standalone", "--nproc-per-node", "2", str(BIN / "ssd-pipeline"),
                     "bench", "--model", "tiny", "--backends", "onnxruntime", "--precisions",
                     "fp32", "--threads", "1",
                     "--perf-batches", "2", "--perf-seconds", "1", "--cache-dir",
                     str(store.root), "--output", str(out)))
    assert p.returncode == 0, p.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["processes"] == 2 and row["threads_per_process"] == 1
    assert row["images"] == sum(row["calls_per_rank"]) * 2 and min(row["calls_per_rank"]) > 0
    assert row["aggregate_images_per_s"] == pytest.approx(row["images"] / row["seconds"],
                                                          rel=1e-2)
    assert p.stdout.count("| onnxruntime | fp32 | 2 | 2 x 1 |") == 1


def test_threads_are_shared_among_a_hosts_ranks(monkeypatch):
    from ssd_pipeline.core import host

    monkeypatch.setattr(host.os, "sched_getaffinity", lambda _: set(range(8)))
    for local, threads in [("1", 8), ("2", 4), ("3", 2), ("16", 1), ("junk", 8)]:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert host.default_threads() == threads
