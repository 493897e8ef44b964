"""Extraction speed on one synthetic set of 1024x1024 PNGs, in one run:

(a) raw decode: PNG -> gray tensor, one process (the per-worker limit), and with all workers
    in parallel through a DataLoader that does nothing else (the decode-bound limit);
(b) this kit: `python -m extract`, end to end, in a subprocess (its peak memory measured);
(c) a naive baseline written the way tutorials do it: PIL open, torchvision transforms per
    image (Resize 256, CenterCrop 224, ToTensor, Normalize), fp32 model, batch 32, no workers.

    python -m benchmarks.bench_extract --images 64
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

import torch
import torchvision
from PIL import Image
from torchvision import transforms

from benchmarks.table import print_table
from extract import backbone, images
from extract.nih import index_images
from extract.run import collate_by_shape
from extract.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m benchmarks.bench_extract", add_help=add_help)
    parser.add_argument("--images", type=int, default=64, help="synthetic 1024x1024 PNGs to time")
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


def decode_bound_rate(paths, *, workers: int, batch_size: int = 64) -> float:
    """Images/s when workers only decode and the main process only collates: the ceiling of
    any pipeline that decodes PNGs with these workers."""
    loader = torch.utils.data.DataLoader(_DecodeOnly(paths), batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_by_shape, prefetch_factor=4 if workers else None)
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(paths) / (time.perf_counter() - start)


def kit_rate(data_dir, *, device: str, workers: int, split: str = "all") -> tuple[float, float]:
    """(images/s over the image loop, as the kit's summary reports it; peak RSS in MiB) of
    `python -m extract` in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "extract", "--data-dir", str(data_dir), "--cache", f"{tmp}/c.h5",
                   "--weights", "none", "--device", device, "--workers", str(workers), "--split", split]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   env=dict(os.environ, PYTHONPATH=str(REPO)))
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, not the largest child so far
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(command)} failed")
    rate = float(re.search(r"\(([\d.]+) img/s on", stdout).group(1))
    return rate, usage.ru_maxrss / 1024


def naive_rate(paths, *, device: torch.device) -> float:
    """The tutorial pipeline, timed over its image loop like the kit's summary."""
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Identity()
    model = model.eval().to(device)
    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize(images.IMAGENET_MEAN, images.IMAGENET_STD)])
    batch = []
    start = time.perf_counter()
    with torch.no_grad():
        for index, path in enumerate(paths):
            batch.append(transform(Image.open(path).convert("RGB")))
            if len(batch) == 32 or index == len(paths) - 1:
                model(torch.stack(batch).to(device)).cpu()
                batch = []
    return len(paths) / (time.perf_counter() - start)


def model_rate(device: torch.device, *, batch_size: int, image_size: int = 224, repeats: int = 3) -> float:
    """Images/s of the kit's backbone alone on ready tensors: the ceiling when the model, not
    decoding, is the bottleneck (always so on a CPU)."""
    model = backbone.build_backbone("none", device=device)
    inputs = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    with torch.inference_mode():
        model(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return repeats * batch_size / (time.perf_counter() - start)


def run(args) -> list[dict]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(args.data_dir or tmp)
        if not index_images(data_dir):
            patients = max(1, args.images // 2)
            write_dataset(data_dir, patients=patients, images_per_patient=2, size=1024, seed=0)
        paths = sorted(index_images(data_dir).values())
        one = decode_rate(paths[: min(len(paths), 32)])
        bound = decode_bound_rate(paths, workers=args.workers)
        # Memory must not grow with the dataset: the test split alone (a quarter) against all of it.
        _, quarter_mib = kit_rate(data_dir, device=device.type, workers=args.workers, split="test")
        kit, peak_mib = kit_rate(data_dir, device=device.type, workers=args.workers)
        naive = naive_rate(paths, device=device)
        model_only = model_rate(device, batch_size=64 if device.type == "cpu" else 256)
    where = f"{len(paths)} synthetic 1024x1024 PNGs, {device.type}, {args.workers} workers"
    return [
        {"stage": "extract", "measure": "decode, 1 process", "value": f"{one:.1f} img/s", "note": where},
        {"stage": "extract", "measure": "decode-bound limit", "value": f"{bound:.1f} img/s", "note": "workers decode only"},
        {"stage": "extract", "measure": "naive tutorial pipeline", "value": f"{naive:.1f} img/s",
         "note": "PIL+transforms per image, fp32, batch 32"},
        {"stage": "extract", "measure": f"model alone ({device.type})", "value": f"{model_only:.1f} img/s",
         "note": "the kit's backbone on ready tensors: the ceiling where the model is the bottleneck"},
        {"stage": "extract", "measure": "this kit (python -m extract)", "value": f"{kit:.1f} img/s",
         "note": f"{kit / naive:.2f}x naive, {kit / bound:.0%} of decode-bound, {kit / model_only:.0%} of model-bound; "
                 f"peak RSS {peak_mib:.0f} MiB ({quarter_mib:.0f} MiB for a quarter of the images)"},
    ]


def main(args) -> int:
    print_table(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
