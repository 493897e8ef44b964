"""`python -m heads.predict --run DIR IMAGE_OR_FOLDER...`: score new images with a trained head.

The images go through the same encoder, weights, preprocessing, layers and precision that
made the run's cache (read from the run's config.json), then the head; the 14 probabilities
per image go to a CSV (default under outputs/predictions/).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cache.flags import OneLineParser, Valid, number_type
from cache.outdir import OutDirError, refuse_link
from cache.runtime import DeviceUnavailable, resolve_device
from heads.fit import load_head


class PredictError(Exception):
    """A run whose extraction cannot be reproduced here, or unusable inputs."""


def get_args_parser(add_help=True):
    parser = OneLineParser("python -m heads.predict", add_help=add_help,
                           description="Score PNG images with a trained head.")
    parser.add_argument("--run", required=True, help="a run directory written by heads.train or search")
    parser.add_argument("images", nargs="+", help="PNG files, or folders of them")
    parser.add_argument("--out", default=None, help="CSV to write (default: outputs/predictions/<run name>.csv)")
    parser.add_argument("--weights", default=None,
                        help="the encoder weights file or folder, when the cache was made from local weights")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=number_type(int, Valid(1)), default=32,
                        help="images per model batch, >= 1")
    return parser


def check_out(out: Path) -> None:
    """Refuse, before any work, an --out that is a folder or a file this tool did not write:
    only an earlier predictions CSV (its header starts `image,prob_`) is replaced."""
    refuse_link(out)
    if out.is_dir():
        raise PredictError(f"--out {out} is a folder; give the path of the CSV to write")
    if out.exists():
        try:
            with open(out, encoding="utf-8", errors="replace") as handle:
                header = handle.readline()
        except OSError as err:
            raise PredictError(f"--out {out} cannot be read ({err}); choose another --out") from None
        if not header.startswith("image,prob_"):
            raise PredictError(f"--out {out} exists and is not a predictions CSV written by heads.predict; "
                               f"choose another --out")


def read_run_attrs(run_dir: Path) -> dict:
    """The cache attributes a run's config.json recorded: how its features were made."""
    if not (run_dir / "head.pt").exists() or not (run_dir / "config.json").exists():
        raise PredictError(f"{run_dir} is not a head run directory (needs head.pt and config.json)")
    try:
        return json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["cache_attrs"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PredictError(f"{run_dir / 'config.json'} is damaged or not a run's config ({type(err).__name__}: "
                           f"{err}); use a run directory written by heads.train or search") from None


def main(args) -> int:
    from extract.encoders import EncoderError  # torchvision is needed here, not for training heads
    out = Path(args.out) if args.out else Path("outputs") / "predictions" / f"{Path(args.run).name}.csv"
    try:
        check_out(out)
        failed = predict(run_dir=Path(args.run), inputs=args.images, out=out, weights_path=args.weights,
                         device=resolve_device(args.device), batch_size=args.batch_size)
    except (PredictError, OutDirError, DeviceUnavailable, EncoderError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for image, reason in failed:
        print(f"not scored: {printable(image)}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def printable(path) -> str:
    """A file name as text that any terminal and the UTF-8 CSV can hold: bytes that are not
    UTF-8 (Linux allows them in names) appear as \\xNN escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def weights_spec(attrs: dict, weights_path) -> str:
    """The --weights value that rebuilds the cache's encoder, checked against its record."""
    from extract import encoders
    recorded = attrs["weights"]
    if recorded.startswith("torchvision:"):
        return recorded.split(":", 1)[1]
    if recorded.startswith("random("):
        return "none"
    if not recorded.startswith("file:"):
        return "pretrained"
    if weights_path is None:
        raise PredictError(f"the cache was made with local weights {recorded!r}; pass that file with --weights PATH")
    spec = str(weights_path)
    if encoders.describe_local_weights(spec)["weights_sha256"] != attrs["weights_sha256"]:
        raise PredictError(f"--weights {weights_path} is not the file the cache was made with (sha256 differs)")
    return spec


def build_encoder(attrs: dict, weights_path, *, device):
    """The encoder that made the cache, refused if it would not prepare images the same way."""
    from extract import encoders
    recipe = attrs["preprocessing"]
    encoder = encoders.build_encoder(attrs["backbone"], weights=weights_spec(attrs, weights_path),
                                     image_size=attrs["image_size"], layers=tuple(recipe.get("layers", ())),
                                     pooling=recipe.get("pooling", "cls"), device=device)
    if encoder.recipe() != recipe:
        raise PredictError(f"the cache's preprocessing {recipe} differs from this version's {encoder.recipe()}; "
                           f"re-extract, or predict with the version that made the cache")
    return encoder


def list_images(inputs) -> list[Path]:
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(item.rglob("*.png"))
        else:
            paths.append(item)
    if not paths:
        raise PredictError(f"no PNG images in {[printable(i) for i in inputs]}")
    return paths


def predict(*, run_dir: Path, inputs, out, weights_path, device, batch_size) -> list:
    """Write the CSV; returns [(image, reason)] for images that could not be scored."""
    from extract import pipeline

    attrs = read_run_attrs(run_dir)
    encoder = build_encoder(attrs, weights_path, device=device)
    head, checkpoint = load_head(run_dir / "head.pt", device=device)
    paths = list_images(inputs)
    scored, probabilities, failed = [], [], []
    for batch in pipeline.batches(np.arange(len(paths)), paths, encoder=encoder, batch_size=batch_size, workers=0):
        failed += [(paths[row], reason) for row, reason in batch["failed"]]
        if not len(batch["rows"]):
            continue
        features = pipeline.embed_batch(encoder, batch, device=device, precision=attrs["precision"])
        # Round as the cache stored them, then standardize as the head was trained.
        features = features.to(getattr(torch, attrs["feature_dtype"])).float()
        features = ((features - checkpoint["feature_mean"]) / checkpoint["feature_std"]).to(device)
        with torch.inference_mode():
            probabilities.append(torch.sigmoid(head(features)).float().cpu().numpy())
        scored += [paths[row] for row in batch["rows"].tolist()]
    frame = pd.DataFrame(np.concatenate(probabilities) if probabilities else np.zeros((0, len(checkpoint["classes"]))),
                         columns=[f"prob_{c}" for c in checkpoint["classes"]])
    frame.insert(0, "image", [printable(p) for p in scored])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, float_format="%.6f")
    print(f"scored {len(scored)} images ({len(failed)} failed) with {run_dir}; wrote {out}")
    return failed


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
