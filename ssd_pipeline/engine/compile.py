"""ONNX -> TVM Relax -> engine: our open counterpart of IGIE's ``relay.build(..., precision=)``.

CPU (``llvm`` for the host CPU): the graph is rewritten to NHWC and every convolution (with its
bias and ReLU) is offloaded to oneDNN through ``call_dps_packed`` (``kernels/dnnl_conv.cc``);
TVM generates the remaining ops (pooling, L2Norm, layout changes). ``bf16`` runs the
convolutions in bfloat16 (CPUs with avx512_bf16), reading and writing float32. ``int8`` runs
them as oneDNN int8 primitives with u8 activations between them (:mod:`.quantize`), from a
calibration record whose hash is part of the spec.
``offload="none"`` keeps everything in TVM-generated code (untuned: seconds per image).

CUDA: the whole graph in TVM with dlight's default GPU schedules; ``fp16`` through
``ToMixedPrecision`` (float32 accumulation and outputs).

An engine directory holds ``engine.so`` and ``engine.json`` (what it was built from and for);
:func:`load_engine` refuses an engine whose record does not match what is asked for.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ..core.cache import ArtifactStore, file_sha256
from ..core.errors import UserError
from ..core.host import cap_note, cpu_flags, default_threads, host_cpu, isa_cap
from ..core.onnxfile import load_onnx
from ..core.timing import conv_gop

# Bump when the pass pipeline changes: it is part of every engine's cache key.
PIPELINE_VERSION = 24
ENGINE_FILE = "engine.so"
META_FILE = "engine.json"
INPUT_CHW = (3, 300, 300)
# NHWC -> NCHW permutes of at least this many elements per image run as oneDNN reorders; below
# it oneDNN's ~10 us per call loses to TVM's transpose (embedded model, bs 8: 38x38x16 0.17 ->
# 0.07 ms, 38x38x24 0.30 -> 0.19 ms; 19x19x24 0.037 -> 0.044 ms)
PERMUTE_MIN_ELEMENTS = 16384
# fp32/bf16 3x3 stride-1 convolutions run as Winograd F(2x2, 3x3) (the shim's compute 2/3)
# when both channel counts and the output's sides are at least this CPU's cuts
# (min channels, min side), measured against oneDNN's direct convolution, same process,
# interleaved (time ratio Winograd / direct, < 1 wins):
WINOGRAD_CUTS = {
    # AVX2 (Zen 3, fp32): SSD300 bs 8 38x38 512->512 0.46, 75x75 256->256 0.60, 150x150
    # 128->128 0.70, 300x300 64->64 0.82; embedded bs 8 38x38 32->32 0.85, 10x10 128->128
    # 0.66. Lost: 75x75 16->16 1.64, 75x75 24->32 1.36, 5x5 128->36 1.76, 3x3 64->24 2.95
    "avx2": (32, 8),
    # AVX-512 (Zen 4/5, oneDNN's AVX-512 direct kernels; fp32 / bf16, bs 8 then bs 1):
    # 38x38 512->512 0.55 / 0.63, 0.53 / 0.59; 75x75 128->256 0.72 / 0.82, 0.70 / 0.86;
    # 150x150 128->128 0.79 / 0.85, 0.82 / 0.92; 10x10 512->486 0.57 / 0.64, 0.77 / 0.81.
    # Lost or even: 300x300 64->64 0.95 / 1.02, 1.22 / 1.38; 150x150 64->128 0.90 / 1.02;
    # 38x38 32->32 1.65 / 2.50; 75x75 16->16 2.35 / 3.30
    "avx512": (128, 10),
}
# bf16 (F(2x2) with bfloat16 products) has its own cut. The bf16 figures above were taken when
# oneDNN's direct bf16 convolution still read and wrote float32; since the activations stay
# bfloat16 it runs the 128-channel layers at the bf16 matmul's rate. Re-measured that way
# (time Winograd / direct, bs 8): SSD300 150x150 128->128 1.16, 75x75 128->256 1.07; 256 and
# 512 channels still win (75x75 256->256 0.85-0.88, 38x38 512->512 0.65-0.67). Whole engines
# with this cut against the 128-channel one: SSD300 bs 1 / 8 / 32 0.999 / 0.990 / 0.968 of the
# time; embedded model (its 10x10 128->128 layers direct) bs 1 0.98-0.99, bs 8 0.97-0.98.
# [Twelfth pass] Those figures were taken while the shim's transforms ran on SSE (GCC's outlined
# OpenMP bodies ignored the AVX clones). With AVX transforms and cache-sized chunks the 128-channel
# layers win again at bf16 (bs 8 then bs 1): 150x150 128->128 0.79, 0.82; 75x75 128->256 0.67,
# 0.63; 10x10 128->128 0.86, 0.88; 64 channels lose or tie (300x300 64->64 1.23, 1.19; 150x150
# 64->128 1.04, 1.02; 38x38 64->64 0.87, 0.94). SSD300 bf16 engine, this cut against 256
# channels: bs 8 0.985, bs 1 0.965 of the time.
# [Seventeenth pass] With each thread on its own tiles (sixteenth pass) the 64-channel layers
# win too. Whole engines, this cut against 128 channels, one process, interleaved (paired
# medians, quartiles): SSD300 (conv1_2 and conv2_1 join, 15 Winograd calls) bs 8 0.942
# (0.940-0.948), bs 1 0.943 (0.940-0.954); embedded model (8 against 3) bs 8 0.978, bs 1 0.990.
# Fewer executed products: the engine's fraction of the matmul by executed ops drops with it.
WINOGRAD_BF16_CUTS = {"avx512": (64, 10)}
# fp32 3x3 stride-1 convolutions at or above these cuts run as Winograd F(4x4, 3x3) (compute 4:
# 2.25 multiplies per output against F(2x2)'s 4; its error 0.5-2.2e-5 of the output's largest
# against F(2x2)'s 0.3-0.9e-6). Measured on AVX-512 only (Zen 4, shim called directly, same
# process, interleaved, F(4x4) / F(2x2) time, bs 8 then bs 1): 150x150 128->128 0.67, 0.59;
# 75x75 256->256 0.58, 0.63; 38x38 512->512 0.65, 0.62; 19x19 1024->486 0.58, 0.74; 38x38
# 512->324 0.68. Lost: 10x10 512->486 0.93, 1.27 (12x12 computed for 10x10 outputs);
# 300x300 64->64 1.2x oneDNN's direct. bf16 keeps F(2x2): bfloat16 products of F(4x4)'s
# transforms were 5.5-6.0e-2 off, against 3.4-3.8e-3.
# [Twelfth pass] With AVX transforms and cache-sized chunks, F(4x4) / direct, bs 8 then bs 1:
# 300x300 64->64 0.70, 0.52; 150x150 64->128 0.46, 0.44; 150x150 128->128 0.41, 0.42; 75x75 64->64
# 0.52, 0.42; 19x19 64->64 0.57, 0.63; 38x38 32->32 0.82, 0.85 (inside the embedded engine at
# bs 1 it lost: 1.07-1.20 per layer), 19x19 32->32 0.75, 0.98; 75x75 16->16 1.03, 1.14. Hence
# 64 channels. SSD300 fp32 engine (its smallest layers have 64), this cut against the old 128:
# bs 8 0.943, bs 1 0.862 of the time.
# [Thirteenth pass] With the transforms unrolled and 16 channels a vector on AVX-512, F(4x4) /
# direct, bs 8 then bs 1: 38x38 32->32 0.54-0.59, 0.69; 19x19 32->32 0.61, 0.95; 75x75 16->16
# 0.67, 0.93. The embedded model's fp32 engine with a 16-channel cut (15 Winograd convolutions,
# 12 of them F(4x4)) against the 64-channel one (7, 4), same process, interleaved: bs 1
# 0.906-0.932, bs 8 0.856-0.871 of the time in six runs (a seventh, in a noisy stretch, 1.46).
# SSD300 has no layer below 64 channels: its engine does not change.
# [Fourteenth pass] 32 channels. This host has slow windows (tens of seconds, often half the
# time) in which every Winograd call takes longer and direct convolutions do not; the thin
# layers lose most. The embedded fp32 engine at bs 8, one process, the cuts interleaved over
# 1500 rounds, ms in quiet / slow windows: cut 16 18.3 / 35.5, cut 32 18.9 / 27.8, cut 64
# 20.8 / 24.8; at bs 1, 2.6 / 2.7 / 2.9 (no slow windows seen). 32 is within 3% of 16 when
# quiet and at bs 1, and gives back half of the slow windows' loss.
# [Sixteenth pass] 16 channels again. The slow windows were the two vCPUs on separate L3
# caches, and the shim now runs small-weight Winograd layers per thread (no tile changes
# cores). The embedded fp32 engine, cut 16 / cut 32, one process, interleaved, paired medians:
# bs 8 0.964 (shared L3, 52 rounds) and 0.971 (split, 98); bs 1 0.967 (75) and 0.982 (75).
# [Eighteenth pass] AVX2, measured on the Zen 4 host capped with ONEDNN_MAX_CPU_ISA=AVX2
# (oneDNN's AVX2 direct kernels and gemm:jit matmul, the 8-lane transforms; not a native AVX2
# CPU). The shim called directly, F(4x4) / direct, bs 8 then bs 1: 300x300 64->64 0.49, 0.42;
# 150x150 128->128 0.43, 0.40; 75x75 256->256 0.38, 0.37; 38x38 512->512 0.49, 0.51; 38x38
# 32->32 0.70, 0.65; 10x10 128->128 0.63, 0.84. Lost: 5x5 128->128 1.21, 2.18; 3x3 256->256
# 1.60, 3.12. Inside the embedded engine (profiled per call) F(4x4) against F(2x2): 10x10
# 128->128 at bs 1 0.29 against 0.14 ms (its u, 2.25x F(2x2)'s, no longer cached between
# calls), even at bs 8; 19x19 64->64 0.65 at bs 8, 0.9-1.2 at bs 1; 75x75 16->16 (from
# direct) 0.9-1.2 either way. Whole engines, one process, interleaved, paired medians, this cut
# against F(2x2) only: SSD300 bs 8 0.78, bs 1 0.68; embedded model bs 8 0.94, bs 1 0.92-0.99.
WINOGRAD_F4_CUTS = {"avx512": (16, 19), "avx2": (32, 19)}
# A dilated 3x3 stride-1 convolution (pads at most its dilation d) is d x d undilated ones, one
# per phase of the output's rows and columns; F(4x4) runs it so on the instruction sets listed,
# at the F(4x4) cuts. SSD300's fc6 (19x19 512->1024, d 6: six phases of 3-4 rows a side, one 4x4
# tile each, 1.36 GOP an image executed against the direct form's 2.12 on its in-bounds taps),
# native Zen 3, shim called directly, same process, interleaved, Winograd / direct time: bs 1
# 0.69, bs 8 0.63, bs 32 0.71; F(2x2) (two tiles a phase a side, 2.4 GOP) 1.07, 1.03, 1.17.
# Not measured on AVX-512 yet: it keeps the direct kernel there.
WINOGRAD_DILATED_ISAS = ("avx2",)
# An int8 engine on a CPU without VNNI (7-bit weights, int8 at 2x fp32's rate) keeps the
# convolutions F(4x4) takes with at least this many channels each side and outputs this large
# (min channels, min side) in float32 Winograd (:func:`float_winograd_reason`). Measured on
# this Zen 4 capped to AVX2, one process, interleaved, paired medians of time against the
# all-int8 engine: SSD300 (10 float Winograd layers, conv1_2 to conv4_3 and the 38x38 class
# head) bs 8 0.867, bs 1 0.945, raw outputs 0.063 from TVM fp32's against 0.090; per layer
# (bs 8, ms, F(4x4) / int8) 300x300 64->64 127 / 141, 150x150 128->128 114 / 159, 75x75
# 256->256 114 / 148, 38x38 512->512 141-150 / 146-167, 19x19 512->512 37-39 / 37-39. The
# embedded model with its three 38x38 32->32 layers float took 1.025 (bs 1) and 1.052 (bs 8).
INT8_FLOAT_WINOGRAD_CUTS = (64, 38)
# the shim's `compute` argument of its float convolutions: direct float32 or bfloat16,
# Winograd F(2x2, 3x3) with float32 or bfloat16 products, Winograd F(4x4, 3x3) in float32
COMPUTE_F32, COMPUTE_BF16, COMPUTE_WINOGRAD, COMPUTE_WINOGRAD_BF16, COMPUTE_WINOGRAD_F4 = range(5)
# the Winograd computes and their output tile side: F(2x2, 3x3) or F(4x4, 3x3)
WINOGRAD_TILE = {COMPUTE_WINOGRAD: 2, COMPUTE_WINOGRAD_BF16: 2, COMPUTE_WINOGRAD_F4: 4}
WINOGRAD_COMPUTES = tuple(WINOGRAD_TILE)
COMPUTE_ARG = 12  # its place: after src, weight, bias and 9 ints (strides, pads, dilations, relu)
RELU_ARG = COMPUTE_ARG - 1  # the relu int's place, just before compute
# the shim's `relu` argument that asks for a ReLU and then a 2x2 stride-2 max pool, written
# as the Winograd output transform makes each tile (the pooled map only). SSD300 fp32 at bs 8,
# the shim called directly, fused / conv then pool: 300x300 64->64 0.84-0.85, 150x150
# 128->128 0.89-0.92, 75x75 256->256 0.95-0.96 of the time; bf16 F(2x2) 0.94-0.98
RELU_POOL = 2
MIN_OPSET = 11  # what the exporter and TVM's ONNX frontend are exercised with (we write 13)
PRECISIONS = {"cpu": ("fp32", "bf16", "int8"), "cuda": ("fp32", "fp16")}
OFFLOADS = {"cpu": ("dnnl", "none"), "cuda": ("none",)}


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built for. ``batch=None``: dynamic batch."""

    target: str = "cpu"
    precision: str = "fp32"
    batch: int | None = None
    offload: str = "dnnl"
    cuda_arch: str = "sm_90"
    calibration: str | None = None  # int8: sha256 of the calibration record
    # with oneDNN offload: 3x3 stride-1 convolutions as Winograd where it measured faster
    # (WINOGRAD_CUTS and below; int8 without VNNI: INT8_FLOAT_WINOGRAD_CUTS); False keeps every
    # convolution direct
    winograd: bool = True

    def __post_init__(self) -> None:
        if self.target not in PRECISIONS:
            raise UserError(f"unknown target {self.target!r}; choose one of "
                            f"{', '.join(PRECISIONS)}")
        if self.precision not in PRECISIONS[self.target]:
            raise UserError(f"precision {self.precision!r} is not available on {self.target}; "
                            f"choose one of {', '.join(PRECISIONS[self.target])}")
        offload = self.offload if self.target == "cpu" else "none"
        object.__setattr__(self, "offload", offload)
        if offload not in OFFLOADS[self.target]:
            raise UserError(f"unknown offload {offload!r}; choose one of "
                            f"{', '.join(OFFLOADS[self.target])}")
        if self.batch is not None and self.batch <= 0:
            raise UserError(f"batch size must be positive, got {self.batch}")
        if (self.target, self.precision) == ("cpu", "bf16") and "avx512_bf16" not in cpu_flags():
            raise UserError(f"bf16 needs a CPU with avx512_bf16 (this one has none{cap_note()}): "
                            "use fp32")
        if self.precision == "int8" and (self.calibration is None or offload != "dnnl"):
            raise UserError("an int8 engine needs a calibration record and offload='dnnl' "
                            "(its convolutions are oneDNN int8 primitives)")
        if self.precision != "int8":
            object.__setattr__(self, "calibration", None)
        if offload != "dnnl":  # int8: float32 Winograd layers where there is no VNNI
            object.__setattr__(self, "winograd", False)

    def tvm_target(self) -> Any:
        import tvm

        if self.target == "cuda":
            return tvm.target.Target({"kind": "cuda", "arch": self.cuda_arch},
                                     host={"kind": "llvm"})
        return tvm.target.Target({"kind": "llvm", "mcpu": host_cpu(),
                                  "num-cores": default_threads()})

    def key(self) -> dict[str, Any]:
        """Everything the engine's bytes depend on (cache key and engine record)."""
        d = asdict(self)
        if self.target != "cuda":
            d.pop("cuda_arch")
        if self.precision != "int8":
            d.pop("calibration")
        if self.target == "cpu":  # the cap picks oneDNN's kernels, the cuts and the transforms
            d["max_cpu_isa"] = isa_cap()
        return d | {"tvm_target": str(self.tvm_target().export()) if self.target == "cuda"
                    else f"llvm -mcpu={host_cpu()}", "tvm": version("apache-tvm"),
                    "pipeline": PIPELINE_VERSION}


