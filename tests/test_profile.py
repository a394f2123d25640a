"""Per-layer profile (``ssd-pipeline profile``): every convolution is seen, its operations
add up to what the ONNX graph says, and backends without a profiler say so."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ssd_pipeline.cli import main
from ssd_pipeline.core.onnxfile import load_onnx
from ssd_pipeline.core.timing import conv_gflop_per_image, conv_gop, in_bounds_taps
from ssd_pipeline.suite.profile import PROFILE_FORMAT, format_profile, profile_runner
from tests.helpers import head_groups

BATCH = 4


def onnx_conv_count(path) -> int:
    return sum(n.op_type == "Conv" for n in load_onnx(path).graph.node)


@pytest.mark.parametrize("hw, out, k, s, p, d", [
    ((19, 19), (19, 19), (3, 3), (1, 1), (6, 6), (6, 6)),  # SSD300's conv6
    ((19, 19), (10, 10), (3, 3), (2, 2), (1, 1), (1, 1)),
    ((1, 1), (1, 1), (3, 3), (1, 1), (1, 1), (1, 1)),  # a 1x1 level's head: the centre only
    ((7, 9), (3, 5), (3, 2), (2, 2), (0, 1), (1, 2)),
])
def test_conv_gop_counts_the_taps_inside_the_input(hw, out, k, s, p, d):
    """Counted as torch counts it: a convolution of ones with an all-ones kernel sums, at each
    output, the taps that land inside the input (the padding is zeros)."""
    import torch

    ones = torch.nn.functional.conv2d(torch.ones(1, 1, *hw), torch.ones(1, 1, *k), stride=s,
                                      padding=p, dilation=d)
    assert tuple(ones.shape[2:]) == out
    assert conv_gop(2, hw, out, k, 3, 5, s, p, d) == pytest.approx(
        2 * 2 * float(ones.sum()) * 3 * 5 / 1e9)
    if hw == (19, 19) and d == (6, 6):
        assert in_bounds_taps(19, 19, 3, 1, 6, 6) == 13 + 19 + 13


@pytest.mark.parametrize("auto_pad, torch_pad", [("SAME_UPPER", (1, 2, 1, 2)),
                                                  ("SAME_LOWER", (2, 1, 2, 1)),
                                                  ("VALID", (0, 0, 0, 0))])
def test_graph_count_reads_auto_pad(tmp_path, auto_pad, torch_pad):
    """A Conv with ``auto_pad`` (no explicit pads) is counted on the pads ONNX gives it: for
    SAME_UPPER the odd padding pixel goes at the end, for SAME_LOWER at the start (a 4x4
    kernel on 8x8: 3 pixels of padding per axis; counted as if unpadded, 26 taps per axis
    instead of 28)."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 2, 4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad=auto_pad)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph), path)
    ones = torch.nn.functional.conv2d(
        torch.nn.functional.pad(torch.ones(1, 1, 8, 8), torch_pad), torch.ones(1, 1, 4, 4))
    assert conv_gflop_per_image(str(path)) == pytest.approx(2 * float(ones.sum()) * 2 * 4 / 1e9)


@pytest.mark.parametrize("backend", ["tvm", "onnxruntime", "openvino"])
def test_profile_sees_every_convolution(backend, bundles, sample_batch):
    bundle = bundles("tiny")
    onnx_path = bundle.artifacts.simplified_onnx_path
    record = profile_runner(bundle.runner(backend), sample_batch.array, BATCH, 2,
                            bundle.spec.provenance())
    rows = record["rows"]
    convs = [r for r in rows if r["op"] == "conv"]
    # each backend takes a conv(+bias)(+relu) whole; TVM runs a level's two heads as one
    merged = sum(len(g) - 1 for g in head_groups(load_onnx(onnx_path).graph))
    assert len(convs) == onnx_conv_count(onnx_path) - (merged if backend == "tvm" else 0)
    # FLOP from the runtime's shapes against FLOP from ONNX shape inference for the batch:
    # equal for OpenVINO; ONNX Runtime's NCHWc kernels and TVM's merged heads compute channels
    # padded to whole blocks (e.g. 324 -> 328 on AVX2, 40 -> 48), so they report that work, a
    # little more. The peers' profiles have no pads, so they count the taps on padding too;
    # TVM counts what it executes: in-bounds taps, and the engine record's Winograd saving
    # per image less
    runner = bundle.runner(backend)
    saved = runner.info.get("conv_gop_saved_per_image", 0.0)
    assert (saved > 0) == (backend == "tvm"), runner.info
    graph_gop = (conv_gflop_per_image(str(onnx_path), padding_taps=backend != "tvm")
                 - saved) * BATCH
    if backend == "openvino":
        assert record["conv_gop"] == pytest.approx(graph_gop, rel=1e-3)
    else:
        assert graph_gop * (1 - 1e-3) <= record["conv_gop"] <= graph_gop * 1.05
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
    assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=1e-3)
    assert record["profiled_total_ms"] == pytest.approx(sum(r["ms"] for r in rows), rel=1e-3)
    assert all(r["gops_per_s"] > 0 for r in convs)
    assert record["format"] == PROFILE_FORMAT and record["batch"] == BATCH
    table = format_profile(record, top=5)
    assert len([line for line in table.splitlines() if line.startswith("| ")]) >= 5 + 1
    # TVM's Winograd calls say where their time went; no other row, and no peer, has phases
    timed = [r for r in rows if "phases_ms" in r]
    assert [r["index"] for r in timed] == [r["index"] for r in convs
                                           if r["name"].startswith("Winograd")]
    assert bool(timed) == (backend == "tvm") and bool(record["winograd"]) == bool(timed)
    for r in timed:
        ph = r["phases_ms"]
        assert ph["products"] > 0 and ph["input_transform"] > 0 and ph["output_transform"] > 0
        # medians of parts need not sum to the median of the whole: a margin, not an equality
        assert sum(ph.values()) <= 1.3 * r["ms"] + 0.05, r
        assert r["products_gops_per_s"] >= r["gops_per_s"]
        # the tiny model's transformed weights are small: each thread's own chunks, a matmul
        assert r["products_by"] == "matmul", r
    if timed:
        w = record["winograd"]
        assert w["calls"] == len(timed) and 0 < w["transforms_share"] < 1
        assert w["products_ms"] == pytest.approx(sum(r["phases_ms"]["products"] for r in timed),
                                                 abs=1e-2)
        assert "Winograd in / products / out ms" in table


