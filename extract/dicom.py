"""DICOM decoding (VinDr-CXR, RSNA Pneumonia, SIIM-ACR): one gray uint8 image per file, as
extract/images.py makes of a PNG. Needs pydicom (the `[dicom]` extra).

In order: refuse an image above the pixel limit from its header, before the pixel data is
decoded; apply the modality LUT (rescale slope/intercept); apply the VOI window the file
names (window center/width), else scale the stored bit depth (BitsStored) to 0..255; invert
MONOCHROME1 (where bright means air). Pixels stay in their stored integer type and are
converted a few rows at a time in float32, never as a float64 copy of the whole image (a
VOI LUT *sequence*, rare in chest X-rays, goes through pydicom, which does make one).
Pixel data in a compressed transfer syntax whose decoder plugin is missing is a failed row
whose reason names the packages to install.

`header_metadata` reads a file's PatientSex, PatientAge and ViewPosition for the cache's
metadata group (VinDr, RSNA and SIIM publish them nowhere else).
"""
from __future__ import annotations

import math
import re

import numpy as np
import torch

from extract.datasets.table import MAX_AGE
from extract.images import ImageError

DICOM_SUFFIXES = (".dcm", ".dicom")
_CONVERT_ROWS = 256
# PatientAge is "nnnD|W|M|Y" (DICOM's AS); RSNA's and SIIM's files write bare years ("51").
_AGE = re.compile(r"^(\d{1,3})\s*([DWMY]?)$")
_YEARS_PER_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}
HEADER_TAGS = ("PatientSex", "PatientAge", "ViewPosition")
_PLUGINS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


def load_gray(path, *, max_pixels: int) -> torch.Tensor:
    """(H, W) uint8 gray image of a DICOM file; ImageError for anything that cannot be one."""
    try:
        import pydicom
    except ImportError:
        raise ImageError(f"{path}: reading DICOM needs pydicom: pip install 'cxr14-kit[dicom]'") from None
    try:
        dataset = pydicom.dcmread(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError, pydicom.errors.InvalidDicomError) as err:
        raise ImageError(f"{path}: cannot decode ({err})") from None
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    if rows * columns > max_pixels:
        raise ImageError(f"{path}: {columns}x{rows} pixels is above the limit of {max_pixels / 1e6:.0f} "
                         f"megapixels; downscale it to use it")
    if dataset.get("SamplesPerPixel", 1) != 1:
        raise ImageError(f"{path}: {dataset.get('PhotometricInterpretation', '?')} with several samples per pixel "
                         f"is not a gray radiograph")
    pixels = _pixel_array(dataset, path)
    return torch.from_numpy(to_gray_uint8(pixels, dataset))


def _pixel_array(dataset, path) -> np.ndarray:
    try:
        pixels = dataset.pixel_array
    except (NotImplementedError, RuntimeError) as err:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise ImageError(f"{path}: pixel data in {name} needs a decoder plugin: {_PLUGINS} "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    except (ValueError, AttributeError, KeyError, OSError) as err:
        raise ImageError(f"{path}: cannot decode pixel data ({err})") from None
    return pixels[0] if pixels.ndim == 3 else pixels  # a multi-frame file: its first frame


def to_gray_uint8(pixels: np.ndarray, dataset) -> np.ndarray:
    """Stored values -> modality LUT -> VOI window (or the stored bit range) -> 0..255, with
    MONOCHROME1 inverted."""
    if "VOILUTSequence" in dataset and "WindowCenter" not in dataset:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
        values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
        low, high = float(values.min()), float(values.max())
        return _finish(values, low=low, high=high, invert=_inverted(dataset), slope=1.0, intercept=0.0)
    slope = float(dataset.get("RescaleSlope", 1) or 1)
    intercept = float(dataset.get("RescaleIntercept", 0) or 0)
    center, width = _window(dataset)
    if width is not None:
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    else:
        bits = int(dataset.get("BitsStored", pixels.dtype.itemsize * 8))
        signed = int(dataset.get("PixelRepresentation", 0)) == 1
        stored_low, stored_high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        low, high = sorted((stored_low * slope + intercept, stored_high * slope + intercept))
    return _finish(pixels, low=low, high=high, invert=_inverted(dataset), slope=slope, intercept=intercept)


def _window(dataset) -> tuple:
    """The first window center and width the file names; (None, None) without a usable one."""
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None, None
    center, width = (_first(dataset.WindowCenter), _first(dataset.WindowWidth))
    return (center, width) if width >= 1 else (None, None)


def _first(value) -> float:
    """A DICOM value that may hold several (a MultiValue): its first, as a float."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        return float(value)
    return float(value[0])


def _inverted(dataset) -> bool:
    return str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1"


def _finish(values: np.ndarray, *, low: float, high: float, invert: bool, slope: float, intercept: float) -> np.ndarray:
    """Map [low, high] (after value * slope + intercept) linearly onto 0..255, a few rows at a time."""
    out = np.empty(values.shape, np.uint8)
    span = max(high - low, 1e-6)
    for start in range(0, values.shape[0], _CONVERT_ROWS):
        block = values[start:start + _CONVERT_ROWS].astype(np.float32) * np.float32(slope) + np.float32(intercept)
        scaled = np.clip((block - np.float32(low)) / np.float32(span), 0, 1) * 255
        out[start:start + _CONVERT_ROWS] = np.rint(255 - scaled if invert else scaled).astype(np.uint8)
    return out


def header_metadata(path) -> tuple[str, float, str] | None:
    """(sex "M"/"F"/"", age in years or NaN, view as written upper-cased or "") from the file's
    header, the pixel data never read; None when the header cannot be read at all (not DICOM,
    truncated, missing, no pydicom): the caller records every value as missing."""
    try:
        import pydicom
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
        values = [str(header.get(tag, "") or "").strip().upper() for tag in HEADER_TAGS]
    except Exception:  # pydicom raises many types for a damaged file; any of them means "unread" here
        return None
    sex, age, view = values
    return (sex if sex in ("M", "F") else ""), dicom_age_years(age), view


def dicom_age_years(text: str) -> float:
    """PatientAge in years: "045Y" 45, "006M" 0.5, "51" 51 (a bare number is years); NaN for
    anything else, for a zero age (anonymisers write "000Y"; an infant's age is written in
    months or days) and for one above MAX_AGE."""
    match = _AGE.match(text.strip().upper())
    if not match:
        return math.nan
    years = int(match[1]) * _YEARS_PER_UNIT[match[2]]
    return years if 0 < years <= MAX_AGE else math.nan
