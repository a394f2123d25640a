"""int8 calibration: calibration images -> activation ranges for our engine, and the QDQ ONNX
the int8 peers run. ONNX Runtime's own calibrators measure the ranges (min-max, percentile,
entropy): we do not re-write them.

Our engine quantizes each convolution whose input is non-negative (every one that follows a
ReLU, directly or through a max-pool) to u8 with zero point 0 and scale ``highest / 255``; a
convolution with a signed input (the first one: the normalized image) stays float32, because
a u8 zero point would cost oneDNN a compensation pass. Weights: symmetric per output channel,
7 bits on a CPU without VNNI (AVX2's ``vpmaddubsw`` sums u8*s8 pairs in int16: 255*127*2
overflows it, 255*63*2 does not), 8 bits with VNNI.

Entries are keyed by a hash of each convolution's float32 OIHW weights: the engine, which sees
the graph after TVM's import, finds its convolutions by the same hash.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import UserError
from ..core.host import has_vnni, int8_weight_bits
from ..core.onnxfile import load_onnx, weight_key

METHODS = ("minmax", "percentile", "entropy")
CALIBRATION_FILE = "calibration.json"
ORT_RANGES_FILE = "ort_tensor_ranges.json"  # the same ranges, as ONNX Runtime's cache reads them
QDQ_FILE = "model_qdq.onnx"
FORMAT = "ssd_pipeline.calibration/2"
CHUNK_IMAGES = 4


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    if name not in METHODS:
        raise UserError(f"unknown calibration method {name!r}; choose one of "
                        f"{', '.join(METHODS)}")
    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantization tools print progress and advise its pre-processing script
    (shape inference for transformer graphs) on every call: noise in a test log."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


class _Reader:
    """ONNX Runtime's CalibrationDataReader over preprocessed batches."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]) -> None:
        self.input_name, self.batches = input_name, iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.batches, None)
        return None if x is None else {self.input_name: x}


def _graph(onnx_path: Path) -> tuple[Any, dict[str, Any], dict[str, list[Any]], dict[str, Any]]:
    model = load_onnx(onnx_path)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {i.name: i for i in model.graph.initializer}
    return model, producer, consumers, inits


def first_conv(onnx_path: Path) -> str:
    model = load_onnx(onnx_path)
    return next(n.name for n in model.graph.node if n.op_type == "Conv")


def calibrate(onnx_path: Path, batches: Iterable[np.ndarray], method: str
              ) -> tuple[dict[str, Any], Any]:
    """Activation ranges of every convolution's input and (ReLU) output, by weight hash; and
    ONNX Runtime's TensorsData of every tensor (what its ``quantize_static`` reads)."""
    from onnx import numpy_helper
    from onnxruntime.quantization.calibrate import create_calibrator

    ort_method = _method(method)
    model, producer, consumers, inits = _graph(onnx_path)
    input_name = next(i.name for i in model.graph.input if i.name not in inits)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        calibrator = create_calibrator(
            str(onnx_path), ["Conv", "Relu", "MaxPool"], str(Path(tmp) / "augmented.onnx"),
            calibrate_method=ort_method)
        # a few images per call: the calibrator keeps every intermediate tensor of what it is
        # given until the call ends (~0.3 GB per SSD300 image); ranges and histograms merge
        # across calls
        count = 0
        chunk: list[np.ndarray] = []
        for x in [*batches, None]:
            if x is not None:
                chunk.append(x)
                count += 1
            if chunk and (x is None or len(chunk) == CHUNK_IMAGES):
                calibrator.collect_data(_Reader(input_name, chunk))
                chunk = []
        tensors_data = calibrator.compute_data()
        ranges = {k: (float(np.min(v.range_value[0])), float(np.max(v.range_value[1])))
                  for k, v in tensors_data.data.items()}
    if count == 0:
        raise UserError("calibration got no images")

    def source_range(tensor: str) -> tuple[float, float] | None:
        # a max-pool passes u8 through unchanged: its output shares its input's scale
        node = producer.get(tensor)
        if node is not None and node.op_type == "MaxPool":
            return source_range(node.input[0])
        return ranges.get(tensor)

    convs: dict[str, Any] = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        src = source_range(node.input[0])
        after = consumers.get(node.output[0], [])
        relu = len(after) == 1 and after[0].op_type == "Relu"
        dst = ranges.get(after[0].output[0]) if relu else None
        # a residual block's conv -> Add -> Relu: the engine runs the add and the ReLU inside
        # the convolution and writes u8 with the ReLU output's range
        added = len(after) == 1 and after[0].op_type == "Add"
        then = consumers.get(after[0].output[0], []) if added else []
        add_relu = (ranges.get(then[0].output[0])
                    if len(then) == 1 and then[0].op_type == "Relu" else None)
        entry: dict[str, Any] = {"name": node.name, "src_highest": src and src[1],
                                 "dst_highest": dst and dst[1],
                                 "add_relu_highest": add_relu and add_relu[1],
                                 "float_reason": None}
        if src is None:
            entry["float_reason"] = "its input was not calibrated"
        elif src[0] < 0:
            entry["float_reason"] = (f"its input is signed (lowest {src[0]:.4g}): u8 would "
                                     "need a zero point; stays float32")
        elif src[1] <= 0:
            entry["float_reason"] = "its input was all zeros on the calibration images"
        convs[weight_key(w)] = entry
    return {"format": FORMAT, "method": method, "num_images": count,
            "weight_bits": int8_weight_bits(), "calibrate_s": round(time.perf_counter() - t0, 3),
            "convs": convs}, tensors_data


def write_calibration(onnx_path: Path, batches: Iterable[np.ndarray], method: str,
                      out_dir: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """One calibration pass, two files: our engine's record and ONNX Runtime's range cache
    (so the QDQ model of the peers is made from exactly the same ranges)."""
    from onnxruntime.quantization.calibrate import save_tensors_data

    record, tensors_data = calibrate(onnx_path, batches, method)
    record |= provenance
    (out_dir / CALIBRATION_FILE).write_text(json.dumps(record, indent=1))
    save_tensors_data(tensors_data, out_dir / ORT_RANGES_FILE)
    return record


def quantize_qdq(onnx_path: Path, ranges: Path, method: str, out_path: Path) -> dict[str, Any]:
    """ONNX Runtime's ``quantize_static`` from the calibration pass's ``ranges``: QDQ, S8S8,
    per-channel weights, the same convolutions and max-pools our engine quantizes (the first
    convolution stays float)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    t0 = time.perf_counter()
    with _quiet():
        quantize_static(
            str(onnx_path), str(out_path), None, calibration_cache_path=str(ranges),
            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "MaxPool"],
            nodes_to_exclude=[first_conv(onnx_path)], calibrate_method=_method(method),
            reduce_range=not has_vnni())
    return {"method": method, "format": "QDQ S8S8 per-channel", "reduce_range": not has_vnni(),
            "quantize_s": round(time.perf_counter() - t0, 3)}
