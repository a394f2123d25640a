"""Export the detector to ONNX: one input ``input`` (float32 NCHW, dynamic batch), the 12 raw
head outputs ``cls_score_0..5``, ``bbox_pred_0..5``, no NMS in the graph (as the original).

The seed-compatible command line (``python -m ssd_pipeline.export``) lives in ``ssd_pipeline.cli``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from ..data import preprocess_settings
from ..model import ModelSpec, build_model, head_outputs_module, load_config

OPSET = 13
INPUT_NAME = "input"
PROVENANCE_KEY = "ssd_pipeline.provenance"


def output_names(num_levels: int = 6) -> list[str]:
    """Class-score maps first, then box-delta maps: the original's output order."""
    return [f"cls_score_{i}" for i in range(num_levels)] + [
        f"bbox_pred_{i}" for i in range(num_levels)
    ]


def check_writable(path: Path) -> None:
    """Fail early, with the path, when ``path`` cannot be created."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {path}: directory {parent} is not writable")
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory; give a file name")


def export_module(module: Any, output: str | Path, names: list[str], input_size: int,
                  opset: int = OPSET, provenance: dict[str, Any] | None = None) -> float:
    """Export a torch module (batch -> outputs ``names``) to ``output`` atomically; seconds."""
    import onnx
    import torch

    output = Path(output)
    dummy = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            # dynamo=False: torch 2.13's default dynamo exporter's optimiser drops the
            # ``+ eps`` of mmdet's L2Norm (NaN on zero features); the TorchScript exporter
            # is also what the original used.
            torch.onnx.export(
                module, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=names,
                dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *names]},
                opset_version=opset, dynamo=False,
            )
        seconds = time.perf_counter() - t0
        if provenance is not None:
            proto = onnx.load(str(tmp))
            entry = proto.metadata_props.add()
            entry.key, entry.value = PROVENANCE_KEY, json.dumps(provenance)
            onnx.save(proto, str(tmp))
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return seconds


def export_onnx(spec: ModelSpec, output: str | Path, opset: int = OPSET) -> dict[str, Any]:
    """Export ``spec`` to ``output`` with its provenance; return what was done (for records)."""
    import onnx
    import torch

    output = Path(output)
    check_writable(output)
    cfg = load_config(spec.config)
    model = build_model(spec)
    names = output_names(len(model.bbox_head.prior_generator.strides))
    pre = preprocess_settings(cfg)
    provenance = {**spec.describe(), **pre, "opset": opset, "outputs": names,
                  "exporter": "torch.onnx.export(dynamo=False)", "torch": torch.__version__}
    seconds = export_module(head_outputs_module(model), output, names, pre["input_size"],
                            opset, provenance)
    nodes = len(onnx.load(str(output), load_external_data=False).graph.node)
    return {"export_s": round(seconds, 3), "nodes": nodes, "bytes": output.stat().st_size,
            "path": str(output)}


def read_provenance(model: Any) -> dict[str, Any]:
    """The provenance record of an ONNX ModelProto written by :func:`export_onnx`."""
    for prop in model.metadata_props:
        if prop.key == PROVENANCE_KEY:
            return json.loads(prop.value)
    return {}
