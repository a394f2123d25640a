"""No code runs from a file the user did not choose to trust: checkpoints load weights-only
(with the globals known checkpoint writers need, nothing more), the cache that holds loaded
libraries is private, and data files cannot point the suite at other files.

CI runs as root, so these tests check modes and owners, never whether an access fails."""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import pytest

from ssd_pipeline.cli import export_main
from ssd_pipeline.core.cache import ArtifactStore
from ssd_pipeline.core.errors import UserError
from ssd_pipeline.model import SAFE_CHECKPOINT_GLOBALS, read_state_dict
from tests.test_cli_errors import assert_one_line_error

TINY_CFG = Path(__file__).resolve().parents[1] / "ssd_pipeline" / "configs" / \
    "ssd_tiny_synthetic.py"


class WritesMarker:
    """What an attacker puts into a checkpoint's meta: unpickling it runs a command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def tiny_state(bundles):
    return OrderedDict((k, v.detach().clone())
                       for k, v in bundles("tiny").artifacts.torch_model.state_dict().items())


def export(capsys, weight: Path, out: Path, *extra: str) -> tuple[int, str]:
    rc = export_main(["--cfg", str(TINY_CFG), "--weight", str(weight), "--output", str(out),
                      *extra])
    return rc, capsys.readouterr().err.strip()


def test_crafted_checkpoint_runs_nothing(tmp_path, capsys, tiny_state):
    import torch

    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pth"
    torch.save({"state_dict": tiny_state, "meta": {"note": WritesMarker(marker)}}, crafted)
    rc, err = export(capsys, crafted, tmp_path / "m.onnx")
    assert not marker.exists(), "loading the checkpoint ran the command in its meta"
    assert_one_line_error(rc, err, "crafted.pth", "posix.system", "--trust-checkpoint")
    assert not (tmp_path / "m.onnx").exists()


def test_trust_checkpoint_is_the_explicit_opt_in(tmp_path, capsys, tiny_state):
    """With --trust-checkpoint the file is unpickled fully (so its payload does run: that is
    what trusting means) and the records say how the weights were read."""
    import torch

    from ssd_pipeline.model import ModelSpec

    marker = tmp_path / "ran"
    crafted = tmp_path / "crafted.pth"
    torch.save({"state_dict": tiny_state, "meta": {"note": WritesMarker(marker)}}, crafted)
    rc, err = export(capsys, crafted, tmp_path / "m.onnx", "--trust-checkpoint")
    assert rc == 0, err
    assert marker.exists()
    spec = ModelSpec(TINY_CFG, crafted, trust_checkpoint=True)
    assert spec.provenance()["checkpoint_load"].startswith("trusted")
    assert ModelSpec(TINY_CFG, crafted).provenance()["checkpoint_load"] == "weights_only"


def test_mmdet2_style_checkpoint_loads_without_opt_in(tmp_path, tiny_state):
    """What mmcv 1.x's save_checkpoint writes for an mmdet 2.x training run (the SSD300 zoo
    file's format): meta of plain values, an OrderedDict state_dict, SGD state."""
    import torch

    params = [torch.nn.Parameter(v.float()) for v in list(tiny_state.values())[:3]]
    sgd = torch.optim.SGD(params, lr=2e-3, momentum=0.9, weight_decay=5e-4)
    sum(p.sum() for p in params).backward()
    sgd.step()
    meta = {"env_info": "sys.platform: linux\nPython: 3.7.10", "config": "model = dict(...)",
            "seed": 0, "exp_name": "ssd300_coco.py", "mmdet_version": "2.15.0+d231a06",
            "CLASSES": ("car", "train", "dog", "bottle", "chair"), "epoch": 120,
            "iter": 293280, "hook_msgs": {"last_ckpt": "work_dirs/epoch_120.pth"},
            "mmcv_version": "1.3.8", "time": time.asctime()}
    path = tmp_path / "mmdet2.pth"
    torch.save({"meta": meta, "state_dict": tiny_state, "optimizer": sgd.state_dict()}, path)
    state = read_state_dict(path)
    assert state.keys() == tiny_state.keys()


