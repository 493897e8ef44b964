"""PNG decoding and the preprocessing every backbone input goes through.

Preprocessing, in order (recorded in the cache as `preprocessing`):
1. decode to one gray channel in [0, 1]: 8-bit gray as is; RGB/RGBA by luminance, alpha
   dropped (about 500 NIH images are RGBA); 16-bit by the full uint16 range;
2. resize the whole image, never cropped, so lung edges stay in, to image_size x image_size,
   bilinear with antialiasing;
3. replicate to 3 channels and normalize with the mean/std the weights were trained with.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(Exception):
    """An image that cannot be decoded (missing, truncated, unsupported)."""


def load_gray(path) -> torch.Tensor:
    """(H, W) uint8 gray image. 8 bits are what ImageNet weights saw; 16-bit inputs are
    scaled by their full range rather than clipped."""
    try:
        with Image.open(path) as image:
            image.load()
            return torch.from_numpy(_to_gray_uint8(image))
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: cannot decode ({err})") from None


def _to_gray_uint8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow opens 16-bit PNGs as "I;16" (or 32-bit "I"); both hold uint16 values here.
        values = np.asarray(image, dtype=np.float64)
        return np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    if image.mode == "L":
        return np.asarray(image).copy()
    return np.array(image.convert("RGB").convert("L"))


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
