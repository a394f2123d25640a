"""Native kernels the TVM engines call: built from source here, cached by content.

``dnnl_conv.cc`` wraps oneDNN convolutions as TVM FFI functions (see its header comment).
It is compiled with ``tvm_ffi.cpp.build`` against the oneDNN of the ``onednn-cpu-gomp`` wheel
and registered as global functions that Relax's ``call_dps_packed`` finds by name.
"""

from __future__ import annotations

import functools
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ...core.cache import ArtifactStore, file_sha256
from ...core.errors import UserError
from ...core.native import build_native

SOURCE = Path(__file__).with_name("dnnl_conv.cc")
PEAK_SOURCE = Path(__file__).with_name("peak.cc")
LIB_NAME = "ssd_dnnl.so"
CONV2D_NHWC = "ssd_pipeline.dnnl.conv2d_nhwc"
CONV2D_NHWC_ADD = "ssd_pipeline.dnnl.conv2d_nhwc_add"
CONV2D_NHWC_INT8 = "ssd_pipeline.dnnl.conv2d_nhwc_int8"
CONV2D_NHWC_INT8_ADD = "ssd_pipeline.dnnl.conv2d_nhwc_int8_add"
MAX_POOL2D_NHWC = "ssd_pipeline.dnnl.max_pool2d_nhwc"
NHWC_TO_NCHW = "ssd_pipeline.dnnl.nhwc_to_nchw"
L2NORM_NHWC = "ssd_pipeline.dnnl.l2norm_nhwc"


def _onednn_prefix() -> Path:
    prefix = Path(sys.prefix)
    if not (prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp").is_file():
        raise UserError(
            f"oneDNN headers not found under {prefix}/include: install the 'tvm' extra "
            "(pip install -e '.[tvm]' installs onednn-cpu-gomp and onednn-devel-cpu-gomp), "
            "or build the engine with offload='none'")
    return prefix


def shim_inputs() -> dict[str, Any]:
    try:
        onednn = version("onednn-cpu-gomp")
    except PackageNotFoundError:
        onednn = "missing"
    return {"source_sha256": file_sha256(SOURCE), "onednn": onednn,
            "tvm_ffi": version("apache-tvm-ffi"), "python": sys.version.split()[0]}


def _build(store: ArtifactStore, stage: str, source: Path, lib_name: str) -> Path:
    """``source`` compiled against oneDNN, once per source/oneDNN/tvm-ffi version."""
    prefix = _onednn_prefix()
    return build_native(
        store, stage, source, lib_name, cflags=["-O2", "-fopenmp"],
        include_dirs=[str(prefix / "include")],
        ldflags=[f"-L{prefix / 'lib'}", "-ldnnl", "-fopenmp", f"-Wl,-rpath,{prefix / 'lib'}"],
        inputs={"onednn": shim_inputs()["onednn"]})


def build_shim(store: ArtifactStore) -> Path:
    """The compiled convolution shim library."""
    return _build(store, "dnnl-shim", SOURCE, LIB_NAME)


def build_peak(store: ArtifactStore) -> Path:
    """The compiled ceiling kernels (``peak.cc``)."""
    return _build(store, "peak-kernels", PEAK_SOURCE, "ssd_peak.so")


@functools.cache
def load_shim(path: str) -> Any:
    """Load the shim and register its functions globally (once per process)."""
    import tvm_ffi

    mod = tvm_ffi.load_module(path)
    tvm_ffi.register_global_func(CONV2D_NHWC, mod.conv2d_nhwc, override=True)
    tvm_ffi.register_global_func(CONV2D_NHWC_ADD, mod.conv2d_nhwc_add, override=True)
    tvm_ffi.register_global_func(CONV2D_NHWC_INT8, mod.conv2d_nhwc_int8, override=True)
    tvm_ffi.register_global_func(CONV2D_NHWC_INT8_ADD, mod.conv2d_nhwc_int8_add, override=True)
    tvm_ffi.register_global_func(MAX_POOL2D_NHWC, mod.max_pool2d_nhwc, override=True)
    tvm_ffi.register_global_func(NHWC_TO_NCHW, mod.nhwc_to_nchw, override=True)
    tvm_ffi.register_global_func(L2NORM_NHWC, mod.l2norm_nhwc, override=True)
    return mod
