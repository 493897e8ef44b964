"""PNG decoding and the preprocessing every backbone input goes through.

Images above MAX_PIXELS are refused from their header, before any pixel is decoded: a small
compressed PNG can declare 13000 x 13000 pixels (338 MB as 16-bit, times one per worker).

Preprocessing, in order (recorded in the cache as `preprocessing`):
1. decode to one gray channel in [0, 1]: 8-bit gray as is; RGB/RGBA by luminance, alpha
   dropped (about 500 NIH images are RGBA); 16-bit by the full uint16 range;
2. resize the whole image, never cropped, so lung edges stay in, to image_size x image_size,
   bilinear with antialiasing;
3. replicate to 3 channels and normalize with the mean/std the weights were trained with.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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


def resize_gray(gray: torch.Tensor, image_size: int) -> torch.Tensor:
    """(H, W) or (B, H, W) uint8 -> float32 in [0, 1] at (image_size, image_size)."""
    batch = gray if gray.dim() == 3 else gray[None]
    scaled = batch[:, None].float().div_(255.0)
    resized = F.interpolate(scaled, size=(image_size, image_size), mode="bilinear",
                            antialias=True, align_corners=False)[:, 0]
    return resized if gray.dim() == 3 else resized[0]


def normalize(gray: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, S, S) float gray -> (B, 3, S, S) normalized, channels_last for faster convolutions."""
    mean = torch.tensor(mean, device=gray.device, dtype=gray.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=gray.device, dtype=gray.dtype).view(1, 3, 1, 1)
    rgb = gray[:, None].expand(-1, 3, -1, -1)
    return ((rgb - mean) / std).contiguous(memory_format=torch.channels_last)


def preprocessing_record(*, image_size: int, mean, std) -> dict:
    return {
        "decode": "gray in [0,1]; RGB/RGBA by luminance (alpha dropped); 16-bit / 257",
        "resize": f"whole image to {image_size}x{image_size}, bilinear, antialias, no crop",
        "channels": "gray replicated to 3",
        "normalize_mean": list(mean),
        "normalize_std": list(std),
    }
