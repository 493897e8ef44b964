"""What every stage records about where it ran: the device it resolved and the library
versions. One place, so a cache, a run and a search describe themselves the same way."""
from __future__ import annotations

import functools
import platform
import re
from pathlib import Path

import numpy as np
import torch


class DeviceUnavailable(Exception):
    """--device names hardware that torch cannot see."""


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU; `cuda` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable("--device cuda, but torch sees no CUDA GPU; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def versions(**extra: str) -> dict:
    """Python, torch and numpy versions, plus whatever the caller adds (torchvision, sklearn...)."""
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__, **extra}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX): there bf16 autocast
    is about twice as fast as fp32; elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))
