"""Backend registry: a name -> the class that prepares it. One line here adds a backend."""

from __future__ import annotations

import importlib

from ..errors import UserError
from .base import Backend, Runner, default_threads

_REGISTRY: dict[str, str] = {
    "torch": "ssd_pipeline.backends.torch_backend:TorchBackend",
    "onnxruntime": "ssd_pipeline.backends.ort_backend:OnnxRuntimeBackend",
    "tvm": "ssd_pipeline.backends.tvm_backend:TvmBackend",
    "openvino": "ssd_pipeline.backends.openvino_backend:OpenVinoBackend",
}


def names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend registered as ``name`` (imported only when asked for)."""
    if name not in _REGISTRY:
        raise UserError(f"unknown backend {name!r}; known: {', '.join(_REGISTRY)}")
    module, _, cls = _REGISTRY[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except ModuleNotFoundError as e:
        raise UserError(f"backend {name!r} needs the Python package {e.name!r}, which is not "
                        "installed: run scripts/install.sh (it installs every backend)") from None


__all__ = ["Backend", "Runner", "default_threads", "get_backend", "names"]
