"""`python -m heads.predict --run DIR IMAGE_OR_FOLDER...`: score new images with a trained head.

The images go through the same backbone, weights, preprocessing and precision that made the
run's cache (read from the run's config.json), then the head; the 14 probabilities per image
go to a CSV.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cache.runtime import DeviceUnavailable, resolve_device
from heads.fit import load_head


class PredictError(Exception):
    """A run whose extraction cannot be reproduced here, or unusable inputs."""


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m heads.predict", add_help=add_help,
                                     description="Score PNG images with a trained head.")
    parser.add_argument("--run", required=True, help="a run directory written by heads.train or search")
    parser.add_argument("images", nargs="+", help="PNG files, or folders of them")
    parser.add_argument("--out", default="predictions.csv", help="CSV to write")
    parser.add_argument("--weights", default=None,
                        help="the backbone state dict, when the cache was made from a local file")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


def main(args) -> int:
    try:
        failed = predict(run_dir=Path(args.run), inputs=args.images, out=args.out, weights_path=args.weights,
                         device=resolve_device(args.device), batch_size=args.batch_size)
    except (PredictError, DeviceUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for image, reason in failed:
        print(f"not scored: {image}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def backbone_spec(attrs: dict, weights_path) -> str:
    """The --weights value that rebuilds the cache's backbone, checked against its record."""
    from extract import backbone
    recorded = attrs["weights"]
    if recorded.startswith("torchvision:"):
        return recorded.split(":", 1)[1]
    if recorded.startswith("random("):
        return "none"
    if weights_path is None:
        raise PredictError(f"the cache was made with local weights {recorded!r}; pass that file with --weights PATH")
    if backbone.describe_weights(str(weights_path))["weights_sha256"] != attrs["weights_sha256"]:
        raise PredictError(f"--weights {weights_path} is not the file the cache was made with (sha256 differs)")
    return str(weights_path)


def check_reproducible(attrs: dict) -> None:
    from extract import backbone, images
    if attrs["backbone"] != backbone.BACKBONE:
        raise PredictError(f"the cache was made with backbone {attrs['backbone']!r}; this version has {backbone.BACKBONE}")
    mean, std = backbone.normalization("")
    current = images.preprocessing_record(image_size=attrs["image_size"], mean=mean, std=std)
    if current != attrs["preprocessing"]:
        raise PredictError(f"the cache's preprocessing {attrs['preprocessing']} differs from this version's "
                           f"{current}; re-extract, or predict with the version that made the cache")


def list_images(inputs) -> list[Path]:
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(item.rglob("*.png"))
        else:
            paths.append(item)
    if not paths:
        raise PredictError(f"no PNG images in {list(inputs)}")
    return paths


def predict(*, run_dir: Path, inputs, out, weights_path, device, batch_size) -> list:
    """Write the CSV; returns [(image, reason)] for images that could not be scored."""
    from extract import backbone  # torchvision is needed here, not for training heads
    from extract.run import ImageRows, collate_by_shape, embed_batch

    if not (run_dir / "head.pt").exists() or not (run_dir / "config.json").exists():
        raise PredictError(f"{run_dir} is not a head run directory (needs head.pt and config.json)")
    attrs = json.loads((run_dir / "config.json").read_text())["cache_attrs"]
    check_reproducible(attrs)
    spec = backbone_spec(attrs, weights_path)
    head, checkpoint = load_head(run_dir / "head.pt", device=device)
    model = backbone.build_backbone(spec, device=device)
    paths = list_images(inputs)
    resize_to = None if device.type == "cuda" else attrs["image_size"]
    loader = torch.utils.data.DataLoader(ImageRows(np.arange(len(paths)), paths, resize_to), batch_size=batch_size,
                                         collate_fn=collate_by_shape)
    mean, std = attrs["preprocessing"]["normalize_mean"], attrs["preprocessing"]["normalize_std"]
    scored, probabilities, failed = [], [], []
    for batch in loader:
        failed += [(paths[row], reason) for row, reason in batch["failed"]]
        if not len(batch["rows"]):
            continue
        features = embed_batch(model, batch, image_size=attrs["image_size"], mean=mean, std=std, device=device,
                               precision=attrs["precision"])
        # Round as the cache stored them, then standardize as the head was trained.
        features = features.to(getattr(torch, attrs["feature_dtype"])).float()
        features = ((features - checkpoint["feature_mean"]) / checkpoint["feature_std"]).to(device)
        with torch.inference_mode():
            probabilities.append(torch.sigmoid(head(features)).float().cpu().numpy())
        scored += [paths[row] for row in batch["rows"].tolist()]
    frame = pd.DataFrame(np.concatenate(probabilities) if probabilities else np.zeros((0, len(checkpoint["classes"]))),
                         columns=[f"prob_{c}" for c in checkpoint["classes"]])
    frame.insert(0, "image", [str(p) for p in scored])
    frame.to_csv(out, index=False, float_format="%.6f")
    print(f"scored {len(scored)} images ({len(failed)} failed) with {run_dir}; wrote {out}")
    return failed


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
