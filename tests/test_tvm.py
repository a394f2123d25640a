"""The TVM engine: parity with ONNX Runtime per precision, cache behaviour, and refusals."""

from __future__ import annotations

import json
import shutil

import pytest

from ssd_pipeline.core.errors import UserError
from ssd_pipeline.engine.compile import EngineSpec, build_engine, cached_engine, load_engine
from tests.helpers import assert_detection_parity, assert_raw_parity, head_groups

pytestmark = pytest.mark.backend("tvm")


def tolerance_table(precision: str) -> str:
    from ssd_pipeline.core.gates import parity_table

    return parity_table(precision)


@pytest.fixture(scope="session")
def ort_outputs(head_outputs):
    return head_outputs("ssd300", "onnxruntime")


@pytest.mark.parity
def test_tvm_vs_onnx_raw_outputs(model_name, precision, bundles, sample_batch,
                                 head_outputs, expectations, record_property):
    tvm = bundles(model_name).runner("tvm", precision)
    key = f"{tolerance_table(precision)}.raw_rel_err_max"
    assert_raw_parity(tvm.run(sample_batch.array), head_outputs(model_name, "onnxruntime"),
                      tvm.output_names, expectations.number(key), expectations.source(key),
                      record_property)


@pytest.mark.parity
def test_tvm_vs_onnx_detections(model_name, precision, bundles, sample_batch,
                                head_outputs, expectations, record_property):
    table = tolerance_table(precision)
    b = bundles(model_name)
    if precision != "fp32" and b.spec.checkpoint is None:
        pytest.skip("random-init weights saturate the class scores (hundreds of near-ties at "
                    "~0.99): which boxes survive NMS is decided below bf16's precision; the "
                    "raw-output parity runs, and the trained models check detections")
    postprocessor = b.postprocessor()
    got = postprocessor(b.runner("tvm", precision).run(sample_batch.array), sample_batch.metas)
    ref = postprocessor(head_outputs(model_name, "onnxruntime"), sample_batch.metas)
    assert_detection_parity(got, ref, expectations.number(f"{table}.det_iou_min"),
                            expectations.number(f"{table}.det_score_atol"),
                            postprocessor.score_thr, record_property,
                            expectations.number(f"{table}.det_match_min"),
                            postprocessor.max_per_img)


def test_heads_of_one_level_are_one_convolution(model_name, bundles, sample_batch):
    """Each level's class and box heads run as one convolution (stacked output channels,
    zero-padded to oneDNN's block of 16), and the runner hands out each ONNX output as its
    channel slice, in the ONNX order and shape."""
    import numpy as np
    import onnx
    import tvm

    from ssd_pipeline.engine.patterns import OC_BLOCK

    b = bundles(model_name)
    graph = onnx.load(str(b.artifacts.simplified_onnx_path), load_external_data=False).graph
    groups = head_groups(graph)
    assert len(groups) == 6 and all(len(g) == 2 for g in groups), groups
    runner = b.runner("tvm")
    record = runner.engine.record
    slices = record["output_slices"]
    assert len(slices) == len(record["outputs"]) == 12
    assert len(record["output_layouts"]) == 6
    for g in groups:
        (f0, a0, e0), (f1, a1, e1) = (slices[record["outputs"].index(n)] for n in g)
        assert f0 == f1 and a0 == 0 and e0 == a1 < e1, (g, slices)
    x = np.ascontiguousarray(sample_batch.array[:1])
    merged = runner.engine.vm["main"](tvm.runtime.tensor(x))
    assert all(o.shape[3] % OC_BLOCK == 0 for o in merged), [o.shape for o in merged]
    widths = {o.name: o.type.tensor_type.shape.dim[1].dim_value for o in graph.output}
    got = runner.run(x)
    assert [o.shape[1] for o in got] == [widths[n] for n in record["outputs"]]


def test_every_convolution_is_offloaded(model_name, bundles):
    """Every Conv of the ONNX model and every max pool is a oneDNN call (a level's two heads
    one call; a pool may be written by the Winograd convolution it reads); so are the larger
    layout permutes in front of the outputs."""
    import onnx

    from ssd_pipeline.engine.kernels import (
        CONV2D_NHWC,
        CONV2D_NHWC_ADD,
        L2NORM_NHWC,
        MAX_POOL2D_NHWC,
    )

    b = bundles(model_name)
    graph = onnx.load(str(b.artifacts.simplified_onnx_path), load_external_data=False).graph
    convs = sum(n.op_type == "Conv" for n in graph.node)
    pools = sum(n.op_type == "MaxPool" for n in graph.node)
    ops = b.runner("tvm").engine.record["relax_ops"]
    assert "relax.nn.conv2d" not in ops and "relax.nn.max_pool2d" not in ops, ops
    shim_convs = sum(ops.get(f"{f}{how}", 0) for f in (CONV2D_NHWC, CONV2D_NHWC_ADD)
                     for how in ("", ":winograd"))
    merged = sum(len(g) - 1 for g in head_groups(graph))
    assert shim_convs == convs - merged, (ops, convs, merged)
    # a pool that alone reads a Winograd convolution's ReLU is written by that call
    fused = ops.get(f"{MAX_POOL2D_NHWC}:fused", 0)
    assert ops.get(MAX_POOL2D_NHWC, 0) + fused == pools > 0, (ops, pools)
    # L2Norm is one shim call and the heads come back channels-last: the one permute left
    # is the input's NCHW -> NHWC
    assert ops.get(L2NORM_NHWC) == 1 and ops.get("relax.permute_dims") == 1, ops
    assert not {"relax.power", "relax.sum", "relax.divide"} & set(ops), ops
    assert set(b.runner("tvm").engine.record["output_layouts"]) == {"NHWC"}
    # every ReLU follows a convolution or a residual block's add, and runs inside its call
    assert "relax.nn.relu" not in ops, ops