def test_mmengine_checkpoint_loads_without_opt_in(tmp_path, record_property):
    """A checkpoint written by mmengine's own Runner and CheckpointHook (mmdet 3.x training):
    meta, message_hub (HistoryBuffer objects holding numpy arrays), optimizer and
    param_schedulers. Two training iterations of the embedded model on 4 generated images."""
    import torch
    from mmengine.runner import Runner

    from fixtures.train_tiny import runner_config
    from ssd_pipeline.synthetic import make_coco_set

    make_coco_set(tmp_path, "train", 4, seed=3)
    cfg = runner_config(tmp_path, iters=2, batch=2, lr=1e-3, checkpoint_interval=2)
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    Runner.from_cfg(cfg).train()
    (path,) = (tmp_path / "work").glob("iter_2.pth")
    needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    record_property("globals_beyond_torch_defaults", needed)
    assert "mmengine.logging.history_buffer.HistoryBuffer" in needed
    assert set(needed) <= set(SAFE_CHECKPOINT_GLOBALS), set(needed) - set(SAFE_CHECKPOINT_GLOBALS)
    assert len(read_state_dict(path)) > 0


def test_embedded_checkpoint_needs_nothing_beyond_torch(bundles):
    import torch

    assert torch.serialization.get_unsafe_globals_in_checkpoint(
        bundles("tiny").spec.checkpoint) == []


# ---------------------------------------------------------------- the cache is private


def test_cache_is_created_private(tmp_path):
    store = ArtifactStore(tmp_path / "cache")
    d = store.get_or_build("s", {"x": 1}, lambda tmp: (tmp / "a").write_text("a"))
    for p in (store.root, d.parent, d):
        assert p.stat().st_mode & 0o777 == 0o700, (p, oct(p.stat().st_mode))


def test_group_writable_cache_root_is_refused(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(0o775)
    with pytest.raises(UserError, match=r"writable by group or others \(mode 0775\).*chmod go-w"):
        ArtifactStore(root)


def test_group_writable_cache_entry_is_refused(tmp_path):
    store = ArtifactStore(tmp_path / "cache")
    d = store.get_or_build("s", {"x": 1}, lambda tmp: (tmp / "a").write_text("a"))
    d.chmod(0o777)
    with pytest.raises(UserError, match=r"cache entry .* writable by group or others"):
        store.get_or_build("s", {"x": 1}, lambda tmp: (tmp / "a").write_text("a"))


def test_cache_entry_of_another_user_is_refused(tmp_path, monkeypatch):
    store = ArtifactStore(tmp_path / "cache")
    d = store.get_or_build("s", {"x": 1}, lambda tmp: (tmp / "a").write_text("a"))
    if os.geteuid() == 0:
        os.chown(d, 65534, 65534)  # nobody: what another user's entry looks like
    else:  # no chown without root: be someone else instead
        me = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: me + 1)
    with pytest.raises(UserError, match=r"cache entry .* is owned by uid \d+, not by you"):
        store.lookup("s", {"x": 1})


def test_private_root_under_a_shared_tmp_is_fine(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: ancestors are not checked
    store = ArtifactStore(shared / "mine")
    assert store.root.stat().st_mode & 0o777 == 0o700


# ---------------------------------------------------------------- paths stay where they belong


@pytest.mark.parametrize("file_name", ["../../etc/passwd", "/etc/passwd", "a/../../x.jpg"])
def test_annotation_path_traversal_is_refused(tmp_path, file_name):
    from ssd_pipeline.data import CocoDetectionSet

    (tmp_path / "images").mkdir()
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": file_name, "width": 10,
                                           "height": 10}], "categories": [{"id": 1}]}))
    with pytest.raises(UserError, match="points outside the images directory"):
        CocoDetectionSet(ann, tmp_path / "images")


def test_symlinked_images_root_is_fine(tmp_path):
    from ssd_pipeline.data import CocoDetectionSet

    real = tmp_path / "disk" / "val2017"
    real.mkdir(parents=True)
    (tmp_path / "images").symlink_to(real.parent)
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "sub/../a.jpg", "width": 10,
                                           "height": 10}], "categories": [{"id": 1}]}))
    (rec,) = CocoDetectionSet(ann, tmp_path / "images" / "val2017").images
    assert rec.path == tmp_path / "images" / "val2017" / "a.jpg"


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd"])
def test_onnx_external_data_outside_its_directory_is_refused(tmp_path, location):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4,), np.float32), "w")
    w.data_location = TensorProto.EXTERNAL
    del w.external_data[:]
    w.external_data.add(key="location", value=location)
    w.ClearField("raw_data")
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph([helper.make_node("Add", ["input", "w"], ["y"])], "g", [x], [y],
                              initializer=[w])
    path = tmp_path / "model" / "evil.onnx"
    path.parent.mkdir()
    onnx.save(helper.make_model(graph), str(path))

    from ssd_pipeline.core.onnxfile import load_onnx

    with pytest.raises(UserError, match="outside the model's directory"):
        load_onnx(path)
    from ssd_pipeline.backends.ort_backend import OrtRunner

    with pytest.raises(UserError, match="outside the model's directory"):
        OrtRunner(str(path), 1)