def import_onnx(onnx_path: str | Path, batch: int | None) -> tuple[Any, list[str]]:
    """Relax module of the ONNX graph (weights bound as constants, input checked) and the
    graph's output names."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    onnx_path = Path(onnx_path)
    model = load_onnx(onnx_path)
    inputs = [i for i in model.graph.input
              if i.name not in {init.name for init in model.graph.initializer}]
    if len(inputs) != 1:
        raise UserError(f"{onnx_path}: expected one input, got {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    chw = tuple(d.dim_value for d in dims[1:])
    if len(dims) != 4 or chw != INPUT_CHW:
        shape = [d.dim_param or d.dim_value for d in dims]
        raise UserError(f"{onnx_path}: input {inputs[0].name!r} has shape {shape}, expected "
                        f"[N, {', '.join(map(str, INPUT_CHW))}]: is it the SSD300 export?")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise UserError(f"{onnx_path}: opset {opset} is outside what this stack imports "
                        f"({MIN_OPSET}..{newest}); export it with the suite (opset 13)")
    shape_dict = {inputs[0].name: [batch, *INPUT_CHW]} if batch else None
    # keep_params_in_input=False: weights become constants of the module and travel inside
    # the engine, so an engine can never meet a parameter list that does not fit it.
    try:
        mod = from_onnx(model, shape_dict=shape_dict, keep_params_in_input=False)
    except Exception as e:  # the frontend raises many types for graphs it cannot take
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
        raise UserError(f"TVM cannot import {onnx_path} (opset {opset}): "
                        f"{type(e).__name__}: {first}; export it with the suite "
                        f"(opset 13)") from None
    return mod, [o.name for o in model.graph.output]


def to_nhwc(mod: Any) -> Any:
    """Convolutions NHWC with OHWI constant weights (what the oneDNN shim takes)."""
    from tvm import relax

    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod)
    return relax.transform.FoldConstant()(mod)  # weight permutes become OHWI constants


def winograd_isa() -> str | None:
    """The vector instruction set the Winograd cuts are keyed by: "avx512", "avx2" or None."""
    flags = cpu_flags()  # ONEDNN_MAX_CPU_ISA caps them, as it caps oneDNN's kernels
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else None


def winograd_cuts(tile: int = 2, bf16: bool = False) -> tuple[int, int] | None:
    """(min channels, min output side) of Winograd F(tile x tile, 3x3) on this CPU, with
    float32 or (``bf16``) bfloat16 products (``WINOGRAD_CUTS``, ``WINOGRAD_BF16_CUTS``,
    ``WINOGRAD_F4_CUTS``); None where it was not measured to win (F(4x4) at bf16: too
    inexact)."""
    isa = winograd_isa()
    if isa is None:  # the transforms' baseline build: never measured to win
        return None
    if bf16:
        return WINOGRAD_BF16_CUTS.get(isa) if tile == 2 else None
    return (WINOGRAD_CUTS if tile == 2 else WINOGRAD_F4_CUTS).get(isa)


def winograd_tile(attrs: Any, weight_shape: Any, out_shape: Any, bf16: bool) -> int | None:
    """The Winograd output tile (4 or 2) the shim runs a convolution (NHWC/OHWI) with, or None
    for oneDNN's direct one: 3x3, stride 1, pads from 0 to the dilation, channels and output
    size at or above this CPU's cuts; F(4x4) at fp32 only; dilated (the same on both sides)
    only F(4x4), where ``WINOGRAD_DILATED_ISAS`` lists this CPU."""
    import tvm

    o, kh, kw, c = (int(d) for d in weight_shape)
    size = [out_shape[1], out_shape[2]]
    dh, dw = map(int, attrs.dilation)
    if not ((kh, kw) == (3, 3) and [*map(int, attrs.strides)] == [1, 1] and dh == dw
            and all(0 <= int(p) <= dh for p in attrs.padding)
            and all(isinstance(d, tvm.tirx.IntImm) for d in size)):
        return None
    if dh > 1 and not (winograd_isa() in WINOGRAD_DILATED_ISAS and not bf16):
        return None
    for tile in (4, 2) if dh == 1 else (4,):
        cuts = winograd_cuts(tile, bf16)
        if cuts and min(c, o) >= cuts[0] and min(int(d) for d in size) >= cuts[1]:
            return tile
    return None


def float_winograd_reason(attrs: Any, weight_shape: Any, out_shape: Any) -> str | None:
    """Why an int8 engine without VNNI keeps a convolution in float32, or None: Winograd
    F(4x4) does 2.25 multiplies per output against the direct int8 convolution's 9, at half of
    int8's rate there, and wins where it is at or above ``INT8_FLOAT_WINOGRAD_CUTS``."""
    channels, side = INT8_FLOAT_WINOGRAD_CUTS
    if winograd_tile(attrs, weight_shape, out_shape, False) != 4 or \
            min(int(weight_shape[0]), int(weight_shape[3])) < channels or \
            min(int(out_shape[1]), int(out_shape[2])) < side:
        return None
    return ("float32 Winograd F(4x4) is faster here than int8 without VNNI (7-bit weights, "
            "vpmaddubsw at 2x fp32's rate)")


