import tracemalloc
import zlib

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


def test_bicubic_resize_stays_in_the_unit_range():
    gray = torch.zeros((2, 40, 40), dtype=torch.uint8)
    gray[:, :, 20:] = 255  # a hard edge: bicubic overshoots it unless clamped
    resized = images.resize_gray(gray, 24, "bicubic")
    assert resized.shape == (2, 24, 24) and resized.min() >= 0.0 and resized.max() <= 1.0
    assert resized[0, 0, 0].item() == 0.0 and resized[0, 0, -1].item() > 1 - 1e-6


def test_the_pipeline_resizes_with_the_encoders_rule(tmp_path):
    from extract import encoders, pipeline
    path = _save(tmp_path, GRAY.astype(np.uint8))
    rows = pipeline.ImageRows([0], [path], size=16, interpolation="bicubic")
    _, resized, reason = rows[0]
    assert reason == "" and torch.equal(resized, images.resize_gray(images.load_gray(path), 16, "bicubic"))
    prepared = encoders.Preprocessing(size=16).to_inputs(resized[None])
    expected = [(0.5 - m) / s for m, s in zip(encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)]
    gray_half = encoders.Preprocessing(size=1).to_inputs(torch.full((1, 1, 1), 0.5))
    assert prepared.shape == (1, 3, 16, 16) and torch.allclose(gray_half[0, :, 0, 0], torch.tensor(expected))


def _zero_png16(path, width, height):
    """A valid all-zero 16-bit gray PNG of any size in a few KB, written without ever holding
    the image: one deflate segment of zero rows, closed by a full flush so it can be repeated,
    and the Adler-32 of all-zero data (A = 1, B = length mod 65521)."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    row = bytes(1 + 2 * width)  # filter byte 0, then the row's zero samples
    rows_per_segment = 1000
    assert height % rows_per_segment == 0
    compressor = zlib.compressobj(9)
    segment = compressor.compress(row * rows_per_segment) + compressor.flush(zlib.Z_FULL_FLUSH)
    header, body = segment[:2], segment[2:]
    adler = ((len(row) * height) % 65521) << 16 | 1
    stream = header + body * (height // rows_per_segment) + b"\x03\x00" + adler.to_bytes(4, "big")
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([16, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stream) + chunk(b"IEND", b""))
    return path


def test_an_image_above_the_pixel_limit_is_refused_before_decoding(tmp_path):
    small = _zero_png16(tmp_path / "small.png", 300, 2000)  # the writer makes real PNGs
    assert Image.open(small).mode == "I;16" and (images.load_gray(small).numpy() == 0).all()
    huge = _zero_png16(tmp_path / "huge.png", 13000, 13000)
    assert huge.stat().st_size < 400_000  # 338 MB of 16-bit pixels behind a small file
    tracemalloc.start()
    try:
        with pytest.raises(images.ImageError, match=r"huge.png: 13000x13000 pixels is above the limit of 36 megapixels"):
            images.load_gray(huge)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000  # the header was read, the pixels never were
    with pytest.raises(images.ImageError, match="above the limit"):
        images.load_gray(small, max_pixels=300 * 2000 - 1)


def test_16bit_conversion_makes_no_float64_copy(tmp_path):
    side = 1500
    values = np.zeros((side, side), np.uint16)
    values[::7] = np.arange(side, dtype=np.uint16) * 43  # every level class, compresses well
    path = tmp_path / "sixteen.png"
    Image.fromarray(values).save(path)
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        gray = images.load_gray(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (gray.numpy() == np.clip(np.round(values / 257.0), 0, 255)).all()
    # A float64 copy alone is 8 bytes a pixel; the integer path needs the uint16 pixels and the
    # uint8 result (about 4.5 bytes a pixel measured).
    assert peak < 6 * side * side, f"{peak / side / side:.1f} bytes per pixel"
