"""The exported graph has the original's interface and provenance, and onnxsim's result is
checked before use."""

from __future__ import annotations

import numpy as np
import pytest

from ssd_pipeline.artifacts.export import INPUT_NAME, OPSET, output_names, read_provenance


@pytest.fixture(scope="session", params=["raw", "simplified"])
def onnx_model(request, artifacts):
    import onnx

    path = artifacts.onnx_path if request.param == "raw" else artifacts.simplified_onnx_path
    return onnx.load(str(path), load_external_data=False)


def test_interface(onnx_model):
    from onnx import TensorProto

    (inp,) = onnx_model.graph.input
    assert inp.name == INPUT_NAME
    t = inp.type.tensor_type
    assert t.elem_type == TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in t.shape.dim]
    assert isinstance(dims[0], str), f"batch axis must be dynamic, got {dims[0]!r}"
    assert dims[1:] == [3, 300, 300]
    assert [o.name for o in onnx_model.graph.output] == output_names(6)
    assert onnx_model.opset_import[0].version == OPSET


def test_no_nms_in_graph(onnx_model):
    ops = {n.op_type for n in onnx_model.graph.node}
    assert not ops & {"NonMaxSuppression", "TopK", "Softmax"}, f"post-processing in graph: {ops}"


def test_provenance(onnx_model, model_spec):
    prov = read_provenance(onnx_model)
    assert prov["config_sha256"] == model_spec.describe()["config_sha256"]
    assert prov["weights"] == model_spec.weights_label
    assert prov["mean"] == [123.675, 116.28, 103.53] and prov["std"] == [1.0, 1.0, 1.0]
    assert prov["bgr_to_rgb"] is True and prov["input_size"] == 300
    assert prov["outputs"] == output_names(6) and prov["opset"] == OPSET


def test_simplify_was_checked(artifacts, expectations, record_property):
    info = artifacts.build_info()
    record_property("build_info", info)
    s = info["simplify"]
    assert s["nodes_after"] < s["nodes_before"], s
    assert s["max_rel_err"] <= expectations.number("simplify.rel_err_max")


def test_simplify_refuses_a_wrong_model(tmp_path, artifacts, monkeypatch):
    """If onnxsim ever changed the numbers, the check must stop the model from being used."""
    import onnxsim

    from ssd_pipeline.artifacts import simplify

    real = onnxsim.simplify

    def broken(model, *a, **k):
        out, ok = real(model, *a, **k)
        init = next(i for i in out.graph.initializer if i.dims and i.dims[0] > 8)
        arr = np.frombuffer(init.raw_data, np.float32).copy() * 1.5
        init.raw_data = arr.tobytes()
        return out, ok

    monkeypatch.setattr(onnxsim, "simplify", broken)
    with pytest.raises(RuntimeError, match="relative error"):
        simplify.simplify_onnx(artifacts.onnx_path, tmp_path / "s.onnx", 1e-5)
    assert not (tmp_path / "s.onnx").exists()


def test_zero_features_stay_finite(tmp_path, model_spec, expectations):
    """mmdet's L2Norm adds an epsilon before dividing; an exporter that drops it (torch 2.13's
    dynamo default does) turns an all-zero feature map into NaN. Zero input + zero biases make
    the L2Norm input exactly zero."""
    import onnxruntime as ort
    import torch

    from ssd_pipeline.artifacts.export import export_module
    from ssd_pipeline.model import build_model, head_outputs_module

    model = build_model(model_spec)
    with torch.no_grad():
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.zero_()
    module = head_outputs_module(model)
    path = tmp_path / "zero.onnx"
    export_module(module, path, output_names(6), 300)
    x = np.zeros((1, 3, 300, 300), np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT_NAME: x})
    with torch.no_grad():
        ref = [t.numpy() for t in module(torch.from_numpy(x))]
    assert all(np.isfinite(g).all() for g in got), "NaN/inf from an all-zero feature map"
    from ssd_pipeline.parity import rel_errs

    errs = rel_errs(got, ref, output_names(6))
    assert max(errs.values()) <= expectations.number("parity.fp32.raw_rel_err_max"), errs
