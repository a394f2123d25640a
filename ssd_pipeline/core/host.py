"""Facts about this host that every layer reads: CPU flags, LLVM's name for the CPU, the
cores this process may use, which reduced precisions the CPU offers, library versions."""

from __future__ import annotations

import functools
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import UserError

# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA, oneDNN 3.x names; aliases share a level),
# lowest first, each with the /proc/cpuinfo flags it adds to the one below (a trailing "*": every
# flag with that prefix). A cap drops the flags of every level above it.
ISA_LEVELS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("SSE41",), ()),
    (("AVX",), ("avx",)),
    (("AVX2",), ("avx2", "fma")),
    (("AVX2_VNNI",), ("avx_vnni",)),
    (("AVX2_VNNI_2",), ("avx_vnni_int8", "avx_ne_convert")),
    (("AVX512_CORE",), ("avx512*", "avx10*")),
    (("AVX512_CORE_VNNI",), ("avx512_vnni",)),
    (("AVX512_CORE_BF16",), ("avx512_bf16",)),
    (("AVX10_1_512", "AVX512_CORE_FP16"), ("avx512_fp16",)),
    (("AVX10_1_512_AMX", "AVX512_CORE_AMX"), ("amx*",)),
    (("AVX10_1_512_AMX_FP16", "AVX512_CORE_AMX_FP16"), ("amx_fp16",)),
)


def _matches(flag: str, pattern: str) -> bool:
    return flag.startswith(pattern[:-1]) if pattern.endswith("*") else flag == pattern


def cap_flags(flags: frozenset[str], cap: str | None) -> frozenset[str]:
    """``flags`` less every instruction set above oneDNN's ``cap`` (None or DEFAULT: no cap).
    oneDNN then runs its kernels for that level, and the suite picks its own for it too (the
    Winograd transforms' vector width and cuts, the peak loop, bf16 and VNNI), so an AVX-512
    host measures what an AVX2 one would run."""
    if cap is None or cap.upper() == "DEFAULT":
        return flags
    level = next((i for i, (aliases, _) in enumerate(ISA_LEVELS) if cap.upper() in aliases),
                 None)
    if level is None:
        known = ", ".join(n for aliases, _ in ISA_LEVELS for n in aliases)
        raise UserError(f"ONEDNN_MAX_CPU_ISA={cap} is not one of oneDNN's levels: {known} or "
                        "DEFAULT; unset it to use the whole CPU")
    dropped = [p for _, adds in ISA_LEVELS[level + 1:] for p in adds]
    return frozenset(f for f in flags if not any(_matches(f, p) for p in dropped))


def isa_cap() -> str | None:
    """oneDNN's instruction-set cap from the environment (ONEDNN_MAX_CPU_ISA, else its older
    name DNNL_MAX_CPU_ISA, as oneDNN reads them, in any case), upper-cased; None without one
    or for DEFAULT."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return None if cap in ("", "DEFAULT") else cap


@functools.cache
def _cpuinfo_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.cache
def _capped(cap: str | None) -> frozenset[str]:
    return cap_flags(_cpuinfo_flags(), cap)


def cpu_flags() -> frozenset[str]:
    """The ``flags`` line of /proc/cpuinfo (empty where there is none), less what
    ONEDNN_MAX_CPU_ISA caps (``cap_flags``): the instruction sets this process may use."""
    return _capped(isa_cap())


def cap_takes_flags() -> bool:
    """Whether ONEDNN_MAX_CPU_ISA leaves this process fewer instruction sets than the CPU has."""
    return cpu_flags() != _cpuinfo_flags()


def cap_note() -> str:
    """`` under ONEDNN_MAX_CPU_ISA=<cap>`` where that cap takes flags away, else "": for
    messages that say this CPU lacks an instruction set."""
    return f" under ONEDNN_MAX_CPU_ISA={isa_cap()}" if cap_takes_flags() else ""


def cap_summary() -> str | None:
    """One line on what an ONEDNN_MAX_CPU_ISA cap governs here, or None without one."""
    cap = isa_cap()
    if cap is None:
        return None
    cpu_flags()  # an unknown level is refused here, before anything runs
    return (f"ONEDNN_MAX_CPU_ISA={cap}: oneDNN (the TVM engine's convolutions, OpenVINO's, "
            "PyTorch's) and this suite's own kernel choices keep to it; ONNX Runtime's kernels "
            "do not read it, so ratios to ONNX Runtime set the cap against this CPU's widest"
            + (" (and its speed records carry no fractions of the capped ceilings)"
               if cap_takes_flags() else ""))


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
    """LLVM's name for this CPU (TVM's bundled LLVM rejects -mcpu=native); under an
    instruction-set cap that takes flags away, x86-64's level for what is left, so TVM's own
    kernels keep to it too."""
    import tvm

    if cap_takes_flags():
        flags = cpu_flags()
        return ("x86-64-v4" if "avx512f" in flags else "x86-64-v3" if "avx2" in flags
                else "x86-64-v2")
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
            "amx_bf16": "amx_bf16" in flags, "max_cpu_isa": isa_cap(),
            "versions": versions(*STACK)}