def test_winograd_runs_where_it_measured_faster(model_name, precision, bundles):
    """Exactly the 3x3 stride-1 convolutions at or above this CPU's measured cuts for the
    precision (fp32: ``WINOGRAD_F4_CUTS`` for F(4x4, 3x3), else ``WINOGRAD_CUTS`` for F(2x2,
    3x3); bf16: ``WINOGRAD_BF16_CUTS``, F(2x2) only; int8: none with VNNI, without it the
    F(4x4) ones at or above ``INT8_FLOAT_WINOGRAD_CUTS`` too, which stay float32; a level's
    merged heads as one convolution; dilated ones, pads at most the dilation, F(4x4) only and
    where ``WINOGRAD_DILATED_ISAS`` lists this CPU) are Winograd calls, and the engine record
    counts the GOP they execute against their direct form (what the perf records' peak
    fractions read)."""
    import onnx

    from ssd_pipeline.core.host import has_vnni
    from ssd_pipeline.core.timing import conv_gflop_per_image, conv_gop
    from ssd_pipeline.engine.compile import (
        INT8_FLOAT_WINOGRAD_CUTS,
        WINOGRAD_DILATED_ISAS,
        winograd_cuts,
        winograd_gop,
        winograd_isa,
    )
    from ssd_pipeline.engine.kernels import CONV2D_NHWC, CONV2D_NHWC_ADD
    from ssd_pipeline.engine.patterns import OC_BLOCK

    b = bundles(model_name)
    path = str(b.artifacts.simplified_onnx_path)
    model = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    # a float engine's head group is one convolution with the group's output channels (an
    # int8 engine keeps its heads apart)
    width = {n.output[0]: weights[n.input[1]][0] for n in model.graph.node
             if n.op_type == "Conv"}
    for g in head_groups(model.graph) if precision != "int8" else ():
        total = sum(width.pop(name) for name in g)
        width[g[0]] = total + -total % OC_BLOCK
    isa = winograd_isa()
    tiles: list[int] = []
    executed = direct = 0.0
    for node in model.graph.node:
        if node.op_type != "Conv" or node.output[0] not in width:
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        _, c, kh, kw = weights[node.input[1]]
        o = width[node.output[0]]
        oh, ow = shapes[node.output[0]][2:]
        d = a.get("dilations", [1, 1])
        if not ((kh, kw) == (3, 3) and a.get("strides", [1, 1]) == [1, 1] and d[0] == d[1]
                and all(0 <= p <= d[0] for p in a.get("pads", [0] * 4))
                and a.get("group", 1) == 1):
            continue
        if d[0] > 1 and (precision == "bf16" or isa not in WINOGRAD_DILATED_ISAS):
            continue
        for tile in (4, 2) if precision != "int8" else () if has_vnni() else (4,):
            if d[0] > 1 and tile != 4:
                continue
            cuts = winograd_cuts(tile, precision == "bf16")
            if precision == "int8" and cuts:  # float32 layers of an int8 engine without VNNI
                cuts = tuple(max(a, b) for a, b in zip(cuts, INT8_FLOAT_WINOGRAD_CUTS,
                                                               strict=True))
            if cuts and min(c, o) >= cuts[0] and min(oh, ow) >= cuts[1]:
                tiles.append(tile)
                executed += winograd_gop(oh, ow, c, o, tile, d[0])
                direct += conv_gop(1, shapes[node.input[0]][2:], (oh, ow), (3, 3), c, o,
                                   pads=a.get("pads", [0] * 4)[:2], dilations=d)
                break
    record = b.runner("tvm", precision).engine.record
    ops, wino = record["relax_ops"], record["winograd"]
    got = ops.get(f"{CONV2D_NHWC}:winograd", 0) + ops.get(f"{CONV2D_NHWC_ADD}:winograd", 0)
    assert got == len(tiles), (ops, tiles)
    if not tiles:  # int8, and bf16 where this CPU has no bf16 cut (AVX2)
        assert wino is None, wino
        return
    assert got == wino["convolutions"], (ops, wino)
    assert wino["f4x4_convolutions"] == tiles.count(4)
    assert wino["executed_gop_per_image"] == pytest.approx(executed, abs=1e-3)
    assert wino["direct_gop_per_image"] == pytest.approx(direct, abs=1e-3)
    assert wino["executed_gop_per_image"] < wino["direct_gop_per_image"] \
        <= conv_gflop_per_image(path)
    # 36 products per 4x4 tile, 16 per 2x2 one, against 9 per output: 1/4 to 4/9 where every
    # side divides (the edge tiles of other sides compute outputs that are not stored)
    assert 1 / 4 - 1e-3 <= wino["executed_gop_per_image"] / wino["direct_gop_per_image"] < 0.6


def test_winograd_gop_counts_the_products_of_each_tile():
    """F(2x2, 3x3): 16 products per 2x2 outputs; F(4x4, 3x3): 36 per 4x4; a partial edge tile
    costs a whole one (19x19 outputs: 10x10 tiles of 2x2, 5x5 of 4x4); dilated, each phase is
    tiled as the largest."""
    from ssd_pipeline.engine.compile import winograd_gop

    assert winograd_gop(38, 38, 1, 1) == pytest.approx(2 * 16 * 19 * 19 / 1e9)
    assert winograd_gop(38, 38, 1, 1, 4) == pytest.approx(2 * 36 * 10 * 10 / 1e9)
    assert winograd_gop(19, 19, 2, 3, 2) == pytest.approx(2 * 16 * 100 * 6 / 1e9)
    assert winograd_gop(19, 19, 2, 3, 4) == pytest.approx(2 * 36 * 25 * 6 / 1e9)
    # dilated by 6: 6 x 6 phases of at most ceil(19 / 6) = 4 rows and columns, a 4x4 tile each
    # (2x2: two a side)
    assert winograd_gop(19, 19, 2, 3, 4, 6) == pytest.approx(2 * 36 * 36 * 6 / 1e9)
    assert winograd_gop(19, 19, 2, 3, 2, 6) == pytest.approx(2 * 16 * 36 * 4 * 6 / 1e9)


def test_bf16_engine_keeps_activations_in_bf16(model_name, bundles):
    """bf16: every ReLU convolution (a residual block's conv -> add -> ReLU among them) and
    every max pool writes bfloat16, and each reader of those (the next convolution, a
    residual block's add, a pool, L2Norm) takes it as is: no float32 copy is left, and no add
    or ReLU runs outside the shim."""
    import onnx

    from ssd_pipeline.core.host import cpu_flags
    from ssd_pipeline.engine.kernels import MAX_POOL2D_NHWC

    if "avx512_bf16" not in cpu_flags():
        pytest.skip("bf16 engines need avx512_bf16 (this CPU has none)")
    b = bundles(model_name)
    model = onnx.load(str(b.artifacts.simplified_onnx_path), load_external_data=False)
    conv_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Conv"}
    block_outputs = {n.output[0] for n in model.graph.node
                     if n.op_type == "Add" and conv_outputs & set(n.input)}
    want = sum(n.op_type == "MaxPool" or (n.op_type == "Relu"
                                          and n.input[0] in conv_outputs | block_outputs)
               for n in model.graph.node)
    record = b.runner("tvm", "bf16").engine.record
    # a pool fused into its convolution: one bfloat16 tensor for the ReLU and the pool
    want -= record["relax_ops"].get(f"{MAX_POOL2D_NHWC}:fused", 0)
    assert record["bf16_activations"] == want > 10, (record["bf16_activations"], want)
    assert not {"relax.astype", "relax.add", "relax.nn.relu"} & set(record["relax_ops"]), \
        record["relax_ops"]


def test_winograd_engine_equals_direct_engine(artifacts, sample_batch, expectations):
    """The same model compiled with and without Winograd gives the same raw outputs within
    the fp32 tolerance (Winograd's own error per layer: F(2x2, 3x3) ~1e-6, F(4x4, 3x3) ~1e-5
    relative)."""
    from ssd_pipeline.backends.tvm_backend import TvmRunner

    runs = []
    for winograd in (True, False):
        spec = EngineSpec(winograd=winograd)
        engine = cached_engine(artifacts.store, artifacts.simplified_onnx_path, spec)
        assert bool(engine.record["winograd"]) is winograd
        runs.append(TvmRunner(engine, spec, 2, engine.record["outputs"]))
    got, ref = (r.run(sample_batch.array) for r in runs)
    assert_raw_parity(got, ref, runs[0].output_names,
                      expectations.number("parity.fp32.raw_rel_err_max"), "Winograd vs direct")


def test_aligned_batches_run_without_a_copy(bundles, sample_batch, monkeypatch):
    """The suite's batches are 64-byte aligned and the runner hands them to TVM as they are;
    a batch TVM cannot wrap (numpy's own 16-byte alignment) is copied, with the same result."""
    import numpy as np
    import tvm

    from ssd_pipeline.data import aligned_empty

    runner = bundles("tiny").runner("tvm")
    batch = sample_batch.array
    assert batch.ctypes.data % 64 == 0 and aligned_empty((3, 5), np.uint8).ctypes.data % 64 == 0
    copies: list[int] = []
    copy = tvm.runtime.tensor
    monkeypatch.setattr(tvm.runtime, "tensor", lambda *a, **k: copies.append(1) or copy(*a, **k))
    want = [o.copy() for o in runner.run(batch)]
    assert not copies
    raw = np.empty(batch.size + 16, np.float32)
    start = next(i for i in range(16) if (raw.ctypes.data + 4 * i) % 64 == 16)
    unaligned = raw[start:start + batch.size].reshape(batch.shape)
    unaligned[...] = batch
    got = runner.run(unaligned)
    assert copies == [1]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_engine_is_built_once_and_reused(artifacts, store, model_spec, expectations):
    from ssd_pipeline.artifacts.chain import ModelArtifacts

    cached_engine(store, artifacts.simplified_onnx_path, EngineSpec())
    before = [e for e in store.events() if e["stage"] == "tvm-engine"]
    fresh = ModelArtifacts(model_spec, store, expectations.number("simplify.rel_err_max"))
    engine = cached_engine(store, fresh.simplified_onnx_path, EngineSpec())
    after = [e for e in store.events() if e["stage"] == "tvm-engine"]
    assert before == after, "a second session rebuilt an engine it had in the cache"
    assert engine.record["onnx_sha256"]


