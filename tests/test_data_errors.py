"""Dataset faults end in one line naming the file and what to do (exit 2); unusual but valid
images (grayscale, CMYK, PNG named .jpg) decode exactly as mmdet decodes them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ssd_pipeline.cli import main as cli_main
from ssd_pipeline.core.errors import UserError
from ssd_pipeline.data import CocoDetectionSet, load_image
from tests.test_cli_errors import assert_one_line_error


@pytest.fixture
def tiny_set(tmp_path):
    from ssd_pipeline.synthetic import make_coco_set

    make_coco_set(tmp_path, "val2017", 3, seed=1)
    return tmp_path


def evaluate(capsys, root, *extra: str) -> tuple[int, str]:
    rc = cli_main(["evaluate", "--model", "tiny", "--backends", "onnxruntime", "--quiet",
                   "--datasets-dir", str(root), *extra])
    return rc, capsys.readouterr().err.strip()


def test_datasets_dir_unset(monkeypatch):
    monkeypatch.delenv("DATASETS_DIR", raising=False)
    with pytest.raises(UserError, match="DATASETS_DIR is not set"):
        CocoDetectionSet.from_root(None)


@pytest.mark.parametrize("case", ["missing", "empty_dir", "no_images_dir"])
def test_datasets_dir_broken(tmp_path, case):
    root = tmp_path / "coco"
    if case != "missing":
        root.mkdir()
    if case == "no_images_dir":
        (root / "annotations").mkdir()
        (root / "annotations" / "instances_val2017.json").write_text("{}")
    match = {"missing": "does not exist", "empty_dir": "no annotation file",
             "no_images_dir": "no image directory"}[case]
    with pytest.raises(UserError, match=match):
        CocoDetectionSet.from_root(str(root))


@pytest.mark.parametrize("content,match", [
    ("{not json", "is not valid JSON"),
    ('{"annotations": []}', "has no 'images' list"),
    ('{"images": [], "categories": [{"id": 1}]}', "lists no images"),
    ('{"images": [{"id": 1}], "categories": [{"id": 1}]}', "malformed image or category"),
])
def test_annotation_file_broken(tiny_set, content, match):
    ann = tiny_set / "annotations" / "instances_val2017.json"
    ann.write_text(content)
    with pytest.raises(UserError, match=match):
        CocoDetectionSet.from_root(str(tiny_set))


def test_max_images_must_be_positive(tiny_set):
    with pytest.raises(UserError, match="--max-images must be positive"):
        CocoDetectionSet.from_root(str(tiny_set), max_images=0)


@pytest.mark.parametrize("fault", ["missing", "truncated", "garbage"])
def test_bad_image_names_the_file(tiny_set, fault):
    ann = json.loads((tiny_set / "annotations" / "instances_val2017.json").read_text())
    path = tiny_set / "images" / "val2017" / ann["images"][1]["file_name"]
    if fault == "missing":
        path.unlink()
    elif fault == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"\x00garbage" * 50)
    match = {"missing": "image not found", "truncated": "truncated JPEG",
             "garbage": "not a decodable image"}[fault]
    with pytest.raises(UserError, match=match) as e:
        load_image(path)
    assert path.name in str(e.value)


def test_bad_image_through_the_cli(tiny_set, capsys):
    """The whole evaluate command: one line, exit 2, the file named."""
    ann = json.loads((tiny_set / "annotations" / "instances_val2017.json").read_text())
    victim = tiny_set / "images" / "val2017" / ann["images"][2]["file_name"]
    victim.unlink()
    rc, err = evaluate(capsys, tiny_set)
    assert_one_line_error(rc, err, "image not found", victim.name)


@pytest.mark.parametrize("kind", ["grayscale", "cmyk", "png_named_jpg"])
def test_unusual_images_decode_to_bgr(tmp_path, kind):
    import cv2
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    path = tmp_path / "x.jpg"
    if kind == "grayscale":
        Image.fromarray(rgb[..., 0]).save(path, "JPEG")
    elif kind == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(path, "JPEG")
    else:
        Image.fromarray(rgb).save(path, "PNG")
    img = load_image(path)
    assert img.shape == (40, 60, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, cv2.imdecode(np.fromfile(path, np.uint8),
                                                    cv2.IMREAD_COLOR))


@pytest.mark.parametrize("args,match", [
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--backends", "tensorrt"], "unknown backend 'tensorrt'"),
    (["--precision", "int4"], "no precision 'int4'"),
    (["--expect", "accuracy.nope=1"], "no key 'accuracy.nope'"),
    (["--expect", "parity.fp32.raw_rel_err_max=abc"], "is not a number"),
])
def test_bad_options(tiny_set, capsys, args, match):
    rc, err = evaluate(capsys, tiny_set, *args)
    assert_one_line_error(rc, err, match)


def test_malformed_expectations_file(tmp_path, tiny_set, capsys):
    bad = tmp_path / "exp.toml"
    bad.write_text("[parity\nraw = ")
    rc, err = evaluate(capsys, tiny_set, "--expectations", str(bad))
    assert_one_line_error(rc, err, "is not valid TOML", "exp.toml")


def test_dataset_of_another_category_set(tmp_path, capsys):
    """SSD300 predicts COCO's 80 classes: a 3-category annotation file is refused."""
    from ssd_pipeline.synthetic import make_coco_set

    make_coco_set(tmp_path, "val2017", 2, seed=1, categories=[(1, "a"), (2, "b"), (3, "c")])
    rc = cli_main(["evaluate", "--model", "ssd300", "--backends", "onnxruntime", "--quiet",
                   "--datasets-dir", str(tmp_path)])
    assert_one_line_error(rc, capsys.readouterr().err.strip(), "has 3 categories",
                          "predicts 80 classes")
