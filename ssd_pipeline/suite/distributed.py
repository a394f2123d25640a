"""The accuracy run over several processes or hosts (torchrun, torch.distributed), one metric.

Each rank takes whole batches of the single-process run (batch ``i`` goes to rank
``i % world``), so batch composition and last-batch padding are the same as in one process;
with the same threads per process the detections are identical. Detections and every other
exchanged value travel as tensors (numbers, or UTF-8 JSON bytes): nothing from another rank or
host is ever unpickled. The metric is computed once, on rank 0, over all images in the
annotation file's order.

Before any work the ranks compare fingerprints (weights, config, ONNX, engine, library
versions, CPU flags, data, batch size, threads) and refuse to start when one differs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np

from ..backends import Runner
from ..core.cache import file_sha256
from ..core.errors import UserError
from ..core.host import STACK, cpu_flags, versions
from ..data import CocoDetectionSet, ImageRecord
from ..postprocess import Detections

DEFAULT_TIMEOUT_S = 300.0
# Fault drill: "RANK:exit" or "RANK:hang" makes that rank die or stop before its first batch,
# so the failure paths can be exercised (tests, or a user checking their cluster's set-up).
FAULT_ENV = "SSD_PIPELINE_FAULT"


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank ``rank`` of ``size`` (1: no torch.distributed)."""

    rank: int = 0
    size: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """The world size torchrun set (1 when not launched by it)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"WORLD_SIZE={raw!r} is not an integer: launch with torchrun") from None


def init_world(timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the process group torchrun describes (gloo: CPU tensors; a rank that does not
    answer within ``timeout_s`` ends every collective with an error)."""
    size = env_world_size()
    if size <= 1:
        return World(timeout_s=timeout_s)
    import torch.distributed as dist

    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as e:
            raise UserError(f"cannot join the torch.distributed group (rank "
                            f"{os.environ.get('RANK', '?')} of {size}): {first_line(e)}") from None
    return World(dist.get_rank(), dist.get_world_size(), timeout_s)


