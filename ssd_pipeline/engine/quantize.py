"""int8 engines: the NHWC graph's convolutions become oneDNN int8 calls, and u8 activations
flow from one convolution to the next without a float round trip.

Step 1 rewrites each calibrated convolution (found by its weights' hash, see
:mod:`ssd_pipeline.artifacts.calibrate`) to ``quantize(x) -> conv2d_nhwc_int8 -> dequantize``
(the dequantize only where the output is u8: after a ReLU with a calibrated range; the heads
write float32). Step 2 removes what step 1 made redundant: ``quantize(dequantize(q))`` with
equal scales is ``q``, and ``quantize(max_pool(dequantize(q)))`` is ``max_pool(q)`` (max
commutes with a monotone map), so the only float tensors left are those a float op needs
(L2Norm, the heads' outputs, the first convolution's input).

Residual blocks (the embedded model): ``relu(conv + shortcut)`` is one call whose add is a
oneDNN post-op (step 1a); a shortcut that is itself a dequantized u8 tensor is passed as u8
with the scales folded into the call (step 3).

A convolution the caller's ``keep_float`` names (on CPUs without VNNI, the big layers float32
Winograd F(4x4) runs faster than int8) is left as a float32 ``conv2d`` for the float offload
pass; its input is the previous layer's dequantized output and its output is quantized by the
next int8 layer, as around the first convolution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .patterns import OC_BLOCK

WEIGHT_AXES_OHWI_TO_OIHW = (0, 3, 1, 2)
RESIDUAL_ARG = 15  # conv2d_nhwc_int8_add's residual: after src, 3 constants, 2 scales, 9 ints


def quantize_weights(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel (axis 0) int8 weights and their float32 scales."""
    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1).astype(np.float64)
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


