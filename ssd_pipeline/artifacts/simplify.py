"""Simplify the exported graph with onnxsim, and prove the result computes the same thing.

The check runs both graphs in ONNX Runtime on seeded random input and refuses the simplified
model when any output's relative error exceeds ``simplify.rel_err_max`` (expectations file).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..core.onnxfile import load_onnx
from ..parity import rel_errs


def _ort_outputs(model_bytes: bytes, x: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return names, sess.run(names, {sess.get_inputs()[0].name: x})


def simplify_onnx(src: str | Path, dst: str | Path, rel_err_max: float,
                  check_batch: int = 2) -> dict[str, Any]:
    """Write the onnxsim-simplified ``src`` to ``dst`` after checking it against ``src``."""
    import onnx
    import onnxsim

    src, dst = Path(src), Path(dst)
    model = load_onnx(src)
    t0 = time.perf_counter()
    # A dynamic batch dim stays symbolic; onnxsim checks on a concrete shape of its own.
    simplified, ok = onnxsim.simplify(model)
    simplify_s = time.perf_counter() - t0
    if not ok:
        raise RuntimeError(f"onnxsim's own check failed for {src}")
    del simplified.metadata_props[:]
    simplified.metadata_props.extend(model.metadata_props)  # keep the provenance record
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.dim_value > 0 else check_batch for d in dims]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 50
    names, ref = _ort_outputs(model.SerializeToString(), x)
    names_s, got = _ort_outputs(simplified.SerializeToString(), x)
    if names != names_s:
        raise RuntimeError(f"onnxsim changed the outputs: {names} -> {names_s}")
    errs = rel_errs(got, ref, names)
    worst = max(errs, key=errs.get)
    if errs[worst] > rel_err_max:
        raise RuntimeError(
            f"simplified model differs from {src}: {worst} relative error {errs[worst]:.2e}, "
            f"expected <= {rel_err_max:.0e}"
        )
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        onnx.save(simplified, str(tmp))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"simplify_s": round(simplify_s, 3), "nodes_before": len(model.graph.node),
            "nodes_after": len(simplified.graph.node), "max_rel_err": errs[worst],
            "bytes": dst.stat().st_size}