def test_static_batch_engine(artifacts, sample_batch, ort_outputs, expectations, tmp_path):
    """The original's static shape (input:N,3,300,300); a wrong batch is refused."""
    from ssd_pipeline.backends.tvm_backend import TvmRunner

    spec = EngineSpec(batch=len(sample_batch.array))
    engine = cached_engine(artifacts.store, artifacts.simplified_onnx_path, spec)
    runner = TvmRunner(engine, spec, 2, engine.record["outputs"])
    assert_raw_parity(runner.run(sample_batch.array), ort_outputs, runner.output_names,
                      expectations.number("parity.fp32.raw_rel_err_max"), "static batch")
    with pytest.raises(UserError, match="built for batch"):
        runner.run(sample_batch.array[:1])


def test_engine_for_another_spec_is_refused(artifacts, tmp_path):
    engine = cached_engine(artifacts.store, artifacts.simplified_onnx_path, EngineSpec())
    with pytest.raises(UserError, match="offload 'dnnl' \\(expected 'none'\\)"):
        load_engine(engine.path, EngineSpec(offload="none"))
    with pytest.raises(UserError, match="batch None \\(expected 4\\)"):
        load_engine(engine.path, EngineSpec(batch=4))
    forged = tmp_path / "old"
    shutil.copytree(engine.path, forged)
    record = json.loads((forged / "engine.json").read_text())
    record["spec"]["tvm"] = "0.19.0"
    (forged / "engine.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match=r"tvm '0\.19\.0'"):
        load_engine(forged, EngineSpec())
    with pytest.raises(UserError, match="not an engine directory"):
        load_engine(tmp_path / "nothing", EngineSpec())


@pytest.mark.parametrize("kind", ["unknown_target", "bad_precision", "bad_batch"])
def test_bad_engine_specs(kind):
    args = {"unknown_target": {"target": "tpu"}, "bad_precision": {"precision": "int4"},
            "bad_batch": {"batch": 0}}[kind]
    with pytest.raises(UserError):
        EngineSpec(**args)


def test_corrupt_onnx_is_refused(tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(UserError, match="not a readable ONNX model"):
        build_engine(bad, EngineSpec(offload="none"), tmp_path)


def relu_onnx(path, shape, opset):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def test_onnx_of_another_input_shape_is_refused(tmp_path):
    path = relu_onnx(tmp_path / "other.onnx", [1, 3, 224, 224], 13)
    with pytest.raises(UserError, match=r"shape \[1, 3, 224, 224\], expected \[N, 3, 300, 300\]"):
        build_engine(path, EngineSpec(offload="none"), tmp_path)


@pytest.mark.parametrize("opset", [7, 99])
def test_onnx_of_an_unsupported_opset_is_refused(tmp_path, opset):
    path = relu_onnx(tmp_path / "old.onnx", ["N", 3, 300, 300], opset)
    with pytest.raises(UserError, match=f"opset {opset} is outside"):
        build_engine(path, EngineSpec(offload="none"), tmp_path)


@pytest.mark.slow
def test_tvm_codegen_without_offload_matches(artifacts, sample_batch, ort_outputs, tmp_path,
                                             expectations):
    """Everything in TVM-generated code (no oneDNN): slow (tens of seconds per image) but the
    reference for what the compiler itself computes."""
    from ssd_pipeline.backends.tvm_backend import TvmRunner

    spec = EngineSpec(offload="none", batch=1)
    build_engine(artifacts.simplified_onnx_path, spec, tmp_path)
    engine = load_engine(tmp_path, spec)
    runner = TvmRunner(engine, spec, 2, engine.record["outputs"])
    got = runner.run(sample_batch.array[:1])
    assert_raw_parity(got, [o[:1] for o in ort_outputs], runner.output_names,
                      expectations.number("parity.fp32.raw_rel_err_max"), "TVM codegen")


@pytest.mark.slow
def test_cuda_fp16_engine_compiles(artifacts, tmp_path, record_property):
    """The CUDA build path compiles here; loading it needs a GPU, and without one it is
    refused in one line that says so."""
    import tvm

    spec = EngineSpec(target="cuda", precision="fp16", batch=32)
    record = build_engine(artifacts.simplified_onnx_path, spec, tmp_path)
    size = (tmp_path / "engine.so").stat().st_size
    record_property("cuda_fp16_engine", {"bytes": size, "compile_s": record["compile_s"]})
    assert size > 1e6 and record["spec"]["tvm_target"].startswith("{")
    if tvm.cuda(0).exist:
        pytest.skip("this machine has a CUDA GPU: the refusal below is for machines without")
    with pytest.raises(UserError, match="TVM sees no CUDA GPU here"):
        load_engine(tmp_path, spec)


def test_tensor_intrinsics_import_leaves_inspect_answering_as_before():
    """import_tensor_intrinsics records some frame file names as no module's, so that
    inspect.stack() stops scanning sys.modules for them (a CUDA build spent minutes there):
    inspect's answer for each must be the one its full scan gives, and no real module's file
    may be among them."""
    import inspect
    import sys

    from ssd_pipeline.engine.compile import NO_MODULE_FILES, import_tensor_intrinsics

    import_tensor_intrinsics()
    assert "tvm.s_tir.tensor_intrin" in sys.modules
    frame = inspect.currentframe()
    for name in NO_MODULE_FILES:
        recorded = inspect.getmodule(frame, name)
        saved = inspect.modulesbyfile.pop(name)
        try:
            scanned = inspect.getmodule(frame, name)
        finally:
            inspect.modulesbyfile[name] = saved
        assert recorded is None and scanned is None, name
    files = {getattr(m, "__file__", None) for m in list(sys.modules.values())}
    assert not files & set(NO_MODULE_FILES)


def test_cuda_build_survives_a_schedule_rule_that_raises(bundles, tmp_path):
    """dlight's Matmul rule raised a ScheduleError (its tensor-core path's compute-at) on one
    of the embedded model's fp16 convolutions, which aborted the whole build. The rule now
    declines that function, the next rule schedules it, and the record names it."""
    spec = EngineSpec(target="cuda", precision="fp16")
    record = build_engine(bundles("tiny").artifacts.simplified_onnx_path, spec, tmp_path)
    assert (tmp_path / "engine.so").stat().st_size > 1e5
    assert record["cuda_rules_refused"], record["cuda_rules_refused"]
    assert all(r.startswith("Matmul: ") and not r.endswith("?")
               for r in record["cuda_rules_refused"])


SMALL = (2, 24, 13, 11, 40)  # n, c, h, w, o: odd sizes, channels no multiple of 8
# Winograd in chunks, the last one padded with unused tiles. Transformed weights above 8 MB
# take 32 MB chunks: F(2x2) fp32 1225 tiles in two (F(4x4): 324 tiles, one chunk). At most
# 8 MB, each thread runs chunks of twice the L2 (1-2 MB) of its own share of the tiles (on 2
# threads with 2 MB chunks: bf16 F(2x2) 613 tiles a thread in 10 chunks here; 578 (F(2x2), two
# chunks) and 145 (F(4x4), one) at 64 channels); on 1 thread, chunks of all of them.
CHUNKED = (1, 512, 70, 70, 512)
CHUNKED_SMALL_WEIGHTS = (1, 64, 67, 67, 64)


@pytest.mark.parametrize("kh, stride, pad, dilation, relu, residual, compute, shape", [
    (1, 1, 0, 1, 1, False, 0, SMALL),  # pointwise: runs as a oneDNN matmul
    (1, 1, 0, 1, 0, False, 0, SMALL),
    (1, 2, 0, 1, 1, False, 0, SMALL),  # strided 1x1: stays a convolution
    (3, 1, 1, 1, 1, False, 0, SMALL),
    (3, 2, 1, 1, 0, False, 0, SMALL),
    (3, 1, 6, 6, 1, False, 0, SMALL),  # SSD's dilated fc6
    (1, 1, 0, 1, 1, True, 0, SMALL),  # conv2d_nhwc_add: a residual block's conv -> add -> ReLU
    (3, 1, 1, 1, 1, True, 0, SMALL),
    (3, 2, 1, 1, 0, True, 0, SMALL),
    (3, 1, 1, 1, 1, False, 2, SMALL),  # Winograd F(2x2, 3x3)
    (3, 1, 1, 1, 0, False, 2, SMALL),
    (3, 1, 0, 1, 1, False, 2, SMALL),
    (3, 1, 1, 1, 1, True, 2, SMALL),
    (3, 1, 1, 1, 0, False, 2, CHUNKED),
    (3, 1, 1, 1, 1, False, 2, CHUNKED_SMALL_WEIGHTS),
    (3, 1, 1, 1, 1, False, 4, SMALL),  # Winograd F(4x4, 3x3): 13x11 outputs in 4x4 tiles
    (3, 1, 1, 1, 0, False, 4, SMALL),
    (3, 1, 0, 1, 1, False, 4, SMALL),
    (3, 1, 1, 1, 1, True, 4, SMALL),
    (3, 1, 1, 1, 0, False, 4, CHUNKED),
    (3, 1, 1, 1, 1, False, 4, CHUNKED_SMALL_WEIGHTS),
    (3, 1, 1, 1, 1, True, 4, CHUNKED_SMALL_WEIGHTS),
    (3, 1, 6, 6, 1, False, 4, SMALL),  # dilated Winograd: 6 x 6 phases of up to 3x2 outputs
    (3, 1, 6, 6, 1, True, 4, SMALL),
    (3, 1, 2, 2, 0, False, 2, SMALL),  # F(2x2) dilated: the shim runs it (engines do not)
    (3, 1, 3, 6, 1, False, 4, CHUNKED),  # pads under the dilation; shared chunks
    (3, 1, 1, 1, 1, False, 1, SMALL),  # bfloat16, direct
    (3, 1, 1, 1, 1, True, 1, SMALL),
    (1, 1, 0, 1, 1, True, 1, SMALL),
    (3, 1, 1, 1, 1, False, 3, SMALL),  # Winograd with bfloat16 products
    (3, 1, 1, 1, 1, True, 3, SMALL),
    (3, 1, 0, 1, 0, False, 3, SMALL),
    (3, 1, 1, 1, 0, False, 3, CHUNKED),
    (3, 1, 1, 1, 1, True, 3, CHUNKED_SMALL_WEIGHTS),
])
def test_shim_convolution_equals_torch(store, kh, stride, pad, dilation, relu, residual,
                                       compute, shape):
    """The oneDNN shim, called directly, against torch's conv2d (+bias) (+residual) (+ReLU),
    direct (compute 0; 1 in bfloat16) and Winograd (compute 2: F(2x2, 3x3), transforms in the
    shim, oneDNN's matmul; 3: its products in bfloat16; 4: F(4x4, 3x3))."""
    import numpy as np
    import torch
    import tvm

    from ssd_pipeline.core.host import cpu_flags
    from ssd_pipeline.engine.kernels import build_shim, load_shim

    if compute in (1, 3) and "avx512_bf16" not in cpu_flags():
        pytest.skip("bfloat16 convolutions need avx512_bf16 (this CPU has none)")

    mod = load_shim(str(build_shim(store)))
    rng = np.random.default_rng(kh * 100 + stride * 10 + dilation)
    n, c, h, w, o = shape
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    wt = rng.standard_normal((o, c, kh, kh), dtype=np.float32) * (0.3 / kh / c ** 0.5)
    b = rng.standard_normal(o, dtype=np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(),
                                     torch.from_numpy(wt).double(),
                                     torch.from_numpy(b).double(), stride, pad, dilation)
    r = rng.standard_normal(tuple(ref.shape), dtype=np.float32)
    if residual:
        ref = ref + torch.from_numpy(r)
    ref = (torch.relu(ref) if relu else ref).permute(0, 2, 3, 1).contiguous().numpy()
    out = np.zeros_like(ref, dtype=np.float32)
    t = [tvm.runtime.tensor(a) for a in (
        np.ascontiguousarray(x.transpose(0, 2, 3, 1)),
        np.ascontiguousarray(wt.transpose(0, 2, 3, 1)), b, out,
        np.ascontiguousarray(r.transpose(0, 2, 3, 1)))]
    geometry = (stride, stride, pad, pad, pad, pad, dilation, dilation, relu, compute)
    if residual:
        mod.conv2d_nhwc_add(t[0], t[1], t[2], *geometry, t[4], t[3])
    else:
        mod.conv2d_nhwc(t[0], t[1], t[2], *geometry, t[3])
    if compute in (1, 3):
        # bfloat16 rounds src and weights to 8 mantissa bits (2^-9 relative each); measured
        # on SSD300's layers: direct 2.0-2.8e-3, Winograd 2.9-4.8e-3 of the output's largest
        err = np.abs(t[3].numpy() - ref).max() / np.abs(ref).max()
        assert err < 1e-2, f"bfloat16 compute {compute}: relative error {err:.2e}"
        return
    # float32 against a float64 reference; Winograd's own error measured 2-4e-6 at C = 512
    # (F(2x2)), 0.5-2.2e-5 of the output's largest (F(4x4))
    np.testing.assert_allclose(t[3].numpy(), ref, rtol=1e-4, atol=1e-4)


def _random_3x3_call(rng, shape):
    """(src NHWC, weight OHWI, bias) and a residual for a 3x3 shim call of ``shape`` (n, c, h,
    w, o), as TVM tensors."""
    import numpy as np
    import tvm

    n, c, h, w, o = shape
    args = [tvm.runtime.tensor(a) for a in (
        rng.standard_normal((n, h, w, c), dtype=np.float32),
        rng.standard_normal((o, 3, 3, c), dtype=np.float32) * (0.1 / c ** 0.5),
        rng.standard_normal(o, dtype=np.float32))]
    return args, tvm.runtime.tensor(rng.standard_normal((n, h, w, o), dtype=np.float32))


@pytest.mark.parametrize("compute, shape, residual", [
    (2, SMALL, True), (4, SMALL, False), (4, CHUNKED_SMALL_WEIGHTS, True), (3, SMALL, True)])
def test_shim_winograd_every_vector_isa(store, compute, shape, residual):
    """The Winograd transforms are compiled per instruction set (AVX-512 with 16 channels a
    vector, AVX2 and baseline with 8) and the widest this CPU runs is picked: every level it
    has gives the same convolution (SMALL's 24 and 40 channels take each vector width's
    remainder path)."""
    import numpy as np
    import tvm

    from ssd_pipeline.core.host import cpu_flags
    from ssd_pipeline.engine.kernels import build_shim, load_shim

    if compute == 3 and "avx512_bf16" not in cpu_flags():
        pytest.skip("bfloat16 convolutions need avx512_bf16 (this CPU has none)")
    mod = load_shim(str(build_shim(store)))
    widest = mod.vector_isa(-1)
    n, _, h, w, o = shape
    args, res = _random_3x3_call(np.random.default_rng(compute), shape)
    outs = {}
    try:
        for level in range(widest + 1):
            assert mod.vector_isa(level) == level
            dst = tvm.runtime.tensor(np.zeros((n, h, w, o), np.float32))
            geometry = (1, 1, 1, 1, 1, 1, 1, 1, 1, compute)
            if residual:
                mod.conv2d_nhwc_add(*args, *geometry, res, dst)
            else:
                mod.conv2d_nhwc(*args, *geometry, dst)
            outs[level] = dst.numpy()
    finally:
        mod.vector_isa(-1)
    for level, out in outs.items():  # the same arithmetic in every width
        np.testing.assert_allclose(out, outs[widest], rtol=1e-6, atol=1e-6,
                                   err_msg=f"vector_isa {level} against {widest}")
    with pytest.raises(Exception, match="what this CPU runs"):
        mod.vector_isa(widest + 1)


@pytest.mark.parametrize("compute", [2, 4, 3])
@pytest.mark.parametrize("shape", [CHUNKED_SMALL_WEIGHTS, (3, 48, 49, 43, 80)])
def test_shim_winograd_same_on_one_thread_and_on_each_threads_own_tiles(store, compute, shape):
    """Where the transformed weights are small, each thread runs all three Winograd phases on
    its own share of the tiles (its tiles never move to another core); on one thread, chunks
    of all the tiles. Both give the same convolution, where shares and chunks are uneven too
    (F(4x4) on 3 x 49 x 43: 429 tiles, 214 and 215 a thread, in chunks of 108 where chunks
    are 2 MB)."""
    import numpy as np
    import tvm

    from ssd_pipeline.core.host import cpu_flags, default_threads
    from ssd_pipeline.engine.kernels import build_shim, load_shim

    if compute == 3 and "avx512_bf16" not in cpu_flags():
        pytest.skip("bfloat16 convolutions need avx512_bf16 (this CPU has none)")
    mod = load_shim(str(build_shim(store)))
    n, _, h, w, o = shape
    args, res = _random_3x3_call(np.random.default_rng(compute * 10 + shape[0]), shape)
    outs = {}
    try:
        for threads in (1, 2):
            mod.set_num_threads(threads)
            dst = tvm.runtime.tensor(np.zeros((n, h, w, o), np.float32))
            mod.conv2d_nhwc_add(*args, 1, 1, 1, 1, 1, 1, 1, 1, 1, compute, res, dst)
            outs[threads] = dst.numpy()
    finally:
        mod.set_num_threads(default_threads())
    scale = np.abs(outs[1]).max()
    # the two split the tiles into chunks of other sizes, so the products' GEMM treats other
    # rows as its remainder and may round a sum in another order: measured up to 1.7e-6 of the
    # scale with 1 MB chunks; a lost or misplaced tile is off by the scale itself
    np.testing.assert_allclose(outs[2], outs[1], rtol=0, atol=1e-5 * scale)


# 36 x 256 x 232 floats of F(4x4) transformed weights: 8.6 MB, so shared chunks; 24 tiles
GROUPED = (2, 256, 13, 11, 232)


@pytest.mark.parametrize("how", ["residual", "pool"])
def test_shim_winograd_products_as_one_grouped_convolution_equal_the_matmuls(store, how):
    """Shared chunks may run their products as one 1x1 convolution of 36 groups over the
    tiles stored tile-major instead of oneDNN's batched matmul (``winograd_products``: 0 the
    shim's rule, 1 the matmul, 2 the convolution). Both give the convolution, with a residual
    or a fused max pool, at every vector width this CPU runs (232 channels: no multiple of 16),
    and a timed call says which ran. The rule takes the convolution for chunks of at most 400
    tiles where oneDNN's float32 matmul is its packing GEMM, which oneDNN 3.2 runs wherever
    AVX-512 is not available (its brgemm matmul needs avx512_core)."""
    import numpy as np
    import torch
    import tvm

    from ssd_pipeline.core.host import cpu_flags
    from ssd_pipeline.engine.kernels import build_shim, load_shim

    mod = load_shim(str(build_shim(store)))
    n, _, h, w, o = GROUPED
    args, res = _random_3x3_call(np.random.default_rng(11), GROUPED)
    x, weight, bias = (torch.from_numpy(a.numpy()).double() for a in args)
    ref = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), weight.permute(0, 3, 1, 2), bias,
                                     padding=1)
    if how == "residual":
        ref = torch.relu(ref + torch.from_numpy(res.numpy()).double().permute(0, 3, 1, 2))
        size = (h, w)
    else:
        ref = torch.nn.functional.max_pool2d(torch.relu(ref), 2, ceil_mode=True)
        size = (-(-h // 2), -(-w // 2))
    ref = ref.permute(0, 2, 3, 1).numpy()
    widest = mod.vector_isa(-1)
    ran = {}
    try:
        for mode in (1, 2, 0):
            assert mod.winograd_products(mode) == mode
            for level in range(widest + 1):
                mod.vector_isa(level)
                dst = tvm.runtime.tensor(np.zeros((n, *size, o), np.float32))
                mod.winograd_timing(1)
                if how == "residual":
                    mod.conv2d_nhwc_add(*args, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, res, dst)
                else:
                    mod.conv2d_nhwc(*args, 1, 1, 1, 1, 1, 1, 1, 1, 2, 4, dst)
                ran[mode] = mod.winograd_products_ran()
                mod.winograd_timing(0)
                # F(4x4)'s own error, as in test_shim_convolution_equals_torch
                np.testing.assert_allclose(dst.numpy(), ref, rtol=1e-4, atol=1e-4,
                                           err_msg=f"mode {mode}, vector_isa {level}")
    finally:
        mod.winograd_timing(0)
        mod.vector_isa(-1)
        mod.winograd_products(0)
    assert ran[1] == 1 and ran[2] == 2
    assert ran[0] == (1 if "avx512f" in cpu_flags() else 2), ran
    with pytest.raises(Exception, match="winograd_products: mode 0"):
        mod.winograd_products(3)


@pytest.mark.parametrize("compute, shape", [
    (4, CHUNKED_SMALL_WEIGHTS),  # small transformed weights: each thread on its own tiles
    (4, (1, 512, 10, 10, 512)),  # 38 MB of them: shared chunks
    (2, (1, 512, 10, 10, 512))])
def test_shim_winograd_times_its_phases_only_when_asked(store, compute, shape):
    """``winograd_timing(1)``: each Winograd call keeps its input transform, products and
    output transform (seconds, the calling thread's last call); a direct call and a call
    without timing leave -1, so a profile cannot read an earlier call's phases as its own."""
    import time

    import numpy as np
    import tvm

    from ssd_pipeline.engine.kernels import build_shim, load_shim

    mod = load_shim(str(build_shim(store)))
    n, _, h, w, o = shape
    args, _ = _random_3x3_call(np.random.default_rng(7), shape)
    dst = tvm.runtime.tensor(np.zeros((n, h, w, o), np.float32))

    def call(how: int) -> float:
        t0 = time.perf_counter()
        mod.conv2d_nhwc(*args, 1, 1, 1, 1, 1, 1, 1, 1, 1, how, dst)
        return time.perf_counter() - t0

    def phases() -> list[float]:
        # and what ran the products: 1 a matmul, 2 a grouped convolution; -1 with the phases
        ran = mod.winograd_products_ran()
        got = [mod.winograd_phase(i) for i in range(3)]
        assert (ran == -1) == (got[0] == -1.0) and ran in (-1, 1, 2), (ran, got)
        return got

    call(compute)  # made and cached untimed
    assert phases() == [-1.0] * 3
    mod.winograd_timing(1)
    try:
        took = call(compute)
        got = phases()
        assert min(got) > 0 and sum(got) <= took, (got, took)
        call(0)  # direct: no phases of its own
        assert phases() == [-1.0] * 3
        call(compute)
        assert min(phases()) > 0
    finally:
        mod.winograd_timing(0)
    assert phases() == [-1.0] * 3
    call(compute)
    assert phases() == [-1.0] * 3
    with pytest.raises(Exception, match="phase must be 0, 1 or 2"):
        mod.winograd_phase(3)


@pytest.mark.parametrize("compute, act", [(2, "float32"), (4, "float32"), (3, "float32"),
                                          (3, "bfloat16")])
@pytest.mark.parametrize("h, w, ceil_mode", [(13, 11, True), (13, 11, False), (16, 12, False)])
def test_shim_winograd_fused_max_pool_equals_conv_then_pool(store, compute, act, h, w,
                                                            ceil_mode):
    """relu 2: the Winograd convolution's ReLU'd outputs 2x2 max-pooled (stride 2) as they are
    written, equal bit for bit to the same convolution followed by max_pool2d_nhwc, at every
    vector width this CPU runs (odd sizes: ceil_mode's last window holds one row or column;
    floor mode drops it); a fused pool outside that form is refused."""
    import ml_dtypes
    import numpy as np
    import tvm

    from ssd_pipeline.core.host import cpu_flags
    from ssd_pipeline.engine.kernels import build_shim, load_shim

    if compute == 3 and "avx512_bf16" not in cpu_flags():
        pytest.skip("bfloat16 convolutions need avx512_bf16 (this CPU has none)")
    mod = load_shim(str(build_shim(store)))
    rng = np.random.default_rng(h * w + compute)
    n, c, o = 2, 24, 40  # channels no multiple of 8: every width's remainder path
    dtype = ml_dtypes.bfloat16 if act == "bfloat16" else np.float32
    x = rng.standard_normal((n, h, w, c), dtype=np.float32).astype(dtype)
    weight = rng.standard_normal((o, 3, 3, c), dtype=np.float32) * (0.3 / c ** 0.5)
    bias = rng.standard_normal(o, dtype=np.float32) * 0.1  # some outputs below 0: the ReLU
    pooled = (-(-h // 2), -(-w // 2)) if ceil_mode else (h // 2, w // 2)
    args = [tvm.runtime.tensor(a) for a in (x, weight, bias)]
    widest = mod.vector_isa(-1)
    try:
        for level in range(widest + 1):
            mod.vector_isa(level)
            full = tvm.runtime.tensor(np.zeros((n, h, w, o), dtype))
            mod.conv2d_nhwc(*args, 1, 1, 1, 1, 1, 1, 1, 1, 1, compute, full)
            want = tvm.runtime.tensor(np.zeros((n, *pooled, o), dtype))
            mod.max_pool2d_nhwc(full, 2, 2, 2, 2, 0, 0, 0, 0, want)
            got = tvm.runtime.tensor(np.full((n, *pooled, o), 7, dtype))
            mod.conv2d_nhwc(*args, 1, 1, 1, 1, 1, 1, 1, 1, 2, compute, got)
            np.testing.assert_array_equal(got.numpy(), want.numpy(),
                                          err_msg=f"vector_isa {level}")
    finally:
        mod.vector_isa(-1)
    wrong = tvm.runtime.tensor(np.zeros((n, h, w, o), dtype))  # not a pooled size
    with pytest.raises(Exception, match="2x2 stride-2 pool"):
        mod.conv2d_nhwc(*args, 1, 1, 1, 1, 1, 1, 1, 1, 2, compute, wrong)
    if act == "float32":  # direct convolutions take no fused pool
        with pytest.raises(Exception, match="needs a Winograd compute"):
            mod.conv2d_nhwc(*args, 1, 1, 1, 1, 1, 1, 1, 1, 2, 0,
                            tvm.runtime.tensor(np.zeros((n, *pooled, o), dtype)))


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_engine_fuses_a_pool_only_where_it_alone_reads_the_relu(store, tmp_path, prec):
    """A 2x2 stride-2 max pool that alone reads a Winograd convolution's ReLU becomes part of
    that call (``max_pool2d_nhwc:fused``); one whose ReLU has another reader stays a pool of
    its own (SSD300's conv4_3 feeds L2Norm too), and so does a 3x3 pool. Outputs against ONNX
    Runtime on the same graph."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ssd_pipeline.core.host import cpu_flags
    from ssd_pipeline.engine.compile import EngineSpec, build_engine, load_engine
    from ssd_pipeline.engine.kernels import MAX_POOL2D_NHWC, build_shim

    if prec == "bf16" and "avx512_bf16" not in cpu_flags():
        pytest.skip("bf16 engines need avx512_bf16 (this CPU has none)")
    rng = np.random.default_rng(5)
    c = 128  # at or above every Winograd cut (bf16's F(2x2) one is 64 channels)
    inits, nodes = [], []

    def conv(name, src, cin, relu=True):
        inits.extend([numpy_helper.from_array(
            (rng.standard_normal((c, cin, 3, 3)) * (1.5 / (9 * cin) ** 0.5)).astype(np.float32),
            f"{name}_w"), numpy_helper.from_array(
            (rng.standard_normal(c) * 0.1).astype(np.float32), f"{name}_b")])
        nodes.append(helper.make_node("Conv", [src, f"{name}_w", f"{name}_b"],
                                      [f"{name}_c" if relu else name], pads=[1, 1, 1, 1]))
        if relu:
            nodes.append(helper.make_node("Relu", [f"{name}_c"], [name]))
        return name

    def pool(name, src, k, s, ceil):
        nodes.append(helper.make_node("MaxPool", [src], [name], kernel_shape=[k, k],
                                      strides=[s, s], pads=[k // 2 * (s == 1)] * 4,
                                      ceil_mode=ceil))
        return name

    a = pool("p1", conv("a2", conv("a1", "input", 3), c), 2, 2, 1)  # fused: 300 -> 150
    b = conv("b1", a, c)
    p2 = pool("p2", b, 2, 2, 1)  # not fused: b1's ReLU also feeds an output (150 -> 75)
    p3 = pool("p3", conv("b2", p2, c), 3, 1, 0)  # a 3x3 pool: not fused
    p4 = pool("p4", conv("b3", p3, c), 2, 2, 1)  # fused, ceil_mode on an odd side: 75 -> 38
    outs = {conv("out_a", b, c, relu=False): 150, conv("out_b", p4, c, relu=False): 38}
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 300, 300])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", c, hw, hw])
         for o, hw in outs.items()], inits)
    path = tmp_path / "pools.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)

    spec = EngineSpec(precision=prec)
    shim = build_shim(store)
    record = build_engine(path, spec, tmp_path, shim)
    assert record["relax_ops"].get(f"{MAX_POOL2D_NHWC}:fused") == 2, record["relax_ops"]
    assert record["relax_ops"].get(MAX_POOL2D_NHWC) == 2, record["relax_ops"]
    engine = load_engine(tmp_path, spec, shim)
    x = rng.standard_normal((2, 3, 300, 300)).astype(np.float32)
    import tvm

    got = [o.numpy() for o in engine.vm["main"](tvm.runtime.tensor(x))]
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    tol = 1e-3 if prec == "fp32" else 5e-2  # bf16: 8 mantissa bits per operand
    for name, g, r in zip(outs, got, ref, strict=True):
        g = g.transpose(0, 3, 1, 2) if g.shape != r.shape else g  # the heads' NHWC
        err = float(np.abs(g - r).max() / np.abs(r).max())
        assert err < tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("stride, dilation, kh, compute, message", [
    (2, 1, 3, 2, "stride 1 and the same dilation"),
    (1, 1, 1, 2, "3x3 kernels"),
    (1, 1, 3, 5, "compute must be 0"),  # F(4x4) with bfloat16 products: not offered
    (2, 1, 3, 4, "stride 1 and the same dilation"),
])
def test_shim_refuses_what_winograd_cannot_run(store, stride, dilation, kh, compute, message):
    """A call outside Winograd's domain (or an unknown compute mode) is refused, never run
    as something else."""
    import numpy as np
    import tvm

    from ssd_pipeline.engine.kernels import build_shim, load_shim

    mod = load_shim(str(build_shim(store)))
    pad = dilation * (kh // 2)
    oh = (9 + 2 * pad - dilation * (kh - 1) - 1) // stride + 1
    t = [tvm.runtime.tensor(np.zeros(s, np.float32)) for s in (
        (1, 9, 9, 8), (8, kh, kh, 8), (8,), (1, oh, oh, 8))]
    with pytest.raises(Exception, match=message):
        mod.conv2d_nhwc(t[0], t[1], t[2], stride, stride, pad, pad, pad, pad, dilation,
                        dilation, 1, compute, t[3])


@pytest.mark.parametrize("dilations, pad, relu, message", [
    ((2, 3), 2, 1, "stride 1 and the same dilation"),
    ((6, 6), 7, 1, "pads from 0 to the dilation"),  # a tile would reach past its phase
    ((2, 2), 2, 2, "max pool: dilation 1 only"),  # the pooled output transform's windows
])
def test_shim_refuses_a_dilated_winograd_it_cannot_run(store, dilations, pad, relu, message):
    """Dilated Winograd runs each phase of the output as an undilated convolution: unequal
    dilations, pads past the dilation and a fused pool are refused."""
    import numpy as np
    import tvm

    from ssd_pipeline.engine.kernels import build_shim, load_shim

    mod = load_shim(str(build_shim(store)))
    dh, dw = dilations
    oh, ow = 9 + 2 * pad - 2 * dh, 9 + 2 * pad - 2 * dw
    if relu == 2:
        oh, ow = -(-oh // 2), -(-ow // 2)
    t = [tvm.runtime.tensor(np.zeros(s, np.float32)) for s in (
        (1, 9, 9, 8), (8, 3, 3, 8), (8,), (1, oh, ow, 8))]
    with pytest.raises(Exception, match=message):
        mod.conv2d_nhwc(t[0], t[1], t[2], 1, 1, pad, pad, pad, pad, dh, dw, relu, 4, t[3])


@pytest.mark.parametrize("dtype", ["float32", "uint8", "bfloat16"])
@pytest.mark.parametrize("k, stride, pad, ceil_mode", [
    (3, 2, 1, False),  # the embedded model's stem pool
    (2, 2, 0, True),  # SSD300's VGG pools on odd sizes (75 -> 38)
    (3, 1, 1, False),  # SSD300's pool5
])
def test_shim_max_pool_and_permute_equal_torch(store, dtype, k, stride, pad, ceil_mode):
    """max_pool2d_nhwc against torch's max_pool2d (exact: a max picks one of its inputs),
    ceil_mode read from dst's size; nhwc_to_nchw against numpy's transpose."""
    import ml_dtypes
    import numpy as np
    import torch
    import tvm

    from ssd_pipeline.core.host import cpu_flags
    from ssd_pipeline.engine.kernels import build_shim, load_shim

    if dtype == "bfloat16" and "avx512_bf16" not in cpu_flags():
        # oneDNN 3.2 has no bfloat16 pooling there (no descriptor), and no bf16 engine runs
        pytest.skip("bfloat16 pooling (the bf16 engines') needs avx512_bf16 (this CPU has none)")
    mod = load_shim(str(build_shim(store)))
    rng = np.random.default_rng(k * 10 + stride)
    if dtype == "bfloat16":  # the bf16 engine's activations (integers below 256 are exact)
        dtype = ml_dtypes.bfloat16
    x = rng.integers(0, 256, (2, 75, 37, 16)).astype(dtype)
    if x.dtype != np.uint8:
        x = x - x.dtype.type(128)  # negative values: padding must never win the max
    ref = torch.nn.functional.max_pool2d(
        torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2), k, stride, pad,
        ceil_mode=ceil_mode).permute(0, 2, 3, 1).numpy().astype(dtype)
    out = tvm.runtime.tensor(np.zeros_like(ref))
    mod.max_pool2d_nhwc(tvm.runtime.tensor(x), k, k, stride, stride, pad, pad, pad, pad, out)
    np.testing.assert_array_equal(out.numpy(), ref)
    nchw = tvm.runtime.tensor(np.zeros(x.transpose(0, 3, 1, 2).shape, dtype))
    mod.nhwc_to_nchw(tvm.runtime.tensor(x), nchw)
    np.testing.assert_array_equal(nchw.numpy(), x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("c", [32, 37])  # whole 8-wide vectors; a remainder
@pytest.mark.parametrize("src_dtype", ["float32", "bfloat16"])  # bf16: the bf16 engine's input
def test_shim_l2norm_equals_mmdet(store, c, src_dtype):
    """l2norm_nhwc against mmdet's own L2Norm module (the model's neck) on the same values
    in NCHW; a weight that does not fit the channels is refused in one line."""
    import ml_dtypes
    import numpy as np
    import torch
    import tvm
    from mmdet.models.necks.ssd_neck import L2Norm

    from ssd_pipeline.engine.kernels import build_shim, load_shim

    mod = load_shim(str(build_shim(store)))
    rng = np.random.default_rng(c)
    x = (rng.standard_normal((2, 13, 11, c)) * 3).astype(np.float32)
    x[0, 0, 0] = 0  # a zero pixel: eps keeps it finite
    src = x
    if src_dtype == "bfloat16":  # the reference reads the same (rounded) values in float32
        src = x.astype(ml_dtypes.bfloat16)
        x = src.astype(np.float32)
    norm = L2Norm(c, scale=20.0)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(rng.uniform(1, 30, c).astype(np.float32)))
        ref = norm(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    out = tvm.runtime.tensor(np.zeros_like(x))
    weight = norm.weight.detach().numpy()
    mod.l2norm_nhwc(tvm.runtime.tensor(src), tvm.runtime.tensor(weight), norm.eps, out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=2e-6, atol=1e-6)
    with pytest.raises(Exception, match="weight must have one value per channel"):
        mod.l2norm_nhwc(tvm.runtime.tensor(x), tvm.runtime.tensor(weight[:-1]), norm.eps, out)


@pytest.mark.parametrize("compute, kh, stride, shape, residual", [
    (1, 3, 1, SMALL, False), (1, 3, 2, SMALL, False),  # direct
    (1, 1, 1, SMALL, False),  # pointwise: a matmul
    (3, 3, 1, SMALL, False), (3, 3, 1, CHUNKED, False),  # Winograd with bfloat16 products
    (1, 3, 1, SMALL, True), (1, 1, 1, SMALL, True), (3, 3, 1, SMALL, True),  # residual blocks
])
def test_shim_bf16_activations(store, compute, kh, stride, shape, residual):
    """A bfloat16 convolution reading and writing bfloat16 activations (and a residual block's
    bfloat16 residual) gives what the same call gives on float32 tensors holding those
    values, rounded to bfloat16 (the primitive rounds its float32 src to bfloat16 anyway):
    bit for bit on the shim's Winograd (its own rounding, to nearest even), within one
    bfloat16 step on oneDNN's direct kernels."""
    import ml_dtypes
    import numpy as np
    import tvm

    from ssd_pipeline.core.host import cpu_flags
    from ssd_pipeline.engine.kernels import build_shim, load_shim

    if "avx512_bf16" not in cpu_flags():
        pytest.skip("bfloat16 convolutions need avx512_bf16 (this CPU has none)")
    mod = load_shim(str(build_shim(store)))
    rng = np.random.default_rng(compute * 10 + kh)
    n, c, h, w, o = shape
    pad = kh // 2
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kh) // stride + 1
    x = np.maximum(rng.standard_normal((n, h, w, c)), 0).astype(ml_dtypes.bfloat16)
    wt = (rng.standard_normal((o, kh, kh, c)) * (0.3 / kh / c ** 0.5)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    args = (tvm.runtime.tensor(wt), tvm.runtime.tensor(b), stride, stride, pad, pad, pad, pad,
            1, 1, 1, compute)
    r = np.maximum(rng.standard_normal((n, oh, ow, o)), 0).astype(ml_dtypes.bfloat16)
    f32_out = tvm.runtime.tensor(np.zeros((n, oh, ow, o), np.float32))
    bf16_out = tvm.runtime.tensor(np.zeros((n, oh, ow, o), ml_dtypes.bfloat16))
    if residual:
        mod.conv2d_nhwc_add(tvm.runtime.tensor(x.astype(np.float32)), *args,
                            tvm.runtime.tensor(r.astype(np.float32)), f32_out)
        mod.conv2d_nhwc_add(tvm.runtime.tensor(x), *args, tvm.runtime.tensor(r), bf16_out)
    else:
        mod.conv2d_nhwc(tvm.runtime.tensor(x.astype(np.float32)), *args, f32_out)
        mod.conv2d_nhwc(tvm.runtime.tensor(x), *args, bf16_out)
    want = f32_out.numpy().astype(ml_dtypes.bfloat16).astype(np.float32)
    got = bf16_out.numpy().astype(np.float32)
    if compute == 3:
        np.testing.assert_array_equal(got, want)
    else:  # one step of bfloat16's 8-bit mantissa: 2^-7 relative
        np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("kh, stride, pad, dilation, relu, dst_u8", [
    (1, 1, 0, 1, 1, True),  # pointwise: a oneDNN int8 matmul
    (1, 1, 0, 1, 0, False),
    (3, 1, 1, 1, 1, True),
    (3, 2, 1, 1, 1, False),
    (3, 1, 6, 6, 1, True),
])
def test_shim_int8_convolution_exact(store, kh, stride, pad, dilation, relu, dst_u8):
    """The int8 shim against integer arithmetic done in float64 (exact below 2^53): u8
    activations times s8 weights, then scales, bias, ReLU; a u8 destination is requantized
    (at most one step off where oneDNN's float rounding meets a half)."""
    import numpy as np
    import torch
    import tvm

    from ssd_pipeline.engine.kernels import build_shim, load_shim

    mod = load_shim(str(build_shim(store)))
    rng = np.random.default_rng(kh * 100 + stride * 10 + dilation + dst_u8)
    n, c, h, w, o = 2, 24, 13, 11, 40
    x = rng.integers(0, 256, (n, c, h, w)).astype(np.uint8)
    # 7-bit weights: without VNNI, AVX2's vpmaddubsw sums u8*s8 pairs in int16, which 8-bit
    # weights can overflow (so the engine quantizes weights to 7 bits there: see
    # engine.quantize.weight_bits); with 8-bit weights this test fails on such a CPU
    wt = rng.integers(-64, 64, (o, c, kh, kh)).astype(np.int8)
    wscale = rng.uniform(1e-3, 4e-3, o).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    src_scale, dst_scale = 0.02, 0.05
    acc = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64)),
                                     torch.from_numpy(wt.astype(np.float64)), None,
                                     stride, pad, dilation).numpy()
    ref = acc * src_scale * wscale.astype(np.float64)[None, :, None, None] + b[None, :, None,
                                                                                None]
    ref = (np.maximum(ref, 0) if relu else ref).transpose(0, 2, 3, 1)
    if dst_u8:
        ref = np.clip(np.rint(ref / dst_scale), 0, 255)
    out = np.zeros(ref.shape, np.uint8 if dst_u8 else np.float32)
    t = [tvm.runtime.tensor(a) for a in (
        np.ascontiguousarray(x.transpose(0, 2, 3, 1)),
        np.ascontiguousarray(wt.transpose(0, 2, 3, 1)), wscale, b, out)]
    mod.conv2d_nhwc_int8(t[0], t[1], t[2], t[3], src_scale, dst_scale, stride, stride, pad,
                         pad, pad, pad, dilation, dilation, relu, t[4])
    got = t[4].numpy().astype(np.float64)
    if dst_u8:
        assert np.abs(got - ref).max() <= 1 and (got != ref).mean() < 0.01
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_int8_padded_output_channels_slice_back_to_the_same_result(store):
    """The int8 rewrite pads a convolution's output channels to oneDNN's block (the heads'
    324/486): the padded call's first channels equal the unpadded call's, exactly."""
    import numpy as np
    import tvm

    from ssd_pipeline.engine.kernels import build_shim, load_shim
    from ssd_pipeline.engine.patterns import OC_BLOCK
    from ssd_pipeline.engine.quantize import pad_output_channels, quantize_weights

    mod = load_shim(str(build_shim(store)))
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (2, 9, 9, 32)).astype(np.uint8)
    wq, ws = quantize_weights(rng.standard_normal((36, 3, 3, 32)).astype(np.float32), 7)
    b = rng.standard_normal(36).astype(np.float32)
    outs = []
    for w_, s_, b_ in [(wq, ws, b), pad_output_channels(wq, ws, b, OC_BLOCK)]:
        out = np.zeros((2, 9, 9, w_.shape[0]), np.float32)
        t = [tvm.runtime.tensor(a) for a in (x, w_, s_, b_, out)]
        mod.conv2d_nhwc_int8(*t[:4], 0.02, 1.0, 1, 1, 1, 1, 1, 1, 1, 1, 0, t[4])
        outs.append(t[4].numpy())
    assert outs[1].shape[-1] == 48 and not outs[1][..., 36:].any()
    np.testing.assert_array_equal(outs[1][..., :36], outs[0])


