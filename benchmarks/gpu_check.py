"""The GPU check: one command for a machine with an NVIDIA GPU, under 8 minutes, no network.

1. agreement: the same images embedded on the CPU (fp32) and on the GPU (its precision),
   within the tolerance of that precision;
2. extraction: this kit's images/s against the decode-bound limit measured in the same run;
3. heads: the default head at NIH scale (synthetic features) to early stop;
4. search: 100 trials with pruning at NIH scale.

    bash benchmarks/gpu_check.sh            # or: python -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --device cpu --quick   # the CPU-checkable parts, small
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks import bench_extract, bench_heads, bench_search
from benchmarks.table import print_table
from extract import backbone, images
from extract.nih import index_images
from extract.run import embed_batch, collate_by_shape
from extract.synthetic import write_dataset

# Relative L2 error allowed between CPU fp32 and device embeddings, by device precision.
TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2, "fp16": 1e-2}


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m benchmarks.gpu_check", add_help=add_help)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--precision", default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--weights", default="none", help="pretrained weights are optional: none, imagenet or a PATH")
    parser.add_argument("--images", type=int, default=8192,
                        help="1024x1024 PNGs for the throughput check (64 distinct, hard-linked)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to test the script itself")
    return parser


def embedding_agreement(paths, *, weights: str, device: torch.device, precision: str, image_size: int = 224) -> dict:
    """Max relative L2 error and min cosine similarity between CPU fp32 and device embeddings."""
    mean, std = backbone.normalization(weights)
    items = [(i, images.load_gray(p), "") for i, p in enumerate(paths)]
    results = {}
    for name, where, how in (("cpu", torch.device("cpu"), "fp32"), ("device", device, precision)):
        model = backbone.build_backbone(weights, device=where)
        # CPU runs get images resized in workers (float); devices resize uint8 themselves.
        batch_items = [(i, images.resize_gray(g, image_size) if where.type == "cpu" else g, "") for i, g, _ in items]
        results[name] = embed_batch(model, collate_by_shape(batch_items), image_size=image_size, mean=mean, std=std,
                                    device=where, precision=how).numpy()
    cpu, dev = results["cpu"].astype(np.float64), results["device"].astype(np.float64)
    relative = np.linalg.norm(dev - cpu, axis=1) / np.linalg.norm(cpu, axis=1)
    cosine = (dev * cpu).sum(axis=1) / (np.linalg.norm(dev, axis=1) * np.linalg.norm(cpu, axis=1))
    return {"max_relative_error": float(relative.max()), "min_cosine": float(cosine.min()),
            "tolerance": TOLERANCE[precision], "ok": bool(relative.max() <= TOLERANCE[precision])}


def run(args) -> tuple[list[dict], bool]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA GPU (use --device cpu --quick to test the script)")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    n_images = 16 if args.quick else args.images
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        write_dataset(data_dir, patients=n_images // 2, images_per_patient=2, size=256 if args.quick else 1024,
                      distinct=min(n_images, 64))
        paths = sorted(index_images(data_dir).values())
        check = embedding_agreement(paths[:8 if args.quick else 32], weights=args.weights, device=device,
                                    precision=precision)
        rows.append({"stage": "check", "measure": f"CPU fp32 vs {device.type} {precision} embeddings",
                     "value": "PASS" if check["ok"] else "FAIL",
                     "note": f"max relative L2 error {check['max_relative_error']:.2e} (tolerance "
                             f"{check['tolerance']:.0e}), min cosine {check['min_cosine']:.6f}; weights {args.weights}"})
        workers = min(os.cpu_count() or 1, 16)
        bound = bench_extract.decode_bound_rate(paths, workers=workers)
        kit, peak = bench_extract.kit_rate(data_dir, device=device.type, workers=workers)
        rows.append({"stage": "extract", "measure": "decode-bound limit", "value": f"{bound:.0f} img/s",
                     "note": f"{len(paths)} PNGs, {workers} workers decoding only"})
        rows.append({"stage": "extract", "measure": "this kit", "value": f"{kit:.0f} img/s",
                     "note": f"{kit / bound:.0%} of decode-bound (target 80%); peak RSS {peak:.0f} MiB"})
    scale = "0.01" if args.quick else "1"
    rows += bench_heads.run(bench_heads.get_args_parser().parse_args(
        ["--scale", scale, "--device", device.type, "--skip-sklearn"]))
    rows += bench_search.run(bench_search.get_args_parser().parse_args(
        ["--scale", scale, "--dim", "2048", "--device", device.type, "--pruners", "median",
         *(["--trials", "4", "--max-epochs", "3"] if args.quick else ["--trials", "100"])]))
    return rows, check["ok"]


def main(args) -> int:
    rows, agreement_ok = run(args)
    print_table(rows)
    return 0 if agreement_ok else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
