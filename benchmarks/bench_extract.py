"""Extraction speed on one synthetic set of 1024x1024 PNGs, in one run:

(a) raw decode: PNG -> gray tensor, one process (the per-worker limit), and with all workers
    in parallel through a DataLoader that does nothing else (the decode-bound limit);
(b) this kit: `python -m extract`, end to end, in a subprocess (its peak memory measured),
    in fp32 and in bf16, and the agreement of the two caches' embeddings;
(c) a naive baseline written the way tutorials do it: PIL open, torchvision transforms per
    image (Resize 256, CenterCrop 224, ToTensor, Normalize), fp32 model, batch 32, no workers.

    python -m benchmarks.bench_extract --images 400     # the figure in docs/performance.md
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms

import cache
from benchmarks.table import print_table
from cache import runtime
from extract import encoders, images, pipeline
from extract.nih import index_images
from extract.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m benchmarks.bench_extract", add_help=add_help)
    parser.add_argument("--images", type=int, default=400, help="synthetic 1024x1024 PNGs to time")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--data-dir", default=None, help="reuse a synthetic set (default: a temporary one)")
    return parser


def decode_rate(paths) -> float:
    start = time.perf_counter()
    for path in paths:
        images.load_gray(path)
    return len(paths) / (time.perf_counter() - start)


class _DecodeOnly(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return index, images.load_gray(self.paths[index]), ""


def _stack_decoded(items):
    """Collate of images of one shape, as the decode-bound ceiling of any pipeline."""
    return torch.stack([gray for _, gray, _ in items])


def decode_bound_rate(paths, *, workers: int, batch_size: int = 64) -> float:
    """Images/s when workers only decode and the main process only collates: the ceiling of
    any pipeline that decodes PNGs with these workers."""
    loader = torch.utils.data.DataLoader(_DecodeOnly(paths), batch_size=batch_size, num_workers=workers,
                                         collate_fn=_stack_decoded, prefetch_factor=4 if workers else None)
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(paths) / (time.perf_counter() - start)


def kit_run(data_dir, *, device: str, workers: int | None, split: str = "all", precision: str = "auto",
            extra=()) -> dict:
    """`python -m extract` in a fresh process: images/s over the image loop (as its summary
    reports it), peak RSS in MiB, the precision it used and its done rows' features."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "extract", "--data-dir", str(data_dir), "--cache", f"{tmp}/c.h5",
                   "--weights", "none", "--device", device, "--split", split, "--precision", precision,
                   *(["--workers", str(workers)] if workers is not None else []), *extra]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   env=dict(os.environ, PYTHONPATH=str(REPO)))
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, not the largest child so far
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(command)} failed")
        table = cache.read_table(f"{tmp}/c.h5")
        features = cache.read_features(f"{tmp}/c.h5", {"done": np.flatnonzero(table["done"])})["done"]
    found = re.search(r"\(([\d.]+) img/s on .*?, (\w+)\)", stdout)
    return {"rate": float(found.group(1)), "precision": found.group(2), "peak_mib": usage.ru_maxrss / 1024,
            "features": features}


def kit_rate(data_dir, *, device: str, workers: int | None, split: str = "all") -> tuple[float, float]:
    """(images/s, peak RSS MiB) of `python -m extract` with its defaults."""
    run = kit_run(data_dir, device=device, workers=workers, split=split)
    return run["rate"], run["peak_mib"]


def relative_error(features, reference) -> float:
    """Largest per-row relative L2 difference between two embeddings of the same images."""
    reference = reference.astype(np.float64)
    return float((np.linalg.norm(features - reference, axis=1) / np.linalg.norm(reference, axis=1)).max())


def naive_rate(paths, *, device: torch.device) -> float:
    """The tutorial pipeline, timed over its image loop like the kit's summary."""
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Identity()
    model = model.eval().to(device)
    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize(encoders.IMAGENET_MEAN, encoders.IMAGENET_STD)])
    batch = []
    start = time.perf_counter()
    with torch.no_grad():
        for index, path in enumerate(paths):
            batch.append(transform(Image.open(path).convert("RGB")))
            if len(batch) == 32 or index == len(paths) - 1:
                model(torch.stack(batch).to(device)).cpu()
                batch = []
    return len(paths) / (time.perf_counter() - start)