def merge_heads(mod: Any) -> tuple[Any, list[tuple[int, int, int]]]:
    """Graph outputs that are ``permute(conv2d(x, w) + b)`` over the same ``x`` with the same
    geometry (SSD's class and box heads of one level) become one convolution with the weights'
    output channels stacked and zero-padded to a multiple of oneDNN's block (``OC_BLOCK``):
    one call and one pass over ``x`` instead of two, and no narrow head (16 or 24 channels) or
    channel tail left. Returns the module and, per original output, (field, first channel, end
    channel) of the new outputs it is a slice of (the runner hands those slices out as views,
    no copy); [] when no head changed."""
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.ir.expr import Constant

    from .patterns import OC_BLOCK

    func = mod["main"]
    bound = relax.analysis.get_var2val(func)
    body = func.body.body
    heads = bound.get(body) if isinstance(body, relax.Var) else body
    if not isinstance(heads, relax.Tuple) or any(f.ty.ndim != 4 for f in heads.fields):
        return mod, []  # not a graph of NCHW heads

    def op_of(e: Any, name: str) -> Any:
        c = bound.get(e) if isinstance(e, relax.Var) else e
        ok = isinstance(c, relax.Call) and isinstance(c.op, tvm.ir.Op) and c.op.name == name
        return c if ok else None

    def head(field: Any) -> tuple[Any, np.ndarray, np.ndarray, Any] | None:
        """(conv, OHWI weight, bias, group key) of a ``permute(conv2d + bias)`` output."""
        perm = op_of(field, "relax.permute_dims")
        if perm is None or _axes(perm) != TO_NCHW:
            return None
        add = op_of(perm.args[0], "relax.add")
        conv = op_of(add.args[0], "relax.nn.conv2d") if add is not None else None
        if (conv is None or not isinstance(add.args[1], Constant)
                or not isinstance(conv.args[1], Constant)):
            return None
        a, w, b = conv.attrs, conv.args[1].value.numpy(), add.args[1].value.numpy()
        if (a.data_layout != "NHWC" or a.kernel_layout != "OHWI" or a.out_layout != "NHWC"
                or int(a.groups) != 1 or b.size != w.shape[0] or b.shape[-1] != w.shape[0]):
            return None
        x = conv.args[0]
        src = op_of(x, "relax.permute_dims")  # two permutes of one tensor read the same data
        where = (src.args[0], tuple(_axes(src))) if src is not None else (x, ())
        geometry = (tuple(map(int, a.strides)), tuple(map(int, a.padding)),
                    tuple(map(int, a.dilation)), w.shape[1:], str(conv.ty.dtype))
        return conv, w, b.reshape(-1), (*where, geometry)

    found = [head(f) for f in heads.fields]
    groups: dict[Any, list[int]] = {}
    for i, h in enumerate(found):
        if h is not None:
            groups.setdefault(h[3], []).append(i)
    changed = {g[0]: g for g in groups.values()
               if len(g) > 1 or found[g[0]][1].shape[0] % OC_BLOCK}
    if not changed:
        return mod, []
    fields: list[Any] = []  # the new outputs: an original field, or a group to compute
    slices = [(0, 0, 0)] * len(heads.fields)
    grouped = {i for g in changed.values() for i in g}
    for i, f in enumerate(heads.fields):
        if i in changed:
            start = 0
            for j in changed[i]:
                width = found[j][1].shape[0]
                slices[j] = (len(fields), start, start + width)
                start += width
            fields.append(changed[i])
        elif i not in grouped:
            slices[i] = (len(fields), 0, int(f.ty.shape[1]))
            fields.append(f)

    @relax.expr_functor.mutator
    class Merge(relax.PyExprMutator):  # type: ignore[misc]
        def visit_tuple_(self, op: Any) -> Any:
            if not op.same_as(heads):
                return super().visit_tuple_(op)
            out = []
            for f in fields:
                if not isinstance(f, list):
                    out.append(self.visit_expr(f))
                    continue
                conv = found[f[0]][0]
                w = np.concatenate([found[j][1] for j in f])
                b = np.concatenate([found[j][2] for j in f])
                pad = -w.shape[0] % OC_BLOCK  # zero channels, sliced off by the runner
                w = np.concatenate([w, np.zeros((pad, *w.shape[1:]), w.dtype)])
                b = np.concatenate([b, np.zeros(pad, b.dtype)]).reshape(1, 1, 1, -1)
                a = conv.attrs
                y = self.builder_.emit(relax.op.nn.conv2d(
                    self.visit_expr(conv.args[0]), relax.const(w), a.strides, a.padding,
                    a.dilation, 1, "NHWC", "OHWI", "NHWC", a.out_dtype))
                y = self.builder_.emit(relax.op.add(y, relax.const(b)))
                out.append(self.builder_.emit(relax.op.permute_dims(y, TO_NCHW)))
            return relax.Tuple(out)

    mod["main"] = Merge().visit_expr(func)
    return relax.transform.DeadCodeElimination()(mod), slices


