"""The GPU check: one command for a machine with an NVIDIA GPU, under 10 minutes, no network.

1. agreement: the same images embedded on the CPU (fp32) and on the GPU (its precision),
   within the tolerance of that precision;
2. extraction: this kit's images/s against the decode-bound limit measured in the same run,
   for the default encoder and for one encoder of each family at its default resolution
   (random weights from built-in configurations: no network);
3. heads: the default head at NIH scale (synthetic features) to early stop;
4. search: 100 trials with pruning at NIH scale.

    bash benchmarks/gpu_check.sh            # or: python -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --device cpu --quick   # the CPU-checkable parts, small
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks import bench_extract, bench_heads, bench_search
from benchmarks.table import print_table
from extract import encoders, pipeline
from extract.nih import index_images
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
    parser.add_argument("--tolerance", type=float, default=None,
                        help="relative L2 error allowed in the agreement check (default: by precision)")
    parser.add_argument("--checks", default="agreement,extract,encoders,heads,search",
                        help="comma-separated subset of agreement,extract,encoders,heads,search")
    return parser


# One encoder per family at its default resolution; the hf and xrv entries are built from
# configurations, so the check needs no network (their weights stay random).
FAMILY_ROWS = (("torchvision", "resnet50", []), ("timm", "timm:vit_base_patch16_224", []),
               ("hf", "hf:{dinov2}", ["--layers", "last:4"]), ("xrv", "xrv:densenet121-res224-all", []))


def embedding_agreement(paths, *, weights: str, device: torch.device, precision: str, image_size: int = 224,
                        backbone: str = "resnet50", tolerance: float | None = None) -> dict:
    """Max relative L2 error and min cosine similarity between CPU fp32 and device embeddings
    of the same images; ok when the error is within what the device precision explains."""
    results = {}
    for name, where, how in (("cpu", torch.device("cpu"), "fp32"), ("device", device, precision)):
        encoder = encoders.build_encoder(backbone, weights=weights, image_size=image_size, device=where)
        batch = next(pipeline.batches(torch.arange(len(paths)), paths, encoder=encoder, batch_size=len(paths),
                                      workers=0))
        results[name] = pipeline.embed_batch(encoder, batch, device=where, precision=how).numpy()
    cpu, dev = results["cpu"].astype(np.float64), results["device"].astype(np.float64)
    relative = np.linalg.norm(dev - cpu, axis=1) / np.linalg.norm(cpu, axis=1)
    cosine = (dev * cpu).sum(axis=1) / (np.linalg.norm(dev, axis=1) * np.linalg.norm(cpu, axis=1))
    allowed = TOLERANCE[precision] if tolerance is None else tolerance
    return {"max_relative_error": float(relative.max()), "min_cosine": float(cosine.min()),
            "tolerance": allowed, "ok": bool(relative.max() <= allowed)}


def tiny_dinov2_folder(folder: Path, *, quick: bool) -> Path:
    """A DINOv2 configuration saved like a download: ViT-B/14 at 518 px (RAD-DINO's shape),
    or a 2-block toy with --quick."""
    import transformers
    shape = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=8,
                 image_size=64) if quick else dict(patch_size=14, image_size=518)
    transformers.Dinov2Model(transformers.Dinov2Config(**shape)).save_pretrained(folder)
    side = shape["image_size"]
    transformers.BitImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                   do_center_crop=True, resample=3).save_pretrained(folder)
    return folder


def family_rows(data_dir: Path, *, device: torch.device, workers: int, bound: float, quick: bool, tmp: Path) -> list:
    rows = []
    for family, spec, extra in FAMILY_ROWS:
        if family != "torchvision" and importlib.util.find_spec(encoders.FAMILIES[family].module) is None:
            rows.append({"stage": "encoders", "measure": spec, "value": "skipped",
                         "note": f"pip install -e .[{encoders.FAMILIES[family].extra}]"})
            continue
        if family == "hf":
            spec = spec.format(dinov2=tiny_dinov2_folder(tmp / "dinov2", quick=quick))
            extra = [*extra, "--weights", "pretrained"]  # the saved random weights
        if quick and family == "timm":
            spec = "timm:test_vit"
        run = bench_extract.kit_run(data_dir, device=device.type, workers=workers, extra=["--backbone", spec, *extra])
        name = "hf:dinov2 ViT-B/14 config" if family == "hf" else spec
        rows.append({"stage": "encoders", "measure": f"{name} ({family})", "value": f"{run['rate']:.0f} img/s",
                     "note": f"{run['rate'] / bound:.0%} of decode-bound, {run['precision']}, "
                             f"{run['features'].shape[1]}-d, peak RSS {run['peak_mib']:.0f} MiB"})
    return rows


def run(args) -> tuple[list[dict], bool]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA GPU (use --device cpu --quick to test the script)")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    checks = set(args.checks.split(","))
    n_images = 16 if args.quick else args.images
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        write_dataset(data_dir, patients=n_images // 2, images_per_patient=2, size=256 if args.quick else 1024,
                      distinct=min(n_images, 64))
        paths = sorted(index_images(data_dir).values())
        if "agreement" in checks:
            check = embedding_agreement(paths[:8 if args.quick else 32], weights=args.weights, device=device,
                                        precision=precision, tolerance=args.tolerance)
            ok = check["ok"]
            rows.append({"stage": "check", "measure": f"CPU fp32 vs {device.type} {precision} embeddings",
                         "value": "PASS" if check["ok"] else "FAIL",
                         "note": f"max relative L2 error {check['max_relative_error']:.2e} (tolerance "
                                 f"{check['tolerance']:.0e}), min cosine {check['min_cosine']:.6f}; weights {args.weights}"})
        workers = pipeline.default_workers()
        bound = bench_extract.decode_bound_rate(paths, workers=workers)
        if "extract" in checks:
            kit, peak = bench_extract.kit_rate(data_dir, device=device.type, workers=workers)
            rows.append({"stage": "extract", "measure": "decode-bound limit", "value": f"{bound:.0f} img/s",
                         "note": f"{len(paths)} PNGs, {workers} workers decoding only"})
            rows.append({"stage": "extract", "measure": "this kit", "value": f"{kit:.0f} img/s",
                         "note": f"{kit / bound:.0%} of decode-bound (target 80%); peak RSS {peak:.0f} MiB"})
        if "encoders" in checks:
            rows += family_rows(data_dir, device=device, workers=workers, bound=bound, quick=args.quick, tmp=Path(tmp))
    scale = "0.01" if args.quick else "1"
    if "heads" in checks:
        rows += bench_heads.run(bench_heads.get_args_parser().parse_args(
            ["--scale", scale, "--device", device.type, "--skip-sklearn",
             *(["--precision-scale", "0.002"] if args.quick else [])]))
    if "search" in checks:
        rows += bench_search.run(bench_search.get_args_parser().parse_args(
            ["--scale", scale, "--dim", "2048", "--device", device.type, "--pruner", "median",
             *(["--trials", "4", "--max-epochs", "3"] if args.quick else ["--trials", "100"])]))
    return rows, ok


def main(args) -> int:
    rows, agreement_ok = run(args)
    print_table(rows)
    return 0 if agreement_ok else 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
