"""The Relax patterns the oneDNN rewrites match (float and int8 alike), and the integer
arguments they pass to the shim."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# oneDNN's convolution kernels block output channels by 16 (AVX-512; AVX2's 8 divides it): a
# tail costs far more than its share, so the heads (float, compile.merge_heads) and int8
# convolutions (quantize) compute a multiple of 16 channels and slice the rest off. int8:
# SSD300's 324-channel head at 38x38, bs 8, 157 ms, padded to 336 114 ms (328 as slow as 324);
# fp32, the embedded model's merged heads: 38x38 32->40 -> 48 bs 8 1.75 -> 1.46 ms, bs 1 0.206
# -> 0.182; 19x19 64->60 -> 64 1.02 -> 0.90, 0.138 -> 0.124; 10x10 128->60 -> 64 0.54 -> 0.47
OC_BLOCK = 16


@dataclass(frozen=True)
class ConvPatterns:
    """``conv2d(x, w) + b`` (``add``), its ReLU (``relu``), and a residual block's
    ``relu(add + residual)`` in either operand order (``block``)."""

    x: Any
    w: Any
    b: Any
    residual: Any
    conv: Any
    add: Any
    relu: Any
    block: Any

    def supported(self, m: Any) -> bool:
        """The match is a convolution the shim takes: NHWC data, OHWI weights, no groups,
        one bias per output channel."""
        a = m[self.conv].attrs
        return (a.data_layout == "NHWC" and a.kernel_layout == "OHWI" and int(a.groups) == 1
                and m[self.b].value.numpy().size == int(m[self.conv].ty.shape[3]))

    def geometry(self, m: Any) -> list[int]:
        """Strides, pads, dilations of the matched convolution: the shim's first ints."""
        a = m[self.conv].attrs
        return [*map(int, a.strides), *map(int, a.padding), *map(int, a.dilation)]


def conv_patterns() -> ConvPatterns:
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, w, b, residual = wildcard(), is_const(), is_const(), wildcard()
    conv = is_op("relax.nn.conv2d")(x, w)
    add = is_op("relax.add")(conv, b)
    block = is_op("relax.nn.relu")(is_op("relax.add")(add, residual)
                                   | is_op("relax.add")(residual, add))
    return ConvPatterns(x, w, b, residual, conv, add, is_op("relax.nn.relu")(add), block)


def int_args(values: list[int]) -> list[Any]:
    """The shim's int64 arguments (strides, pads, dilations, flags)."""
    import tvm
    from tvm import relax

    return [relax.prim_value(tvm.tirx.IntImm("int64", int(v))) for v in values]
