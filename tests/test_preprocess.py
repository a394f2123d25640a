"""Our decode + preprocessing equals mmdet's own test pipeline + DetDataPreprocessor."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def mmdet_pipeline(mmdet_cfg):
    from mmcv.transforms import Compose
    from mmdet.utils import register_all_modules

    register_all_modules()
    return Compose(mmdet_cfg.test_pipeline)


@pytest.fixture(scope="session")
def mmdet_preprocessor(artifacts):
    return artifacts.torch_model.data_preprocessor


def test_preprocess_equals_mmdet(sample_set, preprocess_settings, mmdet_pipeline,
                                 mmdet_preprocessor, expectations, record_property):
    from ssd_pipeline.data import load_image, preprocess

    tol = expectations.number("preprocess.abs_err_max")
    worst = 0.0
    for rec in sample_set.images:
        ours, meta = preprocess(load_image(rec.path), preprocess_settings, rec.img_id)
        packed = mmdet_pipeline({"img_path": str(rec.path), "img_id": rec.img_id})
        data = mmdet_preprocessor({"inputs": [packed["inputs"]],
                                   "data_samples": [packed["data_samples"]]}, False)
        theirs = data["inputs"][0].numpy()
        info = data["data_samples"][0].metainfo
        assert ours.shape == theirs.shape, f"got {ours.shape}, expected {theirs.shape}"
        err = float(np.abs(ours - theirs).max())
        worst = max(worst, err)
        assert err <= tol, f"{rec.path.name}: max |ours - mmdet| got {err}, expected <= {tol}"
        assert meta.ori_shape == tuple(info["ori_shape"])
        assert meta.img_shape == tuple(info["img_shape"])
        np.testing.assert_allclose(meta.scale_factor, info["scale_factor"], rtol=1e-12)
    record_property("max_abs_err", worst)


@pytest.mark.parametrize("kind", ["grayscale", "png_named_jpg"])
def test_unusual_images_decode_like_mmdet(tmp_path, kind, preprocess_settings, mmdet_pipeline):
    """A grayscale JPEG and a PNG behind a .jpg name decode to 3-channel BGR as mmdet's do."""
    import cv2

    from ssd_pipeline.data import load_image, preprocess

    rng = np.random.default_rng(0)
    path = tmp_path / "img.jpg"
    if kind == "grayscale":
        cv2.imwrite(str(path), rng.integers(0, 255, (120, 200), dtype=np.uint8))
    else:
        _ok, buf = cv2.imencode(".png", rng.integers(0, 255, (90, 160, 3), dtype=np.uint8))
        path.write_bytes(buf.tobytes())
    ours, _ = preprocess(load_image(path), preprocess_settings)
    packed = mmdet_pipeline({"img_path": str(path), "img_id": 0})
    theirs = packed["inputs"].numpy().astype(np.float32)[::-1] - np.asarray(
        preprocess_settings.mean, np.float32)[:, None, None]
    np.testing.assert_array_equal(ours, theirs)


def test_batches_pad_the_last_batch(sample_set, preprocess_settings):
    from ssd_pipeline.data import batches

    out = list(batches(sample_set.images, 3, preprocess_settings))
    assert [b.n_valid for b in out] == [3, 1]
    assert all(b.array.shape == (3, 3, 300, 300) for b in out)
    assert [m.img_id for b in out for m in b.metas] == sample_set.img_ids


@pytest.mark.parametrize("settings", [
    {}, {"std": (58.395, 57.12, 57.375)}, {"bgr_to_rgb": False, "mean": (0.5, 0.0, 255.0)},
], ids=["ssd300", "with_std", "bgr"])
def test_preprocess_equals_the_whole_image_formula_bit_for_bit(settings):
    """The per-channel fast path computes exactly (x[..., ::-1].astype(float32) - mean) / std
    transposed to CHW, for any mean, std and channel order."""
    import cv2

    from ssd_pipeline.data import PreprocessSettings, preprocess

    s = PreprocessSettings(**settings)
    img = np.random.default_rng(1).integers(0, 256, (231, 317, 3), dtype=np.uint8)
    ours, _ = preprocess(img, s)
    x = cv2.resize(img, (s.input_size, s.input_size), interpolation=cv2.INTER_LINEAR)
    x = x[..., ::-1] if s.bgr_to_rgb else x
    x = (x.astype(np.float32) - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours, x.transpose(2, 0, 1))