def offload_convolutions(mod: Any, bf16: bool, winograd: bool = False) -> Any:
    """An NHWC graph (:func:`to_nhwc`); each conv2d(+bias)(+ReLU) becomes one oneDNN call, and
    so does a residual block's conv(+bias) -> add -> ReLU (the add a oneDNN post-op, so the
    block's output is written once). ``winograd``: the 3x3 stride-1 ones that
    :func:`winograd_tile` picks run as Winograd F(4x4, 3x3) or F(2x2, 3x3), at bf16 F(2x2)
    with bfloat16 products."""
    import tvm
    import tvm_ffi
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call

    from .kernels import CONV2D_NHWC, CONV2D_NHWC_ADD
    from .patterns import conv_patterns, int_args

    p = conv_patterns()
    pool = is_op("relax.nn.max_pool2d")(p.relu)
    uses = _var_uses(mod["main"])

    def call(expr: Any, m: Any, is_relu: bool, extra: list[Any], pooled: bool = False) -> Any:
        if not p.supported(m):
            return expr  # not a form the kernel takes: TVM keeps it
        compute = COMPUTE_BF16 if bf16 else COMPUTE_F32
        tile = winograd_tile(m[p.conv].attrs, m[p.w].ty.shape, m[p.conv].ty.shape, bf16) \
            if winograd else None
        if pooled and (tile is None or int(m[p.conv].attrs.dilation[0]) != 1):
            return expr  # the fused pool is the (undilated) Winograd output transform's
        if tile == 4:
            compute = COMPUTE_WINOGRAD_F4
        elif tile == 2:
            compute = COMPUTE_WINOGRAD_BF16 if bf16 else COMPUTE_WINOGRAD
        args = [m[p.x], m[p.w], relax.const(m[p.b].value.numpy().reshape(-1)),
                *int_args([*p.geometry(m), RELU_POOL if pooled else is_relu, compute])]
        if bf16 and is_relu:
            # a ReLU's output is an activation: written in bfloat16, which the next
            # convolution, pool or residual add reads as is (:func:`bf16_activations` drops
            # the astype)
            out = relax.call_dps_packed(CONV2D_NHWC_ADD if extra else CONV2D_NHWC, args + extra,
                                        out_ty=relax.TensorType(expr.ty.shape, "bfloat16"))
            return relax.op.astype(out, "float32")
        return relax.call_dps_packed(CONV2D_NHWC_ADD if extra else CONV2D_NHWC, args + extra,
                                     out_ty=expr.ty)

    def fuse_residual(expr: Any, m: Any) -> Any:
        same = tvm_ffi.structural_equal(m[p.residual].ty, m[p.add].ty)  # no broadcasting
        if not same or str(m[p.residual].ty.dtype) != "float32":
            return expr
        return call(expr, m, True, [m[p.residual]])

    def rewrite(expr: Any, m: Any) -> Any:
        is_relu = isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.nn.relu"
        return call(expr, m, is_relu, [])

    def fuse_pool(expr: Any, m: Any) -> Any:
        a = expr.attrs
        # the ReLU's output read by this pool alone (SSD300's conv4_3 also feeds L2Norm)
        if (uses.get(expr.args[0], 0) != 1 or a.layout != "NHWC" or a.out_layout != "NHWC"
                or [*map(int, (*a.pool_size, *a.strides, *a.padding, *a.dilation))]
                != [2, 2, 2, 2, 0, 0, 0, 0, 1, 1]):
            return expr
        return call(expr, m, True, [], pooled=True)

    if winograd:
        mod["main"] = rewrite_call(pool, fuse_pool, mod["main"])
    mod["main"] = rewrite_call(p.block, fuse_residual, mod["main"])
    mod["main"] = rewrite_call(p.relu | p.add, rewrite, mod["main"])
    return relax.transform.DeadCodeElimination()(mod)


