"""ONEDNN_MAX_CPU_ISA caps the suite as it caps oneDNN: an AVX-512 host runs, and so tests, the
engine an AVX2 host would build (oneDNN's AVX2 kernels, the shim's 8-lane Winograd transforms,
AVX2's Winograd cuts, 7-bit int8 weights, no bf16)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ssd_pipeline.core.errors import UserError
from ssd_pipeline.core.host import cap_flags

ZEN4 = frozenset({"sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                  "avx512dq", "avx512cd", "avx512_vnni", "avx512_bf16", "avx512vbmi"})


@pytest.mark.parametrize(("cap", "gone", "kept"), [
    ("AVX2", {"avx512f", "avx512bw", "avx512vbmi", "avx512_vnni", "avx512_bf16"},
     {"avx", "avx2", "fma", "f16c"}),
    ("avx2", {"avx512f"}, {"avx2"}),  # oneDNN reads the name in any case
    ("AVX", {"avx2", "fma", "avx512f"}, {"avx", "sse4_1"}),
    ("AVX512_CORE", {"avx512_vnni", "avx512_bf16"}, {"avx512f", "avx512vbmi", "avx2"}),
    ("AVX512_CORE_VNNI", {"avx512_bf16"}, {"avx512_vnni", "avx512f"}),
    ("AVX512_CORE_BF16", set(), {"avx512_bf16", "avx512_vnni"}),
    ("AVX512_CORE_AMX", set(), {"avx512_bf16"}),
    ("DEFAULT", set(), set(ZEN4)),
    (None, set(), set(ZEN4)),
])
def test_cap_drops_the_flags_above_it(cap, gone, kept):
    got = cap_flags(ZEN4, cap)
    assert not gone & got, gone & got
    assert kept <= got, kept - got
    assert got <= ZEN4


def test_unknown_cap_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"ONEDNN_MAX_CPU_ISA=AVX3 is not one of oneDNN's "
                       r"levels: .*AVX2.*AVX512_CORE_BF16.* or DEFAULT; unset it"):
        cap_flags(ZEN4, "AVX3")


def test_cli_refuses_an_unknown_cap_in_one_line(tmp_path):
    """Every command checks the cap first, even one that never asks for the CPU's flags."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX3")
    proc = subprocess.run([sys.executable, "-m", "ssd_pipeline.export", "--weight",
                           str(tmp_path / "x.pth"), "--output", str(tmp_path / "m.onnx")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ONEDNN_MAX_CPU_ISA=AVX3 is not one of oneDNN's")
    assert proc.stderr.strip().count("\n") == 0, proc.stderr


# run in a child: oneDNN reads the cap once per process, when it first dispatches
CHILD = """
import json, sys
import numpy as np
from ssd_pipeline.core.cache import ArtifactStore
from ssd_pipeline.core.expectations import Expectations
from ssd_pipeline.core.host import cpu_flags, host_cpu
from ssd_pipeline.engine.compile import winograd_cuts
from ssd_pipeline.suite.models import resolve_bundle

if sys.argv[5] == "hybrid":  # the embedded model's 38x38 32->32 layers stay float32
    import ssd_pipeline.engine.compile as compile_module

    compile_module.INT8_FLOAT_WINOGRAD_CUTS = (32, 38)
bundle = resolve_bundle("tiny", Expectations.load(), ArtifactStore(sys.argv[1]))
runner = bundle.runner("tvm", sys.argv[4])
x = np.load(sys.argv[2])
runner.run(x)  # primitives made before the log starts
shim = runner.engine.shim
shim.set_verbose(1)
try:
    outs = runner.run(x)
finally:
    shim.set_verbose(0)
np.savez(sys.argv[3], *outs)
print("RESULT " + json.dumps({
    "vector_isa": int(shim.vector_isa(-1)), "avx512f": "avx512f" in cpu_flags(),
    "llvm_cpu": host_cpu(), "f4_cuts": winograd_cuts(4), "f2_cuts": winograd_cuts(2),
    "record": runner.engine.record}))
"""


@pytest.mark.parametrize(("precision", "variant"), [
    ("fp32", "plain"), ("int8", "plain"), ("int8", "hybrid")])
def test_avx2_cap_runs_avx2_kernels(precision, variant, store, sample_batch, head_outputs,
                                    expectations, tmp_path):
    """The embedded model's engine built and run under ONEDNN_MAX_CPU_ISA=AVX2: oneDNN executes
    only AVX2 kernels, and the outputs hold the precision's parity with ONNX Runtime fp32. fp32:
    the transforms run 8 lanes wide and AVX2's cuts pick the Winograd layers (F(4x4) included);
    int8: 7-bit weights (no VNNI under the cap), so vpmaddubsw's int16 pair sums cannot overflow.
    hybrid: with ``INT8_FLOAT_WINOGRAD_CUTS`` lowered to reach the embedded model's 38x38 layers
    (its own cut leaves them int8; SSD300's trunk is what it keeps float), they run as float32
    Winograd between u8 layers, each listed with its reason (a cache of its own: the cut is
    not part of the engine's key)."""
    from ssd_pipeline.core.host import _cpuinfo_flags
    from ssd_pipeline.engine.compile import WINOGRAD_CUTS, WINOGRAD_F4_CUTS
    from ssd_pipeline.parity import rel_err

    if "avx512f" not in _cpuinfo_flags():
        pytest.skip("this CPU has no AVX-512: the AVX2 path is the one every test runs here")
    np.save(tmp_path / "x.npy", sample_batch.array)
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    env.pop("DNNL_MAX_CPU_ISA", None)
    root = store.root if variant == "plain" else tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(tmp_path / "x.npy"),
                           str(tmp_path / "outs.npz"), precision, variant], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(ln for ln in proc.stdout.splitlines()
                             if ln.startswith("RESULT "))[7:])
    record = result["record"]
    assert result["vector_isa"] == 1 and not result["avx512f"]
    assert result["llvm_cpu"] == "x86-64-v3" and record["spec"]["max_cpu_isa"] == "AVX2"
    lines = [ln.split(",") for ln in proc.stdout.splitlines()
             if ln.startswith("onednn_verbose,")]
    isa = [",".join(ln) for ln in lines if "isa:" in ",".join(ln)]
    assert isa and all("AVX2" in i and "512" not in i for i in isa), isa
    compute = [ln for ln in lines if len(ln) > 4 and ln[1] == "exec"
               and ln[3] in ("convolution", "matmul")]
    impls = {ln[4] for ln in compute}
    assert impls and not [i for i in impls if "512" in i or i.startswith("ref")], impls
    if precision == "fp32":
        assert tuple(result["f4_cuts"]) == WINOGRAD_F4_CUTS["avx2"]
        assert tuple(result["f2_cuts"]) == WINOGRAD_CUTS["avx2"]
        assert record["winograd"]["f4x4_convolutions"] > 0, record["winograd"]
    else:
        q = record["quantization"]
        assert q["weight_bits"] == 7, q
        int8 = [ln for ln in compute if "src_u8" in ",".join(ln)]
        assert len(int8) == q["int8_convs"] > 0, (len(int8), q)
        kept = [f for f in q["float_convs"] if "Winograd F(4x4)" in f["reason"]]
        winograd = record["winograd"] or {}
        f = q["float_gop"]  # the stem and the float Winograd layers, for fp32's ceilings
        assert f["convolutions"] == len(q["float_convs"]), (f, q["float_convs"])
        saved = winograd.get("direct_gop_per_image", 0) - winograd.get("executed_gop_per_image", 0)
        assert f["direct_gop_per_image"] - f["executed_gop_per_image"] == pytest.approx(
            saved, abs=1e-3), (f, winograd)
        if variant == "hybrid":
            assert len(kept) == winograd.get("f4x4_convolutions") == 3, (kept, winograd)
        else:
            assert not kept and not winograd, (kept, winograd)
    got = np.load(tmp_path / "outs.npz")
    ref = head_outputs("tiny", "onnxruntime")
    limit = expectations.number(f"parity.{precision}.raw_rel_err_max")
    errs = [rel_err(got[f"arr_{i}"], r) for i, r in enumerate(ref)]
    assert max(errs) <= limit, errs
