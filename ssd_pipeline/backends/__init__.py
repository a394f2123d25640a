"""Backend registry: a name -> the class that prepares it. One line here adds a backend."""

from __future__ import annotations

import importlib

from ..core.errors import UserError
from .base import Backend, OpTime, Runner

_REGISTRY: dict[str, str] = {
    "torch": "ssd_pipeline.backends.torch_backend:TorchBackend",
    "onnxruntime": "ssd_pipeline.backends.ort_backend:OnnxRuntimeBackend",
    "tvm": "ssd_pipeline.backends.tvm_backend:TvmBackend",
    "openvino": "ssd_pipeline.backends.openvino_backend:OpenVinoBackend",
}


def names() -> list[str]:
    """Every registered backend: the default selection everywhere."""
    return list(_REGISTRY)


def select(raw: str | None) -> list[str]:
    """The ``--backends`` comma list checked against the registry; None or empty: all."""
    chosen = [b.strip() for b in (raw or "").split(",") if b.strip()] or names()
    unknown = [b for b in chosen if b not in _REGISTRY]
    if unknown:
        raise UserError(f"--backends: unknown backend {unknown[0]!r}; known: "
                        f"{', '.join(_REGISTRY)}")
    return chosen


def cases(backends: list[str], precisions: str | None = None,
          available_only: bool = True) -> list[tuple[str, str]]:
    """(backend, precision) pairs: each backend's precisions (those this host runs, unless
    ``available_only`` is False), narrowed to the ``--precisions`` comma list if given."""
    wanted = [p.strip() for p in (precisions or "").split(",") if p.strip()]
    chosen = [get_backend(name) for name in backends]  # a missing package is named here
    for p in wanted:
        if not any(p in b.precisions for b in chosen):
            offered = sorted({q for b in chosen for q in b.precisions})
            raise UserError(f"no precision {p!r} in backends {', '.join(backends)}; they "
                            f"offer {', '.join(offered)}")
    out = []
    for b in chosen:
        offered = b.available_precisions() if available_only else b.precisions
        out += [(b.name, p) for p in offered if not wanted or p in wanted]
    return out


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


__all__ = ["Backend", "OpTime", "Runner", "cases", "get_backend", "names", "select"]