def _var_uses(fn: Any) -> dict[Any, int]:
    """How many bindings of ``fn``'s dataflow blocks read each variable (TVM's use-def
    chains)."""
    from tvm import relax

    users: dict[Any, Any] = {}
    for block in fn.body.blocks:
        if isinstance(block, relax.DataflowBlock):
            users.update(relax.analysis.udchain(block))
    return {var: len(readers) for var, readers in users.items()}


def offload_glue(mod: Any) -> Any:
    """NHWC max pools and the larger NHWC -> NCHW permutes (f32 or u8) become oneDNN calls:
    TVM compiles them to one thread, and its own thread pool would fight oneDNN's for the
    cores (a parallel schedule of TVM's glue kernels measured 1.4-1.6x slower overall)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    from .kernels import MAX_POOL2D_NHWC, NHWC_TO_NCHW
    from .patterns import int_args

    x = wildcard()
    pool, permute = is_op("relax.nn.max_pool2d")(x), is_op("relax.permute_dims")(x)

    def rewrite(expr: Any, m: Any) -> Any:
        ty = m[x].ty
        if str(ty.dtype) not in ("float32", "uint8") or ty.ndim != 4:
            return expr
        a = expr.attrs
        if pool in m:
            # ceil_mode too: the shim pads the bottom/right edges to dst's size
            if a.layout != "NHWC" or a.out_layout != "NHWC" or [*map(int, a.dilation)] != [1, 1]:
                return expr
            args = int_args([*a.pool_size, *a.strides, *a.padding])
            return relax.call_dps_packed(MAX_POOL2D_NHWC, [m[x], *args], out_ty=expr.ty)
        dims = [ty.shape[i] for i in range(1, 4)]
        per_image = [int(d) for d in dims] if all(
            isinstance(d, tvm.tirx.IntImm) for d in dims) else [0]
        if (_axes(expr) != TO_NCHW
                or math.prod(per_image) < PERMUTE_MIN_ELEMENTS):
            return expr
        return relax.call_dps_packed(NHWC_TO_NCHW, [m[x]], out_ty=expr.ty)

    mod["main"] = rewrite_call(pool | permute, rewrite, offload_l2norm(mod)["main"])
    return mod


TO_NCHW = [0, 3, 1, 2]  # permute_dims axes taking NHWC to NCHW
CONV_ARGS, POOL_ARGS, L2NORM_ARGS = 13, 9, 3  # the shim calls' argument counts (dst aside)


def bf16_activations(mod: Any) -> Any:
    """bfloat16 engines: a bfloat16 activation (a ReLU convolution's output) is read as is by
    the shim calls that take bfloat16 (bfloat16 convolutions and their residual inputs, max
    pools, L2Norm) instead of through a float32 copy; a pool of one is done in bfloat16 (max
    commutes with the rounding). What is left of the copies feeds float ops (the heads)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    from .kernels import CONV2D_NHWC, CONV2D_NHWC_ADD, L2NORM_NHWC, MAX_POOL2D_NHWC

    def bf16_source(arg: Any, var2val: Any) -> Any:
        """``y`` where ``arg`` is ``astype(y, float32)`` of a bfloat16 ``y``, else None."""
        value = var2val.get(arg) if isinstance(arg, relax.Var) else arg
        if (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
                and value.op.name == "relax.astype" and str(value.ty.dtype) == "float32"
                and str(value.args[0].ty.dtype) == "bfloat16"):
            return value.args[0]
        return None

    fn = wildcard()
    shim_call = is_op("relax.call_dps_packed")(fn, wildcard())

    def fold(expr: Any, m: Any, var2val: Any) -> Any:
        name, args = getattr(m[fn], "global_symbol", None), list(expr.args[1].fields)
        if (name, len(args)) in ((CONV2D_NHWC, CONV_ARGS), (CONV2D_NHWC_ADD, CONV_ARGS + 1)) \
                and int(args[COMPUTE_ARG].value) in (COMPUTE_BF16, COMPUTE_WINOGRAD_BF16):
            # src, and a residual block's residual (the argument after compute)
            at = [0] + ([CONV_ARGS] if name == CONV2D_NHWC_ADD else [])
            new = list(args)
            for i in at:
                y = bf16_source(args[i], var2val)
                new[i] = args[i] if y is None else y
            if all(a.same_as(b) for a, b in zip(new, args, strict=True)):
                return expr
            return relax.call_dps_packed(m[fn], new, out_ty=expr.ty)
        y = bf16_source(args[0], var2val) if args else None
        if y is None:
            return expr
        if name == L2NORM_NHWC and len(args) == L2NORM_ARGS:
            return relax.call_dps_packed(m[fn], [y, *args[1:]], out_ty=expr.ty)
        if name == MAX_POOL2D_NHWC and len(args) == POOL_ARGS:
            pooled = relax.call_dps_packed(m[fn], [y, *args[1:]], out_ty=relax.TensorType(
                expr.ty.shape, "bfloat16"))
            return relax.op.astype(pooled, "float32")
        return expr

    for _ in range(3):  # a pool moves the astype past itself: the reader after it is next
        var2val = relax.analysis.get_var2val(mod["main"])
        mod["main"] = rewrite_call(shim_call, functools.partial(fold, var2val=var2val),
                                   mod["main"])
    return relax.transform.DeadCodeElimination()(mod)


def bf16_outputs(mod: Any) -> int:
    """How many shim calls in ``main`` write a bfloat16 tensor (the engine record's count of
    bfloat16 activations)."""
    import tvm
    from tvm import relax

    count = 0

    def visit(e: Any) -> None:
        nonlocal count
        if (isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)
                and e.op.name == "relax.call_dps_packed" and str(e.ty.dtype) == "bfloat16"):
            count += 1

    relax.analysis.post_order_visit(mod["main"], visit)
    return count


