"""PNG decoding and resizing: the two steps every encoder's input shares, run in the
DataLoader workers (see `extract.pipeline`).

Images above MAX_PIXELS are refused from their header, before any pixel is decoded: a small
compressed PNG can declare 13000 x 13000 pixels (338 MB as 16-bit, times one per worker).

1. `load_gray`: one gray channel, uint8: 8-bit gray as is; RGB/RGBA by luminance, alpha
   dropped (about 500 NIH images are RGBA); 16-bit by the full uint16 range;
2. `resize_gray`: the whole image, never cropped, so lung edges stay in, to the encoder's
   size x size in [0, 1], antialiased, bilinear or bicubic as the encoder asks.

What follows depends on the encoder and lives with it (`extract.encoders.Preprocessing`):
the value range, 1 or 3 (replicated) channels, and the mean/std its weights were trained
with. The cache records the whole recipe as `preprocessing`.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# 36 megapixels (6000 x 6000): NIH images are 1 MP, other chest X-ray sets at most about 9 MP.
MAX_PIXELS = 6000 * 6000
# Rows converted at a time from 16 to 8 bits: the uint32 temporary stays a few MB.
_CONVERT_ROWS = 256


class ImageError(Exception):
    """An image that cannot be decoded (missing, truncated, unsupported)."""


def load_gray(path, *, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """(H, W) uint8 gray image. 8 bits are what ImageNet weights saw; 16-bit inputs are
    scaled by their full range rather than clipped. ImageError for an image above
    `max_pixels`, raised from the header before decoding. DICOM files go to extract/dicom.py."""
    if str(path).lower().endswith((".dcm", ".dicom")):
        from extract import dicom
        return dicom.load_gray(path, max_pixels=max_pixels)
    try:
        with warnings.catch_warnings():  # MAX_PIXELS below is the limit; PIL's warning is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"{path}: {width}x{height} pixels is above the limit of "
                                 f"{max_pixels / 1e6:.0f} megapixels; downscale it to use it")
            image.load()
            return torch.from_numpy(_to_gray_uint8(image))
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: cannot decode ({err})") from None


def _to_gray_uint8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow opens 16-bit PNGs as "I;16" (or 32-bit "I"); both hold uint16 values here.
        return _uint16_to_uint8(np.asarray(image))
    if image.mode == "L":
        return np.asarray(image).copy()
    return np.array(image.convert("RGB").convert("L"))


def _uint16_to_uint8(values: np.ndarray) -> np.ndarray:
    """round(v / 257) for 0 <= v <= 65535, in integers and a few rows at a time, so that no
    float64 (8 bytes a pixel) copy of a large image is ever made. (v + 128) // 257 equals the
    rounded quotient because v / 257 is never exactly halfway between two integers."""
    out = np.empty(values.shape, np.uint8)
    for start in range(0, values.shape[0], _CONVERT_ROWS):
        block = np.clip(values[start:start + _CONVERT_ROWS], 0, 65535).astype(np.uint32)
        out[start:start + _CONVERT_ROWS] = (block + 128) // 257
    return out


def resize_gray(gray: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """(H, W) or (B, H, W) uint8 -> float32 in [0, 1] at (size, size): the whole image, never
    cropped, antialiased, by `interpolation` (bilinear or bicubic, as the encoder was trained)."""
    batch = gray if gray.dim() == 3 else gray[None]
    scaled = batch[:, None].float().div_(255.0)
    resized = F.interpolate(scaled, size=(size, size), mode=interpolation, antialias=True, align_corners=False)[:, 0]
    if interpolation == "bicubic":
        resized = resized.clamp_(0.0, 1.0)  # bicubic overshoots at edges
    return resized if gray.dim() == 3 else resized[0]
