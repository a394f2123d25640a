"""Reading ONNX files safely: an ONNX model can name external-data files by path, and a
``location`` that leaves the model's directory would make every loader (onnx, ONNX Runtime,
OpenVINO) read a file the user never chose. Every ONNX the suite reads passes here first."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    from onnx import ModelProto


def _tensors(graph: Any) -> Any:
    """Every TensorProto of a graph: initializers, constant attributes, subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def check_external_data(path: str | os.PathLike[str], model: Any = None) -> None:
    """Refuse an ONNX whose external data points outside its own directory."""
    import onnx

    path = Path(path)
    if model is None:
        model = load_onnx_unchecked(path, load_external_data=False)
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        norm = os.path.normpath(location)
        if not location or os.path.isabs(location) or norm == ".." or \
                norm.startswith(".." + os.sep):
            raise UserError(
                f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the "
                f"model's directory {path.parent}; the suite reads external data only from "
                "beside the model: move the data file there and name it relative to it")


def load_onnx_unchecked(path: Path, load_external_data: bool) -> ModelProto:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except FileNotFoundError:
        raise UserError(f"ONNX file not found: {path}") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable ONNX model ({type(e).__name__}); "
                        "export it again") from None


def load_onnx(path: str | os.PathLike[str], load_external_data: bool = True) -> ModelProto:
    """``onnx.load`` after :func:`check_external_data`; one-line errors for bad files."""
    path = Path(path)
    model = load_onnx_unchecked(path, load_external_data=False)
    check_external_data(path, model)
    if load_external_data and any(True for _ in _external(model.graph)):
        model = load_onnx_unchecked(path, load_external_data=True)
    return model


def _external(graph: Any) -> Any:
    import onnx

    return (t for t in _tensors(graph) if t.data_location == onnx.TensorProto.EXTERNAL)


def weight_key(w_oihw: np.ndarray) -> str:
    """Identity of a convolution across graph rewrites: its float32 OIHW weights' hash
    (calibration records and the int8 engine meet on it)."""
    return hashlib.sha256(np.ascontiguousarray(w_oihw, np.float32).tobytes()).hexdigest()[:24]