def _axes(permute: Any) -> list[int]:
    """A ``permute_dims`` call's axes; [] for its default (reverse all)."""
    return [*map(int, permute.attrs.axes)] if permute.attrs.axes is not None else []


def nhwc_heads(mod: Any) -> tuple[Any, list[str]]:
    """The graph's outputs that are NHWC -> NCHW permutes of a tensor (the heads after the
    layout pass) are returned as that NHWC tensor; the layout of each output, for the runner,
    which hands NCHW views of them (no copy: mmdet's post-processing permutes the heads back
    to channels-last). Each permute was one call and one copy per head per batch."""
    import tvm
    from tvm import relax

    func = mod["main"]
    bound = relax.analysis.get_var2val(func)
    body = func.body.body
    heads = bound.get(body) if isinstance(body, relax.Var) else body
    if not isinstance(heads, relax.Tuple):
        return mod, ["NCHW"]
    fields, layouts = [], []
    for f in heads.fields:
        src = bound.get(f)
        if (isinstance(src, relax.Call) and isinstance(src.op, tvm.ir.Op)
                and src.op.name == "relax.permute_dims" and _axes(src) == TO_NCHW):
            fields.append(src.args[0])
            layouts.append("NHWC")
        else:
            fields.append(f)
            layouts.append("NCHW")

    @relax.expr_functor.mutator
    class Heads(relax.PyExprMutator):  # type: ignore[misc]
        def visit_tuple_(self, op: Any) -> Any:
            if op.same_as(heads):
                return relax.Tuple([self.visit_expr(f) for f in fields])
            return super().visit_tuple_(op)

    mod["main"] = Heads().visit_expr(func)
    return relax.transform.DeadCodeElimination()(mod), layouts


def offload_l2norm(mod: Any) -> Any:
    """SSD's L2Norm on an NHWC tensor, which the layout pass leaves in NCHW between permutes
    (``w * permute(x) / permute(sqrt(sum(x^2)) + eps)``, then back to NHWC), becomes one shim
    call on the NHWC tensor: seven one-thread TVM kernels and two permutes become one
    threaded pass."""
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    from .kernels import L2NORM_NHWC

    x, two, eps, w, shape = wildcard(), is_const(), is_const(), is_const(), wildcard()
    total = is_op("relax.sum")(is_op("relax.power")(x, two))
    norm_t = is_op("relax.permute_dims")(is_op("relax.add")(is_op("relax.sqrt")(total), eps))
    wx = is_op("relax.broadcast_to")(w, shape)
    xt = is_op("relax.permute_dims")(x)
    scaled = is_op("relax.multiply")(wx, xt) | is_op("relax.multiply")(xt, wx)
    out = is_op("relax.permute_dims")(is_op("relax.divide")(scaled, norm_t))

    def rewrite(expr: Any, m: Any) -> Any:
        ty, c = m[x].ty, m[x].ty.shape[3] if m[x].ty.ndim == 4 else None
        weight, s = m[w].value.numpy(), m[total]
        if (str(ty.dtype) != "float32" or not isinstance(c, tvm.tirx.IntImm)
                or weight.ndim < 3 or weight.size != int(c) or weight.shape[-3] != int(c)
                or float(m[two].value.numpy()) != 2.0 or m[eps].value.numpy().size != 1
                or [*map(int, s.attrs.axis)] != [3] or not s.attrs.keepdims
                or _axes(m[xt]) != TO_NCHW or _axes(m[norm_t]) != TO_NCHW
                or _axes(expr) != [0, 2, 3, 1]):
            return expr
        e = float(m[eps].value.numpy().reshape(()))
        return relax.call_dps_packed(
            L2NORM_NHWC, [m[x], relax.const(weight.reshape(-1).astype(np.float32)),
                          relax.prim_value(tvm.tirx.FloatImm("float64", e))], out_ty=ty)

    mod["main"] = rewrite_call(out, rewrite, mod["main"])
    return mod


def winograd_gop(oh: int, ow: int, c: int, o: int, tile: int = 2, dilation: int = 1) -> float:
    """GOP (2 x MACs) of one image's Winograd F(tile x tile, 3x3) convolution: (tile + 2)^2
    products per tile x tile outputs (16 per 2x2, 36 per 4x4), where the direct convolution
    does 9 per output. Dilated by d: d x d phases, each tiled as its largest (the first, with
    ceil(oh / d) rows)."""
    d = dilation
    th, tw = (math.ceil(math.ceil(side / d) / tile) for side in (oh, ow))
    return 2 * (tile + 2) ** 2 * d * d * th * tw * c * o / 1e9


