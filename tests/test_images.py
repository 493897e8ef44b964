import numpy as np
import pytest
import torch
from PIL import Image

from extract import images


def _save(tmp_path, array, mode=None, name="x.png"):
    path = tmp_path / name
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


GRAY = np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) % 256


def test_8bit_gray_is_read_unchanged(tmp_path):
    gray = images.load_gray(_save(tmp_path, GRAY.astype(np.uint8)))
    assert gray.dtype == torch.uint8 and gray.shape == (64, 48)
    assert (gray.numpy() == GRAY).all()


def test_rgb_and_rgba_map_to_their_gray_value(tmp_path):
    rgb = np.repeat(GRAY.astype(np.uint8)[..., None], 3, axis=2)
    rgba = np.concatenate([rgb, np.full((64, 48, 1), 255, np.uint8)], axis=2)
    for name, array in (("rgb.png", rgb), ("rgba.png", rgba)):
        gray = images.load_gray(_save(tmp_path, array, name=name))
        assert gray.shape == (64, 48)
        assert np.abs(gray.numpy().astype(int) - GRAY).max() <= 1, name


def test_rgba_alpha_is_dropped_not_blended(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 0  # fully transparent, yet the stored gray is 200
    assert (images.load_gray(_save(tmp_path, rgba)).numpy() == 200).all()


def test_16bit_uses_the_full_range(tmp_path):
    values = (GRAY * 257).astype(np.uint16)  # 8-bit levels spread over uint16
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    assert (images.load_gray(path).numpy() == GRAY).all()


def test_truncated_and_missing_files_raise_image_error_naming_the_file(tmp_path):
    path = _save(tmp_path, GRAY.astype(np.uint8) * 0 + np.random.default_rng(0).integers(0, 255, (64, 48)).astype(np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(images.ImageError, match="x.png: cannot decode"):
        images.load_gray(path)
    with pytest.raises(images.ImageError, match="nope.png: file not found"):
        images.load_gray(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("not a png")
    with pytest.raises(images.ImageError, match="text.png"):
        images.load_gray(tmp_path / "text.png")


def test_resize_keeps_the_whole_image_and_its_values():
    gray = torch.full((100, 60), 128, dtype=torch.uint8)
    gray[:, :5] = 0  # a dark left edge must survive: no crop
    resized = images.resize_gray(gray, 32)
    assert resized.shape == (32, 32) and resized.dtype == torch.float32
    assert abs(resized[16, 20].item() - 128 / 255) < 1e-6
    assert resized[16, 0].item() < 0.3


def test_normalize_replicates_gray_and_applies_mean_std():
    gray = torch.full((2, 4, 4), 0.5)
    out = images.normalize(gray, images.IMAGENET_MEAN, images.IMAGENET_STD)
    assert out.shape == (2, 3, 4, 4)
    expected = [(0.5 - m) / s for m, s in zip(images.IMAGENET_MEAN, images.IMAGENET_STD)]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expected))
