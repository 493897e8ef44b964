"""DICOM decoding (extract/dicom.py): MONOCHROME1 inverted, modality LUT and VOI window
applied, the stored bit depth scaled, the pixel limit read from the header, a compressed
transfer syntax without its plugin a failed row naming the packages, and pydicom missing a
failed row naming the extra. All but the last need pydicom (the [dicom] extra)."""
import sys

import numpy as np
import pytest

import dataset_layouts
from conftest import TINY, call_main
from extract import images

try:
    import pydicom
except ImportError:
    pydicom = None
needs_pydicom = pytest.mark.skipif(pydicom is None, reason="pydicom (the [dicom] extra) is not installed")


def _write(path, pixels, **fields):
    """A DICOM with these stored pixels (uint16) and header fields."""
    dataset_layouts.write_dicom(path, size=pixels.shape[0])
    dataset = pydicom.dcmread(path)
    dataset.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in fields.items():
        setattr(dataset, key, value)
    dataset.save_as(path)
    return path


@needs_pydicom
def test_stored_bit_depth_is_scaled_to_8_bits_and_monochrome1_inverted(tmp_path):
    pixels = np.array([[0, 4095], [2048, 1024]], dtype=np.uint16)  # 12 bits stored
    plain = images.load_gray(_write(tmp_path / "a.dcm", pixels)).numpy()
    np.testing.assert_array_equal(plain, np.rint(pixels / 4095 * 255).astype(np.uint8))
    inverted = images.load_gray(_write(tmp_path / "b.dicom", pixels, PhotometricInterpretation="MONOCHROME1")).numpy()
    np.testing.assert_array_equal(inverted, 255 - plain)


@needs_pydicom
def test_modality_lut_and_voi_window_are_applied(tmp_path):
    pixels = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    path = _write(tmp_path / "w.dcm", pixels, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=200, WindowWidth=201)
    gray = images.load_gray(path).numpy()
    values = pixels * 2.0 - 100  # -100, 100, 300, 500; window [99.5 - 100, 99.5 + 100]
    expected = np.rint(np.clip((values - (200 - 0.5 - 100)) / 200, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(gray, expected)
    assert gray[0, 0] == 0 and gray[1, 1] == 255  # outside the window: clipped, not wrapped


@needs_pydicom
def test_the_pixel_limit_is_read_from_the_header(tmp_path):
    path = _write(tmp_path / "big.dcm", np.zeros((16, 16), np.uint16))
    with pytest.raises(images.ImageError, match="16x16 pixels is above the limit"):
        images.load_gray(path, max_pixels=100)


@needs_pydicom
def test_a_compressed_transfer_syntax_without_its_plugin_names_the_packages(tmp_path):
    path = _write(tmp_path / "j2k.dcm", np.zeros((16, 16), np.uint16))
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    dataset.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])
    dataset.save_as(path)
    try:  # with a JPEG 2000 plugin installed the fake codestream fails to decode instead
        import pylibjpeg  # noqa: F401
        pytest.skip("a JPEG 2000 plugin is installed")
    except ImportError:
        pass
    with pytest.raises(images.ImageError, match=r"JPEG 2000.* needs a decoder plugin: pip install pylibjpeg"):
        images.load_gray(path)


def test_without_pydicom_a_dicom_is_a_failed_row_naming_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "a.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM")
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(images.ImageError, match=r"reading DICOM needs pydicom: pip install 'cxr14-kit\[dicom\]'"):
        images.load_gray(path)


@needs_pydicom
def test_rsna_dicoms_extract_end_to_end(tmp_path):
    data_dir, _ = dataset_layouts.rsna(tmp_path / "data")
    (data_dir / "stage_2_train_images" / f"{0:08x}-0000-0000-0000-000000000000.dcm").write_bytes(b"not a dicom")
    result = call_main("extract", "--dataset", "rsna", "--data-dir", data_dir, "--cache", tmp_path / "r.h5", *TINY,
                       check_rc=1)  # the broken file is a failed row; the other nine are done
    assert "extracted 9 images" in result.stdout and "cannot decode" in result.stdout
    call_main("cache", "verify", tmp_path / "r.h5", check_rc=0)