def close_world(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


@contextlib.contextmanager
def collective(world: World, what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into one line naming this rank and the step."""
    try:
        yield
    except (RuntimeError, ConnectionError) as e:
        raise UserError(
            f"rank {world.rank} of {world.size}: {what} failed: {first_line(e)} (a peer rank "
            f"died, hung past --dist-timeout {world.timeout_s:g} s, or lost its connection); "
            "no metric is reported") from None


def wait_for_all(world: World) -> None:
    """Every rank arrives here, or rank 0 raises naming the ranks that did not within the
    timeout (gloo's monitored barrier), instead of a bare transport timeout later."""
    import torch.distributed as dist

    dist.monitored_barrier(timeout=timedelta(seconds=world.timeout_s), wait_all_ranks=True)


def gather_arrays(world: World, array: np.ndarray) -> list[np.ndarray]:
    """Every rank's 2-D float64 ``array`` (rows may differ per rank), in rank order."""
    import torch
    import torch.distributed as dist

    array = np.ascontiguousarray(array, dtype=np.float64)
    width = array.shape[1]
    n = torch.tensor([array.shape[0]], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world.size)]
    dist.all_gather(sizes, n)
    rows = [int(s.item()) for s in sizes]
    longest = max([*rows, 1])
    padded = torch.zeros((longest, width), dtype=torch.float64)
    padded[: array.shape[0]] = torch.from_numpy(array)
    parts = [torch.zeros((longest, width), dtype=torch.float64) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return [p[:r].numpy() for p, r in zip(parts, rows, strict=True)]


def gather_json(world: World, value: Any) -> list[Any]:
    """Every rank's JSON-able ``value``, in rank order (UTF-8 bytes in a tensor; no pickle)."""
    raw = np.frombuffer(json.dumps(value, sort_keys=True).encode(), dtype=np.uint8)
    return [json.loads(bytes(p[:, 0].astype(np.uint8)).decode())
            for p in gather_arrays(world, raw.reshape(-1, 1).astype(np.float64))]


def check_same_setup(world: World, fingerprint: Callable[[], dict[str, Any]]) -> None:
    """Refuse to start, on every rank, when any rank's fingerprint differs from rank 0's.
    ``fingerprint`` is called only under torchrun (hashing builds the ONNX, which a
    single-process torch-only run never needs)."""
    if not world.distributed:
        return
    mine = fingerprint()
    with collective(world, "comparing the ranks' setups"):
        wait_for_all(world)
        prints = gather_json(world, mine)
    for rank, other in enumerate(prints[1:], start=1):
        diff = sorted(k for k in set(prints[0]) | set(other) if prints[0].get(k) != other.get(k))
        if diff:
            k = diff[0]
            raise UserError(f"rank {rank} differs from rank 0 in {', '.join(diff)}: {k} is "
                            f"{_short(other.get(k))} on rank {rank}, {_short(prints[0].get(k))}"
                            " on rank 0; every rank must run the same weights, artifacts, "
                            "libraries, CPU flags, data and settings")


# flags an engine's code or a kernel choice depends on; the rest of /proc/cpuinfo may differ
_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni",
          "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


def setup_fingerprint(weights: str, onnx_path: Any, runners: list[Runner],
                      dataset: CocoDetectionSet, batch_size: int) -> dict[str, Any]:
    """What must be the same on every rank for their detections to be one run's."""
    def identity(info: dict[str, Any]) -> dict[str, Any]:
        # an engine directory is named by the hash of what it was built from: compare that,
        # not where the cache lives or how long the build took
        out = {k: v for k, v in info.items() if k not in ("engine", "compile_s")}
        if "engine" in info:
            out["engine_key"] = os.path.basename(str(info["engine"]))
        return out

    flags = cpu_flags()
    return {"weights": weights, "onnx_sha256": file_sha256(onnx_path),
            "runners": [identity(r.info) for r in runners], "versions": versions(*STACK),
            "cpu_flags": [f for f in _FLAGS if f in flags],
            "dataset_sha256": file_sha256(dataset.ann_file), "num_images": len(dataset),
            "batch_size": batch_size}


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


def fault_drill(world: World) -> None:
    """Die or hang here when ``$SSD_PIPELINE_FAULT`` names this rank (see FAULT_ENV)."""
    raw = os.environ.get(FAULT_ENV)
    if not raw or not world.distributed:
        return
    rank, _, action = raw.partition(":")
    if action not in ("exit", "hang") or not rank.isdigit():
        raise UserError(f"{FAULT_ENV}={raw!r}: expected RANK:exit or RANK:hang")
    if int(rank) == world.rank:
        import sys
        import time

        print(f"rank {world.rank}: fault drill ({FAULT_ENV}={raw})", file=sys.stderr)
        if action == "exit":
            os._exit(3)
        time.sleep(10 * world.timeout_s)  # far past every peer's timeout


def shard(records: list[ImageRecord], batch_size: int, world: World
          ) -> tuple[list[ImageRecord], list[int]]:
    """This rank's images (whole batches ``rank, rank + world, ...`` of the single-process
    order) and the batch indices they form; a rank with no batch gets none."""
    n_batches = -(-len(records) // batch_size)
    mine = list(range(world.rank, n_batches, world.size))
    return [r for b in mine for r in records[b * batch_size:(b + 1) * batch_size]], mine


DET_COLUMNS = 8  # img_id, x1, y1, x2, y2, score, label, category_id


def detections_to_rows(dets: list[Detections]) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, detection rows) of one rank: float64 holds the float32 boxes and scores
    and the integer ids exactly."""
    ids = np.array([[d.img_id] for d in dets], dtype=np.float64).reshape(-1, 1)
    rows = [np.column_stack([np.full(len(d), d.img_id, np.float64), d.boxes.astype(np.float64),
                             d.scores.astype(np.float64), d.labels.astype(np.float64),
                             d.category_ids.astype(np.float64)]) for d in dets if len(d)]
    return ids, (np.concatenate(rows) if rows else np.zeros((0, DET_COLUMNS)))


def rows_to_detections(ids: np.ndarray, rows: np.ndarray) -> list[Detections]:
    """Inverse of :func:`detections_to_rows` (images without detections kept, in ``ids``
    order; each image's detections in the order its rank produced them)."""
    img_ids = ids[:, 0].astype(np.int64)
    by_img: dict[int, list[int]] = {int(i): [] for i in img_ids}
    for k, img in enumerate(rows[:, 0].astype(np.int64)):
        by_img[int(img)].append(k)
    out = []
    for img in img_ids:
        r = rows[by_img[int(img)]]
        out.append(Detections(int(img), r[:, 1:5].astype(np.float32),
                              r[:, 5].astype(np.float32), r[:, 6].astype(np.int64),
                              r[:, 7].astype(np.int64)))
    return out


def gather_detections(world: World, dets: list[Detections]) -> list[Detections]:
    """Every rank's detections, on every rank, in rank order."""
    if not world.distributed:
        return dets
    ids, rows = detections_to_rows(dets)
    with collective(world, "gathering detections"):
        wait_for_all(world)
        all_ids = gather_arrays(world, ids)
        all_rows = gather_arrays(world, rows)
    return [d for i, r in zip(all_ids, all_rows, strict=True) for d in rows_to_detections(i, r)]


def broadcast_status(world: World, status: int) -> int:
    """Rank 0's exit status, on every rank."""
    if not world.distributed:
        return status
    import torch
    import torch.distributed as dist

    t = torch.tensor([status], dtype=torch.int64)
    with collective(world, "sharing rank 0's verdict"):
        dist.broadcast(t, src=0)
    return int(t.item())


THROUGHPUT_FORMAT = "ssd_pipeline.throughput/1"


def aggregate_throughput(world: World, run: Any, batch: int, seconds: float
                         ) -> dict[str, Any]:
    """Images per second of all ranks together calling ``run()`` (one batch a call) for about
    ``seconds``, started together (a barrier) and counted until the last rank stops: the
    Offline-scenario figure of P processes x T threads."""
    import time

    run()  # warm-up
    if world.distributed:
        with collective(world, "starting the throughput run"):
            wait_for_all(world)
    t0 = time.perf_counter()
    calls = 0
    while True:
        run()
        calls += 1
        if time.perf_counter() - t0 >= seconds:
            break
    mine = {"calls": calls, "seconds": time.perf_counter() - t0}
    ranks = [mine]
    if world.distributed:
        with collective(world, "gathering throughput counts"):
            ranks = gather_json(world, mine)
    images = sum(r["calls"] for r in ranks) * batch
    span = max(r["seconds"] for r in ranks)
    return {"batch": batch, "processes": world.size, "images": images,
            "seconds": round(span, 3), "aggregate_images_per_s": round(images / span, 3),
            "calls_per_rank": [r["calls"] for r in ranks]}