def pad_output_channels(wq: np.ndarray, wscale: np.ndarray, bias: np.ndarray, block: int
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero weights (scale 1, bias 0) appended along the output channels up to a multiple of
    ``block``: the extra channels compute zeros that are sliced off."""
    extra = -wq.shape[0] % block
    if not extra:
        return wq, wscale, bias
    return (np.concatenate([wq, np.zeros((extra, *wq.shape[1:]), wq.dtype)]),
            np.concatenate([wscale, np.ones(extra, wscale.dtype)]),
            np.concatenate([bias, np.zeros(extra, bias.dtype)]))


def _scalar(e: Any) -> float | None:
    from tvm.ir.expr import Constant

    return float(e.value.numpy()) if isinstance(e, Constant) else None


def int8_convolutions(mod: Any, calibration: dict[str, Any],
                      keep_float: Callable[[Any, Any, Any], str | None] | None = None
                      ) -> tuple[Any, dict[str, Any]]:
    """Rewrite an NHWC module (:func:`~ssd_pipeline.engine.compile.to_nhwc`, as
    :func:`~ssd_pipeline.engine.compile.offload_convolutions` takes it) for int8; return it
    with a summary of what ran in which precision. ``keep_float(attrs, weight shape, output
    shape)``: why a convolution should stay a float32 ``conv2d`` (left for the float offload
    pass), or None to quantize it."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, is_tuple, rewrite_call, wildcard

    from ..core.onnxfile import weight_key
    from .kernels import CONV2D_NHWC, CONV2D_NHWC_INT8, CONV2D_NHWC_INT8_ADD
    from .patterns import conv_patterns, int_args

    convs = calibration["convs"]
    bits = int(calibration["weight_bits"])
    floats: dict[str, str] = {}  # by layer name: the rewriter may visit a match twice
    p = conv_patterns()
    x, w, b, conv, add, relu = p.x, p.w, p.b, p.conv, p.add, p.relu

    def f32(v: float) -> Any:
        return relax.const(np.float32(v), "float32")

    def calibrated(m: Any) -> tuple[dict[str, Any] | None, str | None]:
        w_ohwi = m[w].value.numpy()
        entry = convs.get(weight_key(w_ohwi.transpose(WEIGHT_AXES_OHWI_TO_OIHW)))
        reason = "not in the calibration record" if entry is None else entry["float_reason"]
        return entry, reason

    def faster_in_float(m: Any) -> str | None:
        return keep_float(m[conv].attrs, m[w].ty.shape, m[conv].ty.shape) if keep_float \
            else None

    def int8_call(m: Any, entry: dict[str, Any], relu: bool, dst_highest: float | None,
                  residual: Any = None) -> Any:
        """quantize(x) -> oneDNN int8 conv (-> + residual) (-> ReLU) -> u8 with the range
        ``dst_highest`` then dequantize, or float32 where there is no such range."""
        bias = m[b].value.numpy().reshape(-1)
        s_src = entry["src_highest"] / 255.0
        u8_out = relu and bool(dst_highest)
        s_dst = dst_highest / 255.0 if u8_out else 1.0
        wq, wscale = quantize_weights(m[w].value.numpy(), bits)
        if residual is None:  # a residual has the unpadded shape: its convolution stays so
            wq, wscale, bias = pad_output_channels(wq, wscale, bias, OC_BLOCK)
        src = relax.op.quantize(m[x], f32(s_src), relax.const(0, "int8"), axis=-1,
                                out_dtype="uint8")
        shape = list(m[conv].ty.shape)
        out = relax.call_dps_packed(
            CONV2D_NHWC_INT8 if residual is None else CONV2D_NHWC_INT8_ADD,
            [src, relax.const(wq), relax.const(wscale), relax.const(bias),
             relax.prim_value(tvm.tirx.FloatImm("float64", s_src)),
             relax.prim_value(tvm.tirx.FloatImm("float64", s_dst)),
             *int_args([*geometry(m), relu]), *([] if residual is None else [residual])],
            out_ty=relax.TensorType([*shape[:3], wq.shape[0]], "uint8" if u8_out else "float32"))
        if wq.shape[0] != shape[3]:
            out = relax.op.strided_slice(out, axes=[3], begin=[0], end=[shape[3]])
        if not u8_out:
            return out
        return relax.op.dequantize(out, f32(s_dst), relax.const(0, "int8"), axis=-1,
                                   out_dtype="float32")

    geometry, supported = p.geometry, p.supported

    def rewrite(expr: Any, m: Any) -> Any:
        if not supported(m):
            return expr
        is_relu = isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.nn.relu"
        entry, reason = calibrated(m)
        if reason is None and (faster := faster_in_float(m)) is not None:
            floats[entry["name"]] = faster
            return expr  # the float offload pass takes it, with its Winograd and pool fusion
        if reason is not None:
            floats[entry["name"] if entry else f"conv {m[w].value.numpy().shape}"] = reason
            return relax.call_dps_packed(
                CONV2D_NHWC, [m[x], m[w], relax.const(m[b].value.numpy().reshape(-1)),
                              *int_args([*geometry(m), is_relu, 0])],
                out_ty=expr.ty)
        return int8_call(m, entry, is_relu, entry["dst_highest"])

    # step 1a: a residual block's conv -> add -> ReLU is one oneDNN call (the add a binary
    # post-op) writing u8, where the ReLU output was calibrated
    residual, block = p.residual, p.block

    def fuse_residual(expr: Any, m: Any) -> Any:
        entry, reason = calibrated(m) if supported(m) else (None, "unsupported")
        if (reason is not None or faster_in_float(m) is not None
                or not entry.get("add_relu_highest")
                or str(m[residual].ty.dtype) != "float32"):
            return expr
        return int8_call(m, entry, True, entry["add_relu_highest"], m[residual])

    mod["main"] = rewrite_call(block, fuse_residual, mod["main"])
    # step 1b: every other convolution
    mod["main"] = rewrite_call(relu | add, rewrite, mod["main"])

    # step 2: u8 stays u8 between convolutions
    q_in, s1, z1, s2, z2 = wildcard(), is_const(), is_const(), is_const(), is_const()
    deq = is_op("relax.dequantize")(q_in, s1, z1)
    pool = is_op("relax.nn.max_pool2d")(deq)
    requant = is_op("relax.quantize")(deq | pool, s2, z2)

    def fold(expr: Any, m: Any) -> Any:
        same = (_scalar(m[s1]) == _scalar(m[s2]) and _scalar(m[z1]) == _scalar(m[z2])
                and str(m[q_in].ty.dtype) == str(expr.attrs.out_dtype))
        if not same:
            return expr
        if pool in m:
            return relax.Call(m[pool].op, [m[q_in]], m[pool].attrs)
        return m[q_in]

    mod["main"] = rewrite_call(requant, fold, mod["main"])

    # step 3: a residual that is a dequantized u8 tensor is added as u8: the call's weight
    # scales, bias and dst scale are divided by its scale (ReLU commutes with that), so no
    # float copy of the block's input is made
    q_r, s_r, z_r, fused = wildcard(), is_const(), is_const(), wildcard()
    deq_r = is_op("relax.dequantize")(q_r, s_r, z_r)
    fused_call = is_op("relax.call_dps_packed")(
        fused, is_tuple([wildcard() for _ in range(RESIDUAL_ARG)] + [deq_r]))

    def u8_residual(expr: Any, m: Any) -> Any:
        scale = _scalar(m[s_r])
        if (getattr(m[fused], "global_symbol", None) != CONV2D_NHWC_INT8_ADD
                or str(expr.ty.dtype) != "uint8" or _scalar(m[z_r]) != 0 or not scale):
            return expr
        args = list(expr.args[1].fields)
        for i in (2, 3):  # weight scales, bias
            args[i] = relax.const((args[i].value.numpy() / scale).astype(np.float32))
        s_dst = args[5].value
        args[5] = relax.prim_value(tvm.tirx.FloatImm(
            "float64", float(getattr(s_dst, "value", s_dst)) / scale))
        args[RESIDUAL_ARG] = m[q_r]
        return relax.call_dps_packed(expr.args[0], args, out_ty=expr.ty)

    mod["main"] = rewrite_call(fused_call, u8_residual, mod["main"])
    mod = relax.transform.DeadCodeElimination()(mod)
    calls = int8_call_outputs(mod)
    return mod, {"weight_bits": bits, "int8_convs": len(calls),
                 "u8_outputs": sum(dt == "uint8" for _, dt, _ in calls),
                 "residual_adds": sum(r is not None for _, _, r in calls),
                 "u8_residuals": sum(r == "uint8" for _, _, r in calls),
                 "float_convs": [{"name": k, "reason": v} for k, v in floats.items()]}


def int8_call_outputs(mod: Any) -> list[tuple[str, str, str | None]]:
    """(function, output dtype, residual dtype or None) of each int8 convolution call left in
    ``main`` (read from the graph, not from what the rewriter was asked: it may visit a match
    more than once)."""
    from tvm import relax

    from .kernels import CONV2D_NHWC_INT8, CONV2D_NHWC_INT8_ADD

    out: list[tuple[str, str, str | None]] = []

    def visit(e: Any) -> None:
        name = getattr(e.args[0], "global_symbol", None) if isinstance(e, relax.Call) and \
            e.args else None
        if name in (CONV2D_NHWC_INT8, CONV2D_NHWC_INT8_ADD):
            fields = e.args[1].fields
            residual = (str(fields[RESIDUAL_ARG].ty.dtype)
                        if name == CONV2D_NHWC_INT8_ADD else None)
            out.append((name, str(e.ty.dtype), residual))

    relax.analysis.post_order_visit(mod["main"], visit)
    return out