def _is_winograd(call: Any) -> bool:
    """``call`` (a ``call_dps_packed``) is a float convolution the shim runs as Winograd."""
    from .kernels import CONV2D_NHWC, CONV2D_NHWC_ADD

    return (getattr(call.args[0], "global_symbol", None) in (CONV2D_NHWC, CONV2D_NHWC_ADD)
            and int(call.args[1].fields[COMPUTE_ARG].value) in WINOGRAD_COMPUTES)


def winograd_out_hw(h: int, w: int, ints: list[int]) -> tuple[int, int]:
    """A Winograd shim call's convolution output size (3x3, stride 1), before a fused pool,
    from its src's size and its integer arguments (strides 2, then pads top, left, bottom,
    right, then dilations 2)."""
    pt, pl, pb, pr, d = ints[2:7]
    return h + pt + pb - 2 * d, w + pl + pr - 2 * d


def count_ops(mod: Any) -> dict[str, int]:
    """Relax operator histogram of ``main``, offloaded calls by the function they call (shows
    what was offloaded), float convolutions run as Winograd under ``<function>:winograd``, max
    pools fused into one under ``<max pool function>:fused``."""
    import tvm
    from tvm import relax

    from .kernels import MAX_POOL2D_NHWC

    counts: dict[str, int] = {}

    def visit(e: Any) -> None:
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            name = e.op.name
            if name == "relax.call_dps_packed":
                name = getattr(e.args[0], "global_symbol", name)
                if _is_winograd(e):
                    name += ":winograd"
                    if int(e.args[1].fields[RELU_ARG].value) == RELU_POOL:
                        pooled = f"{MAX_POOL2D_NHWC}:fused"
                        counts[pooled] = counts.get(pooled, 0) + 1
            counts[name] = counts.get(name, 0) + 1

    relax.analysis.post_order_visit(mod["main"], visit)
    return dict(sorted(counts.items()))


def _float_conv_calls(mod: Any) -> list[tuple[float, float, int | None]]:
    """(direct GOP, executed GOP, Winograd tile or None) per image of each float convolution
    the shim runs in ``main``: direct on its in-bounds taps (as ``conv_gflop_per_image``
    counts), executed as the shim does it (Winograd's products, else the same)."""
    import tvm
    from tvm import relax

    from .kernels import CONV2D_NHWC, CONV2D_NHWC_ADD

    found: list[tuple[float, float, int | None]] = []

    def visit(e: Any) -> None:
        if not (isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)
                and e.op.name == "relax.call_dps_packed"
                and getattr(e.args[0], "global_symbol", None) in (CONV2D_NHWC, CONV2D_NHWC_ADD)):
            return
        f = e.args[1].fields
        o, kh, kw, c = (int(d) for d in f[1].ty.shape)
        ints = [int(v.value) for v in f[3:COMPUTE_ARG + 1]]
        hw = (int(f[0].ty.shape[1]), int(f[0].ty.shape[2]))
        tile = WINOGRAD_TILE.get(ints[-1])
        # a Winograd call's output may be its fused pool's: its size comes from src and pads
        out_hw = winograd_out_hw(*hw, ints) if tile else (int(e.ty.shape[1]), int(e.ty.shape[2]))
        # ints: strides 2, pads 4 (top, left, bottom, right), dilations 2, relu, compute
        direct = conv_gop(1, hw, out_hw, (kh, kw), c, o, ints[0:2], ints[2:4], ints[6:8])
        found.append((direct, winograd_gop(*out_hw, c, o, tile, ints[6]) if tile else direct,
                      tile))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


def winograd_record(mod: Any) -> dict[str, Any] | None:
    """How many convolutions run as Winograd, and the GOP per image they do against what their
    direct form does (its in-bounds taps, as ``conv_gflop_per_image`` counts). Perf records
    read their GOP/s against the peak by what the engine executes, so a Winograd engine's img/s
    never reads as more than the chip can compute. None when none."""
    found = [f for f in _float_conv_calls(mod) if f[2]]
    if not found:
        return None
    return {"convolutions": len(found),
            "f4x4_convolutions": sum(f[2] == 4 for f in found),
            "direct_gop_per_image": round(sum(f[0] for f in found), 4),
            "executed_gop_per_image": round(sum(f[1] for f in found), 4)}


def float_conv_record(mod: Any) -> dict[str, Any]:
    """An int8 engine's float32 convolutions (its stem, whose input is signed; without VNNI
    the layers float Winograd runs faster) and the GOP per image they do, direct and as
    executed: perf records read those against the float32 ceiling, the rest against int8's."""
    found = _float_conv_calls(mod)
    return {"convolutions": len(found),
            "direct_gop_per_image": round(sum(f[0] for f in found), 4),
            "executed_gop_per_image": round(sum(f[1] for f in found), 4)}


# Frame "files" that are no module's: inspect.getmodule scans all of sys.modules for each such
# frame, every time, and finds none (see import_tensor_intrinsics)
NO_MODULE_FILES = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>",
                    "<ast>")


