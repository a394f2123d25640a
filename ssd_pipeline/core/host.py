"""Facts about this host that every layer reads: CPU flags, LLVM's name for the CPU, the
cores this process may use, which reduced precisions the CPU offers, library versions."""

from __future__ import annotations

import functools
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The ``flags`` line of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def has_vnni() -> bool:
    """AVX512-VNNI or AVX-VNNI: u8*s8 dot products accumulate in int32 (no int16 pair sum)."""
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


def int8_weight_bits() -> int:
    """Bits int8 weights may use here: without VNNI, AVX2's ``vpmaddubsw`` sums u8*s8 pairs in
    int16, which 255*127*2 overflows and 255*63*2 does not."""
    return 8 if has_vnni() else 7


def host_cpu() -> str:
    """LLVM's name for this CPU (TVM's bundled LLVM rejects -mcpu=native)."""
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


def default_threads() -> int:
    """Cores this process may use (affinity-aware, unlike os.cpu_count), shared evenly with
    the other processes torchrun started on this host (LOCAL_WORLD_SIZE)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // local_processes())


def local_processes() -> int:
    """How many processes torchrun started on this host (LOCAL_WORLD_SIZE; 1 without it)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def versions(*packages: str) -> dict[str, str]:
    """Installed version of each package ("not installed" where it is missing)."""
    out = {}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


STACK = ("torch", "mmdet", "mmcv", "onnx", "onnxsim", "onnxruntime", "apache-tvm", "openvino",
         "pycocotools")


def machine_info() -> dict[str, object]:
    """What a speed number depends on: CPU, the flags that matter, threads, library versions."""
    flags = cpu_flags()
    try:
        llvm = host_cpu()
    except ImportError:
        llvm = "unknown (TVM not installed)"
    return {"cpu_model": cpu_model(), "llvm_cpu": llvm, "threads": default_threads(),
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "avx512_vnni": "avx512_vnni" in flags,
            "amx_bf16": "amx_bf16" in flags, "versions": versions(*STACK)}
