"""DICOM decoding (extract/dicom.py): MONOCHROME1 inverted, modality LUT and VOI window
applied, the stored bit depth scaled, the pixel limit read from the header, a compressed
transfer syntax without its plugin a failed row naming the packages, and pydicom missing a
failed row naming the extra. The headers' sex, age and view fill the metadata group of the
datasets that publish them nowhere else, garbled or unreadable ones as missing, once per
cache. All but the pydicom-missing test need pydicom (the [dicom] extra)."""
import sys
import warnings

import numpy as np
import pytest

import cache
import dataset_layouts
from conftest import TINY, call_main
from extract import datasets, dicom, images

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


def _assert_metadata(metadata, row, expected):
    sex, age, view = expected
    assert (metadata["sex"][row], metadata["view"][row]) == (sex, view)
    np.testing.assert_allclose(metadata["age"][row], age)  # NaN equals NaN here


@needs_pydicom
def test_rsna_dicoms_extract_end_to_end_with_header_metadata(tmp_path):
    data_dir, _ = dataset_layouts.rsna(tmp_path / "data")
    (data_dir / "stage_2_train_images" / f"{0:08x}-0000-0000-0000-000000000000.dcm").write_bytes(b"not a dicom")
    result = call_main("extract", "--dataset", "rsna", "--data-dir", data_dir, "--cache", tmp_path / "r.h5", *TINY,
                       check_rc=1)  # the broken file is a failed row; the other nine are done
    assert "extracted 9 images" in result.stdout and "cannot decode" in result.stdout
    assert "read 9 DICOM headers; 1 unreadable" in result.stdout
    call_main("cache", "verify", tmp_path / "r.h5", check_rc=0)
    table, metadata = cache.read_table(tmp_path / "r.h5"), cache.read_metadata(tmp_path / "r.h5")
    for row, image_id in enumerate(table["image_id"]):
        index = int(image_id[:8], 16)  # the writer's row number
        expected = ("", np.nan, "") if index == 0 else dataset_layouts.DICOM_HEADERS[index % 7][1]
        _assert_metadata(metadata, row, expected)
    assert (metadata["study_id"] == "").all()  # RSNA publishes no study ids
    info = call_main("cache", "info", tmp_path / "r.h5", check_rc=0).stdout
    assert "  sex              4  " in info  # 3 headers without M/F, 1 unreadable


@needs_pydicom
def test_headers_are_read_once_when_the_cache_is_created_not_on_a_rerun(tmp_path, monkeypatch):
    data_dir, _ = dataset_layouts.rsna(tmp_path / "data")
    call_main("extract", "--dataset", "rsna", "--data-dir", data_dir, "--cache", tmp_path / "r.h5", *TINY, check_rc=0)
    before = cache.read_metadata(tmp_path / "r.h5")

    def refuse(path):
        raise AssertionError(f"a rerun read the header of {path}")
    monkeypatch.setattr(dicom, "header_metadata", refuse)
    result = call_main("extract", "--dataset", "rsna", "--data-dir", data_dir, "--cache", tmp_path / "r.h5", *TINY,
                       check_rc=0)
    assert "extracted 0 images" in result.stdout and "DICOM headers" not in result.stdout
    for name, values in before.items():
        np.testing.assert_array_equal(cache.read_metadata(tmp_path / "r.h5")[name], values)


HEADER_DATASETS = [name for name in datasets.names() if datasets.get(name).header_metadata]


@needs_pydicom
@pytest.mark.parametrize("name", HEADER_DATASETS)
def test_every_header_dataset_fills_sex_age_and_view_from_its_headers(tmp_path, name):
    data_dir, options = dataset_layouts.WRITERS[name](tmp_path / "data")
    rows, _ = datasets.load(name, data_dir, options)
    assert (rows["sex"] == "").all() and np.isnan(rows["age"]).all()  # the CSVs publish none
    for row, path in enumerate(rows["path"]):  # rewrite each header as the row number says
        header = pydicom.dcmread(data_dir / path)
        for tag in dicom.HEADER_TAGS:
            if tag in header:
                delattr(header, tag)
        with warnings.catch_warnings():  # pydicom warns about the deliberately garbled values
            warnings.simplefilter("ignore", UserWarning)
            for key, value in dataset_layouts.dicom_header(row).items():
                setattr(header, key, value)
        header.save_as(data_dir / path)
    (data_dir / rows["path"][1]).write_bytes(b"\0" * 64)  # a header that cannot be read
    filled, unread = datasets.add_header_metadata(rows, data_dir)
    assert unread == 1
    for row in range(len(rows["path"])):
        _assert_metadata(filled, row, ("", np.nan, "") if row == 1 else dataset_layouts.DICOM_HEADERS[row % 7][1])
    for key in ("image_id", "labels", "split", "study_id"):
        np.testing.assert_array_equal(filled[key], rows[key])


@pytest.mark.parametrize("text, years", [
    ("045Y", 45.0), ("006M", 0.5), ("014W", 14 * 7 / 365.25), ("030D", 30 / 365.25), ("51", 51.0), (" 062y ", 62.0),
    ("000Y", np.nan), ("0", np.nan), ("121Y", np.nan), ("45.5", np.nan), ("Y", np.nan), ("", np.nan), ("045X", np.nan),
])
def test_dicom_ages_in_years_and_what_counts_as_missing(text, years):
    np.testing.assert_allclose(dicom.dicom_age_years(text), years)


@needs_pydicom
def test_a_missing_or_non_dicom_file_has_no_header_and_is_no_crash(tmp_path):
    (tmp_path / "text.dcm").write_text("not a dicom")
    assert dicom.header_metadata(tmp_path / "text.dcm") is None
    assert dicom.header_metadata(tmp_path / "absent.dcm") is None