def test_profile_cli_writes_json(tmp_path, capsys, store):
    out = tmp_path / "p.json"
    rc = main(["profile", "--model", "tiny", "--batch", "2", "--rounds", "2", "--top", "3",
               "--cache-dir", str(store.root), "--output", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["backend"] == "tvm" and record["batch"] == 2
    assert record["by_op"]["conv"]["calls"] == len([r for r in record["rows"]
                                                    if r["op"] == "conv"])
    assert "oneDNN conv" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["--backend", "torch"], "has no per-layer profiler"),  # torch.profiler: not wired
    (["--backend", "tvm,onnxruntime"], "one backend at a time"),
    (["--batch", "0"], "--batch must be positive"),
    (["--backend", "nope"], "unknown backend 'nope'"),
])
def test_profile_refusals(args, needle, capsys):
    assert main(["profile", "--model", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, want", [
    ({"avx2", "fma"}, {"fp32": "fma_avx2", "int8": "int8_avx2", "bf16": None}),
    ({"avx2", "fma", "avx_vnni"}, {"int8": "int8_avx_vnni"}),
    ({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"},
     {"fp32": "fma_avx512", "int8": "int8_avx512_vnni", "bf16": "bf16_avx512"}),
    ({"sse4_2"}, {"fp32": None, "int8": None}),
])
def test_peak_loop_follows_the_cpu_flags(flags, want):
    """Each precision's peak is measured with the widest instruction this CPU has for it
    (a VNNI CPU is not judged against the AVX2 int8 loop), and none where it has none."""
    from ssd_pipeline.engine.peak import peak_kernel

    for precision, kernel in want.items():
        assert peak_kernel(precision, frozenset(flags)) == kernel, precision


def test_peak_loops_run_every_multiply_add_they_count(store):
    """Each peak loop computes the number of multiply-adds its ops/s is counted from. A loop
    whose result reads fewer accumulators than it counts lets the compiler drop the others:
    the AVX-512 loops once ran one chain of 12 and reported 3x this CPU's peak."""
    import tvm_ffi

    from ssd_pipeline.core.host import cpu_flags
    from ssd_pipeline.engine.kernels import build_peak
    from ssd_pipeline.engine.peak import PEAK_KERNELS

    lib = tvm_ffi.load_module(str(build_peak(store)))
    flags = cpu_flags()
    kinds = [k for loops in PEAK_KERNELS.values() for k, need in loops if need <= flags]
    assert kinds, "this CPU has none of the peak loops' instruction sets"
    for kind in kinds:
        assert lib.peak_check(kind, 1000) == 1.0, kind


def test_ceilings_are_measured_for_this_cpu(store):
    """Every precision this CPU has a peak loop for gets a peak and a oneDNN ceiling, both
    positive and each the per-thread sum it claims to be (no timing limit is asserted)."""
    from ssd_pipeline.engine.peak import measure_ceilings, peak_kernel

    ceilings = measure_ceilings(store, threads=1, seconds=0.05)
    for p in ("fp32", "bf16", "int8"):
        assert (p in ceilings) == (peak_kernel(p) is not None), p
    for c in ceilings.values():
        assert c.threads == 1 and c.peak_gops > 0 and c.achievable_gops > 0
        assert c.peak_kernel == peak_kernel(c.precision)