@pytest.mark.parametrize("kh, u8_residual", [(3, False), (1, False), (3, True), (1, True)])
def test_shim_int8_residual_add_exact(store, kh, u8_residual):
    """conv2d_nhwc_int8_add (a residual block's conv -> add -> ReLU in one oneDNN call, u8
    out) equals the float32-output int8 convolution plus the residual, ReLU and requantized
    by numpy. A u8 residual is added as is, with the weight scales, bias and dst scale divided
    by its scale (what the engine's rewrite passes)."""
    import numpy as np
    import tvm

    from ssd_pipeline.engine.kernels import build_shim, load_shim

    mod = load_shim(str(build_shim(store)))
    rng = np.random.default_rng(kh + 10 * u8_residual)
    n, h, c, o, pad = 2, 9, 32, 48, kh // 2
    x = rng.integers(0, 256, (n, h, h, c)).astype(np.uint8)
    wq = rng.integers(-63, 64, (o, kh, kh, c)).astype(np.int8)
    ws = rng.uniform(1e-3, 4e-3, o).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    s_res, s_dst = (0.03 if u8_residual else 1.0), 0.05
    res = (rng.integers(0, 256, (n, h, h, o)).astype(np.uint8) if u8_residual
           else rng.standard_normal((n, h, h, o)).astype(np.float32))
    t = [tvm.runtime.tensor(a) for a in (
        x, wq, (ws / s_res).astype(np.float32), (b / s_res).astype(np.float32), res,
        np.zeros((n, h, h, o), np.uint8), ws, b, np.zeros((n, h, h, o), np.float32))]
    geometry = (1, 1, pad, pad, pad, pad, 1, 1)
    mod.conv2d_nhwc_int8_add(*t[:4], 0.02, s_dst / s_res, *geometry, 1, t[4], t[5])
    mod.conv2d_nhwc_int8(t[0], t[1], t[6], t[7], 0.02, 1.0, *geometry, 0, t[8])
    ref = np.clip(np.rint(np.maximum(t[8].numpy() + s_res * res, 0) / s_dst), 0, 255)
    diff = np.abs(t[5].numpy().astype(np.float64) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
