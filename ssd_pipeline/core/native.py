"""C++ sources of ours compiled once with ``tvm_ffi.cpp.build`` and cached by content: the
engine's oneDNN shim and ceiling kernels, and post-processing's NMS."""

from __future__ import annotations

import shutil
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .cache import ArtifactStore, file_sha256


def build_native(store: ArtifactStore, stage: str, source: Path, lib_name: str, *,
                 cflags: list[str], include_dirs: list[str] | None = None,
                 ldflags: list[str] | None = None, inputs: dict[str, Any] | None = None
                 ) -> Path:
    """``source`` compiled into ``lib_name``, once per source, tvm-ffi, Python and ``inputs``
    (what else the build depends on, e.g. a library's version)."""

    def build(tmp: Path) -> None:
        import tvm_ffi.cpp

        tvm_ffi.cpp.build(
            lib_name.removesuffix(".so"), cpp_files=[str(source)],
            extra_include_paths=include_dirs or [], extra_cflags=cflags,
            extra_ldflags=ldflags or [], build_directory=str(tmp / "build"),
            output=str(tmp / lib_name))
        shutil.rmtree(tmp / "build", ignore_errors=True)

    key = {"source_sha256": file_sha256(source), "tvm_ffi": version("apache-tvm-ffi"),
           "python": sys.version.split()[0], **(inputs or {})}
    return store.get_or_build(stage, key, build) / lib_name
