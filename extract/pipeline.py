"""The image pipeline every encoder runs on, shared by `extract`, `heads.predict` and the
benchmarks: DataLoader workers decode PNGs and resize them to the encoder's input size; the
model's device scales, normalizes and embeds them under autocast.

Resizing in the workers bounds what crosses process boundaries: a worker hands over
S x S float32 images (200 KB at 224 px) instead of 1 MB 1024 x 1024 ones, and the loader is
sized so that all batches in flight fit SHARED_MEMORY_BUDGET, which is below Docker's default
64 MB /dev/shm. The main process joins the workers' small batches into model batches.
"""
from __future__ import annotations

import os

import torch

from cache import runtime
from extract import images
from extract.encoders import Encoder

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Bytes of decoded images in flight between workers and the main process: every worker's
# prefetched batches together. Docker gives a container 64 MB of /dev/shm unless told otherwise.
SHARED_MEMORY_BUDGET = 32 << 20
MAX_WORKERS = 16


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), fp32 elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or runtime.cpu_has_native_bf16() else "fp32"


def default_workers() -> int:
    """One decoding process per core, at most MAX_WORKERS (more rarely helps: docs/performance.md)."""
    return min(os.cpu_count() or 1, MAX_WORKERS)


class ImageRows(torch.utils.data.Dataset):
    """Decodes and resizes one row's image. Failures are returned, not raised, so that one bad
    file never stops a run."""

    def __init__(self, rows, paths, *, size: int, interpolation: str = "bilinear"):
        self.rows, self.paths, self.size, self.interpolation = rows, paths, size, interpolation

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row, path = int(self.rows[index]), self.paths[index]
        if path is None:
            return row, None, "image file not found under --data-dir"
        try:
            gray = images.load_gray(path)
        except images.ImageError as err:
            return row, None, str(err)
        return row, images.resize_gray(gray, self.size, self.interpolation), ""


def collate(items) -> dict:
    """{'rows': (B,) long, 'gray': (B, S, S) float32, 'failed': [(row, reason)]}."""
    good = [(row, gray) for row, gray, _ in items if gray is not None]
    failed = [(row, reason) for row, gray, reason in items if gray is None]
    rows = torch.tensor([row for row, _ in good], dtype=torch.long)
    gray = torch.stack([gray for _, gray in good]) if good else torch.zeros(0, 0, 0)
    return {"rows": rows, "gray": gray, "failed": failed}


def loader_shape(*, image_size: int, batch_size: int, workers: int,
                 budget: int = SHARED_MEMORY_BUDGET) -> tuple[int, int, int]:
    """(worker batch, prefetch factor, workers) whose batches in flight, workers x prefetch x
    worker batch x S^2 x 4 bytes, stay within `budget`."""
    image_bytes = image_size * image_size * 4
    if workers == 0:
        return batch_size, 0, 0
    in_flight = max(1, budget // image_bytes)  # images
    prefetch = 2
    workers = max(1, min(workers, in_flight // prefetch or 1))
    if workers * prefetch > in_flight:
        prefetch = 1
    cap = max(1, min(batch_size, in_flight // (workers * prefetch)))
    chunk = -(-batch_size // -(-batch_size // cap))  # equal chunks that add up to about a model batch
    return chunk, prefetch, workers


def batches(rows, paths, *, encoder: Encoder, batch_size: int, workers: int, pin_memory: bool = False,
            budget: int = SHARED_MEMORY_BUDGET):
    """Model batches (see `collate`) of the images at `paths`, decoded by `workers` processes
    with at most `budget` bytes of them in flight."""
    prep = encoder.preprocessing
    chunk, prefetch, workers = loader_shape(image_size=prep.size, batch_size=batch_size, workers=workers,
                                            budget=budget)
    loader = torch.utils.data.DataLoader(
        ImageRows(rows, paths, size=prep.size, interpolation=prep.interpolation), batch_size=chunk,
        num_workers=workers, collate_fn=collate, pin_memory=pin_memory, persistent_workers=False,
        prefetch_factor=prefetch or None,
    )
    pending = []
    for small in loader:
        if small["gray"].is_shared():
            # copy out of /dev/shm at once: a shared block stays allocated while referenced,
            # and a model batch is many worker batches
            small["gray"] = small["gray"].clone()
        pending.append(small)
        if sum(len(b["rows"]) + len(b["failed"]) for b in pending) >= batch_size:
            yield _join(pending)
            pending = []
    if pending:
        yield _join(pending)


def _join(parts: list) -> dict:
    if len(parts) == 1:
        return parts[0]
    grays = [p["gray"] for p in parts if len(p["rows"])]
    return {"rows": torch.cat([p["rows"] for p in parts]),
            "gray": torch.cat(grays) if grays else torch.zeros(0, 0, 0),
            "failed": [f for p in parts for f in p["failed"]]}


def embed_batch(encoder: Encoder, batch: dict, *, device: torch.device, precision: str) -> torch.Tensor:
    """(B, D) float32 features on the CPU, in the order of batch["rows"]."""
    gray = batch["gray"].to(device, non_blocking=True)
    inputs = encoder.preprocessing.to_inputs(gray)
    autocast = PRECISIONS[precision]
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        return encoder.embed(inputs).float().cpu()