def model_rate(device: torch.device, *, batch_size: int, image_size: int = 224, repeats: int = 3,
               precision: str = "fp32") -> float:
    """Images/s of the kit's backbone alone on ready tensors: the ceiling when the model, not
    decoding, is the bottleneck (always so on a CPU)."""
    encoder = encoders.build_encoder("resnet50", weights="none", image_size=image_size, device=device)
    inputs = encoder.preprocessing.to_inputs(torch.rand(batch_size, image_size, image_size, device=device))
    autocast = pipeline.PRECISIONS[precision]
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        encoder.embed(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            encoder.embed(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return repeats * batch_size / (time.perf_counter() - start)


def run(args) -> list[dict]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    native_bf16 = device.type == "cuda" or runtime.cpu_has_native_bf16()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir or tmp)
        if not index_images(data_dir):
            # 16 distinct images, hard-linked: the same decode cost, written in seconds
            write_dataset(data_dir, patients=max(1, args.images // 2), images_per_patient=2, size=1024, seed=0,
                          distinct=16)
        paths = sorted(index_images(data_dir).values())
        one = decode_rate(paths[: min(len(paths), 32)])
        bound = decode_bound_rate(paths, workers=args.workers)
        # Memory must not grow with the dataset: the test split alone (a quarter) against all of it.
        quarter = kit_run(data_dir, device=device.type, workers=args.workers, split="test", precision="fp32")
        fp32 = kit_run(data_dir, device=device.type, workers=args.workers, precision="fp32")
        # Emulated bf16 (no native units) runs several times slower: time it on the quarter only.
        bf16 = kit_run(data_dir, device=device.type, workers=args.workers, precision="bf16",
                       split="all" if native_bf16 else "test")
        naive = naive_rate(paths, device=device)
        model_only = model_rate(device, batch_size=64 if device.type == "cpu" else 256)
    default = pipeline.resolve_precision("auto", device)
    kit = {"fp32": fp32, "bf16": bf16}[default]
    where = f"{len(paths)} synthetic 1024x1024 PNGs, {device.type}, {args.workers} workers"
    native = "native bf16" if native_bf16 else "no native bf16 here: emulated, timed on the test quarter"
    rows = [
        {"stage": "extract", "measure": "decode, 1 process", "value": f"{one:.1f} img/s", "note": where},
        {"stage": "extract", "measure": "decode-bound limit", "value": f"{bound:.1f} img/s", "note": "workers decode only"},
        {"stage": "extract", "measure": "naive tutorial pipeline", "value": f"{naive:.1f} img/s",
         "note": "PIL+transforms per image, fp32, batch 32"},
        {"stage": "extract", "measure": f"model alone ({device.type}, fp32)", "value": f"{model_only:.1f} img/s",
         "note": "the kit's encoder on ready tensors: the ceiling where the model is the bottleneck"},
    ]
    for name, result in (("fp32", fp32), ("bf16", bf16)):
        rows.append({"stage": "extract", "measure": f"this kit, --precision {name}", "value": f"{result['rate']:.1f} img/s",
                     "note": f"{result['rate'] / naive:.2f}x naive" + (f"; {native}" if name == "bf16" else "")})
    rows += [
        {"stage": "extract", "measure": f"this kit, defaults ({default} here)", "value": f"{kit['rate']:.1f} img/s",
         "note": f"{kit['rate'] / naive:.2f}x naive, {kit['rate'] / bound:.0%} of decode-bound, "
                 f"{kit['rate'] / model_only:.0%} of model-bound; peak RSS {kit['peak_mib']:.0f} MiB "
                 f"({quarter['peak_mib']:.0f} MiB for a quarter of the images)"},
        {"stage": "extract", "measure": "bf16 vs fp32 embeddings",
         "value": f"{relative_error(bf16['features'], (fp32 if native_bf16 else quarter)['features']):.2%}",
         "note": "max relative L2 difference per image, the same images through both caches (float16 storage)"},
    ]
    return rows


def main(args) -> int:
    print_table(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