def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (dlight's Matmul rule needs it) in seconds, not minutes.

    Its ~500 TVMScript functions each call ``inspect.stack()``, which looks up the module of
    every frame on the stack; for a frame of the import machinery or of TVMScript's evaluator
    (``<ast>``) that lookup scans all of ``sys.modules`` and finds nothing. Measured on a Zen 3:
    68 s in a fresh process, 144 s with torch and mmdet loaded, ~210 s under pytest. Recording
    those names as belonging to no module gives the same answer (``None``) without the scan:
    7-12 s."""
    import inspect

    cache = getattr(inspect, "modulesbyfile", None)  # CPython's file -> module name cache
    if isinstance(cache, dict):
        for name in NO_MODULE_FILES:
            cache.setdefault(name, "<no module>")  # not a key of sys.modules: getmodule -> None
    import tvm.s_tir.tensor_intrin  # noqa: F401


def _cuda_pipeline(mod: Any, spec: EngineSpec, target: Any) -> tuple[Any, list[str]]:
    """The Relax module lowered with dlight's default GPU schedules, and the functions where a
    rule raised instead of declining (the next rule scheduled them)."""
    from tvm import relax
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.schedule import ScheduleError

    import_tensor_intrinsics()
    refused: list[str] = []

    class Declining(dl.ScheduleRule):
        """A rule that declines (None) where it raises a ScheduleError. dlight's Matmul rule
        raised one (its tensor-core path's compute-at) on an fp16 convolution of the embedded
        model, which aborted the whole build; the rules after it schedule such a function."""

        def __init__(self, rule: Any) -> None:
            self.rule = rule

        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            try:
                return self.rule.apply(func, target, tunable)
            except ScheduleError:
                name = next((n for n, f in names if f.same_as(func)), "?")
                refused.append(f"{type(self.rule).__name__}: {name}")
                return None

    if spec.precision == "fp16":
        mod = relax.transform.ConvertToDataflow()(mod)
        mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
    with target:
        mod = relax.get_pipeline("zero")(mod)
        names = [(gv.name_hint, f) for gv, f in mod.functions_items()]
        rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction()]
        mod = dl.ApplyDefaultSchedule(*map(Declining, rules), dl.gpu.Fallback())(mod)
    return mod, refused


def _calibration_record(spec: EngineSpec, calibration: Path | None) -> dict[str, Any]:
    if calibration is None or file_sha256(calibration) != spec.calibration:
        raise UserError(f"the int8 engine was asked for calibration {spec.calibration!r} but "
                        f"got {calibration}: calibrate again")
    return json.loads(Path(calibration).read_text())


def build_engine(onnx_path: str | Path, spec: EngineSpec, out_dir: str | Path,
                 shim: Path | None = None, calibration: Path | None = None) -> dict[str, Any]:
    """Compile ``onnx_path`` for ``spec`` into ``out_dir``; return the engine record.
    ``calibration``: the int8 calibration record (its sha256 is ``spec.calibration``)."""
    import tvm

    from .kernels import load_shim
    from .quantize import int8_convolutions

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    mod, outputs = import_onnx(onnx_path, spec.batch)
    target = spec.tvm_target()
    if spec.offload == "dnnl":
        if shim is None:
            raise ValueError("offload='dnnl' needs the shim library path")
        load_shim(str(shim))
    quantization, slices = None, None
    if spec.precision == "int8" or spec.offload == "dnnl":
        mod = to_nhwc(mod)  # the layout every oneDNN rewrite takes
    if spec.precision == "int8":
        cal = _calibration_record(spec, calibration)
        vnni = int(cal["weight_bits"]) == 8  # 7-bit weights: no VNNI (int8_weight_bits)
        keep = None if vnni or not spec.winograd else float_winograd_reason
        mod, quantization = int8_convolutions(mod, cal, keep)
        if keep is not None:
            mod = offload_convolutions(mod, False, True)  # what int8 left in float32
        quantization |= {k: cal.get(k) for k in ("method", "num_images", "images_sha256",
                                                 "images_source")}
    elif spec.offload == "dnnl":
        mod, slices = merge_heads(mod)
        mod = offload_convolutions(mod, spec.precision == "bf16", spec.winograd)
    layouts = None
    if spec.offload == "dnnl":
        mod, layouts = nhwc_heads(mod)
        mod = offload_glue(mod)
        if spec.precision == "bf16":
            mod = bf16_activations(mod)
    ops = count_ops(mod)
    winograd = winograd_record(mod) if spec.winograd else None
    if quantization is not None:
        quantization["float_gop"] = float_conv_record(mod)
    bf16_count = bf16_outputs(mod) if spec.precision == "bf16" else None
    refused = None
    if spec.target == "cuda":
        mod, refused = _cuda_pipeline(mod, spec, target)
    ex = tvm.compile(mod, target=target)
    ex.export_library(str(out_dir / ENGINE_FILE))
    record = {"spec": spec.key(), "onnx_sha256": file_sha256(onnx_path),
              "shim_sha256": file_sha256(shim) if spec.offload == "dnnl" else None,
              "input_chw": list(INPUT_CHW), "outputs": outputs,
              "output_layouts": layouts or ["NCHW"] * len(outputs), "output_slices": slices,
              "relax_ops": ops,
              "quantization": quantization, "winograd": winograd,
              "bf16_activations": bf16_count, "cuda_rules_refused": refused,
              "compile_s": round(time.perf_counter() - t0, 3)}
    (out_dir / META_FILE).write_text(json.dumps(record, indent=1))
    return record


@dataclass
class Engine:
    """A loaded engine: the Relax VM and its record."""

    vm: Any
    record: dict[str, Any]
    path: Path
    shim: Any = None  # the loaded oneDNN shim module, when the engine offloads to it
    device: Any = None  # where it runs (tvm.cpu() or tvm.cuda(0)); None: the CPU


def load_engine(engine_dir: str | Path, spec: EngineSpec, shim: Path | None = None) -> Engine:
    """Load an engine, refusing one built for another target/precision/shape/TVM version."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from .kernels import load_shim

    engine_dir = Path(engine_dir)
    meta_path = engine_dir / META_FILE
    try:
        record = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{engine_dir} is not an engine directory ({meta_path}: {e}); "
                        "build it with 'ssd-pipeline compile'") from None
    want, got = spec.key(), record.get("spec", {})
    diff = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
    if diff:
        what = ", ".join(f"{k} {a!r} (expected {b!r})" for k, (a, b) in diff.items())
        raise UserError(f"engine {engine_dir} was built for another configuration: {what}; "
                        "rebuild it with 'ssd-pipeline compile'")
    if spec.target == "cuda":
        # the wheel's CUDA runtime (libtvm_runtime_cuda) registers the device only where the
        # CUDA driver (libcuda.so.1) loads, so `exist` is False on a machine without a GPU
        dev = tvm.cuda(0)
        if not dev.exist:
            raise UserError(f"engine {engine_dir} is a CUDA engine and TVM sees no CUDA GPU "
                            "here (tvm.cuda(0).exist is False: no GPU, or no CUDA driver "
                            "libcuda.so.1); run it on a machine with an NVIDIA GPU")
        lib = tvm.runtime.load_module(str(engine_dir / ENGINE_FILE))
        return Engine(VirtualMachine(lib, dev), record, engine_dir, None, dev)
    if record.get("shim_sha256"):
        if shim is None or file_sha256(shim) != record["shim_sha256"]:
            raise UserError(f"engine {engine_dir} needs the oneDNN shim it was built with "
                            "(sha256 mismatch): rebuild the engine")
        shim_mod = load_shim(str(shim))
    else:
        shim_mod = None
    lib = tvm.runtime.load_module(str(engine_dir / ENGINE_FILE))
    return Engine(VirtualMachine(lib, tvm.cpu()), record, engine_dir, shim_mod, tvm.cpu())


def cached_engine_dir(store: ArtifactStore, onnx_path: Path, spec: EngineSpec,
                      calibration: Path | None = None) -> Path:
    """The engine directory for (``onnx_path``, ``spec``), compiled once per content key
    (the spec of an int8 engine holds its calibration record's hash)."""
    from .kernels import build_shim

    shim = build_shim(store) if spec.offload == "dnnl" else None
    inputs = {"onnx_sha256": file_sha256(onnx_path), "engine": spec.key(),
              "shim_sha256": file_sha256(shim) if shim else None}
    return store.get_or_build(
        "tvm-engine", inputs,
        lambda tmp: build_engine(onnx_path, spec, tmp, shim, calibration))


def cached_engine(store: ArtifactStore, onnx_path: Path, spec: EngineSpec,
                  calibration: Path | None = None) -> Engine:
    """The loaded engine for (``onnx_path``, ``spec``), compiled first if the cache has none."""
    from .kernels import build_shim

    shim = build_shim(store) if spec.offload == "dnnl" else None
    return load_engine(cached_engine_dir(store, onnx_path, spec, calibration), spec, shim)
