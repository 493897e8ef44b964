"""`python -m heads.predict --run DIR IMAGE_OR_FOLDER...`: score new images with a trained head.

The images go through the same encoder, weights, preprocessing, layers and precision that
made the run's cache (read from the run's config.json; a run on several caches rebuilds each
cache's encoder and joins the features in the run's column order), then the head. The CSV
(default under outputs/predictions/) has image_id (the file name), path, and one prob_<class>
column per class.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cache.flags import OneLineParser, Valid, number_type
from cache.outdir import OutDirError, refuse_link
from cache.runtime import DeviceUnavailable, resolve_device
from heads.fit import head_from_checkpoint, predict_proba


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
    only an earlier predictions CSV (its header starts `image_id,path,prob_`, or `image,prob_`
    before image_id) is replaced."""
    refuse_link(out)
    if out.is_dir():
        raise PredictError(f"--out {out} is a folder; give the path of the CSV to write")
    if out.exists():
        try:
            with open(out, encoding="utf-8", errors="replace") as handle:
                header = handle.readline()
        except OSError as err:
            raise PredictError(f"--out {out} cannot be read ({err}); choose another --out") from None
        if not header.startswith(("image_id,path,prob_", "image,prob_")):
            raise PredictError(f"--out {out} exists and is not a predictions CSV written by heads.predict; "
                               f"choose another --out")


FEATURE_DTYPES = ("float16", "float32")  # what a cache may store (cache/__init__.py)
RECIPE_TYPES = {"backbone": str, "weights": str, "weights_sha256": str, "image_size": int, "precision": str,
                "feature_dtype": str, "feature_dim": int, "preprocessing": dict, "fingerprint": str}


def read_run(run_dir: Path) -> tuple[dict, list]:
    """(config.json, one recipe per cache in the run's column order): the cache attributes
    that say how each block of the head's features was made, checked before they are trusted."""
    if not (run_dir / "head.pt").exists() or not (run_dir / "config.json").exists():
        raise PredictError(f"{run_dir} is not a head run directory (needs head.pt and config.json)")
    path = run_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        # the first cache's recipe is cache_attrs; a joined run adds one per further cache
        recipes = [config["cache_attrs"]] + [entry.get("attrs") or _recipe_from_cache(entry, path)
                                             for entry in (config.get("caches") or [])[1:]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise PredictError(f"{path} is damaged or not a run's config ({type(err).__name__}: {err}); use a run "
                           f"directory written by heads.train or search") from None
    for recipe in recipes:
        _check_recipe(recipe, path)
    return config, recipes


def _recipe_from_cache(entry: dict, config_path: Path) -> dict:
    """A joined run written before config.json kept every cache's attributes: read them from the
    cache itself, if it is still there and still the one the run was trained on."""
    import cache
    try:
        attrs = cache.read_attrs(entry["path"])
    except cache.CacheError as err:
        raise PredictError(f"{config_path} records only the first of its caches' recipes and {entry['path']} "
                           f"cannot be read ({err}); retrain the run with this version") from None
    if attrs["fingerprint"] != entry["fingerprint"]:
        raise PredictError(f"{entry['path']} is no longer the cache the run in {config_path.parent} was trained "
                           f"on (fingerprint differs); retrain the run with this version")
    return attrs


def _check_recipe(recipe, config_path: Path) -> None:
    from extract.pipeline import PRECISIONS
    if not isinstance(recipe, dict):
        raise PredictError(f"{config_path}: a cache's attributes are {type(recipe).__name__}, not a mapping; "
                           f"use a run directory written by heads.train or search")
    for key, kind in RECIPE_TYPES.items():
        if not isinstance(recipe.get(key), kind) or isinstance(recipe.get(key), bool):
            raise PredictError(f"{config_path}: cache attribute {key} is {recipe.get(key)!r}, not a "
                               f"{kind.__name__}; use the config.json the run was written with")
    if recipe["precision"] not in PRECISIONS:
        raise PredictError(f"{config_path}: unknown precision {recipe['precision']!r} (known: "
                           f"{', '.join(PRECISIONS)}); use the config.json the run was written with")
    if recipe["feature_dtype"] not in FEATURE_DTYPES:
        raise PredictError(f"{config_path}: unknown feature_dtype {recipe['feature_dtype']!r} (known: "
                           f"{', '.join(FEATURE_DTYPES)}); use the config.json the run was written with")


def read_checkpoint(path: Path, *, device) -> tuple[torch.nn.Module, dict]:
    """(head, checkpoint) from head.pt, loaded without unpickling code and checked to hold what
    heads.train writes (heads.fit.head_checkpoint) before any of it is used."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a foreign or damaged file fails in many ways (zip, pickle, EOF)
        raise PredictError(f"{path} is not a readable head checkpoint ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else 'empty'}); use the head.pt heads.train "
                           f"wrote") from None
    problem = _checkpoint_problem(checkpoint)
    if problem:
        raise PredictError(f"{path} is not a head checkpoint: {problem}; use the head.pt heads.train wrote")
    try:
        return head_from_checkpoint(checkpoint, device=device), checkpoint
    except (RuntimeError, ValueError, TypeError) as err:
        raise PredictError(f"{path}: its weights do not fit its settings ({str(err).splitlines()[0]}); use the "
                           f"head.pt heads.train wrote") from None


def _checkpoint_problem(checkpoint) -> str | None:
    if not isinstance(checkpoint, dict):
        return f"it holds a {type(checkpoint).__name__}, not a dict"
    missing = [key for key in ("state_dict", "settings", "in_dim", "classes", "feature_mean", "feature_std")
               if key not in checkpoint]
    if missing:
        return f"{missing} missing"
    settings, in_dim, classes = checkpoint["settings"], checkpoint["in_dim"], checkpoint["classes"]
    if not isinstance(in_dim, int) or in_dim < 1:
        return f"in_dim is {in_dim!r}"
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "classes is not a list of class names"
    if not isinstance(settings, dict) or not all(isinstance(settings.get(k), int) for k in ("depth", "width")) \
            or not isinstance(settings.get("dropout"), (int, float)):
        return "settings lack the head's depth, width and dropout"
    if not isinstance(checkpoint["state_dict"], dict) or \
            not all(isinstance(v, torch.Tensor) for v in checkpoint["state_dict"].values()):
        return "state_dict is not a mapping of tensors"
    for key in ("feature_mean", "feature_std"):
        value = checkpoint[key]
        if not isinstance(value, torch.Tensor) or value.shape != (in_dim,) or not torch.isfinite(value).all():
            return f"{key} is not {in_dim} finite numbers"
    if not (checkpoint["feature_std"] > 0).all():
        return "feature_std holds values <= 0"
    return None


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
        _check_local_folder(attrs)
        return "pretrained"
    if weights_path is None:
        raise PredictError(f"the cache was made with local weights {recorded!r}; pass that file with --weights PATH")
    spec = str(weights_path)
    if encoders.describe_local_weights(spec)["weights_sha256"] != attrs["weights_sha256"]:
        raise PredictError(f"--weights {weights_path} is not the file the cache was made with (sha256 differs)")
    return spec


def _check_local_folder(attrs: dict) -> None:
    """A cache made from a local Hugging Face folder (--backbone hf:/path) recorded the folder's
    hash: the folder must still be there and unchanged, or the features would be another network's."""
    from extract import encoders
    family, name = encoders.split_backbone(attrs["backbone"])
    if family != "hf" or not attrs["weights_sha256"]:
        return
    if not Path(name).is_dir():
        raise PredictError(f"the cache was made from the local folder {name} (--backbone {attrs['backbone']}), "
                           f"which is not there; restore it at that path")
    if encoders.describe_local_weights(name)["weights_sha256"] != attrs["weights_sha256"]:
        raise PredictError(f"the folder {name} has changed since the cache was made (its hash differs: config, "
                           f"processor or weights); restore it, or re-extract and retrain")


def build_encoder(attrs: dict, weights_path, *, device) -> tuple:
    """(the encoder that made the cache, the warnings to print as one line each), refused if it
    would not prepare images the same way."""
    from extract import encoders
    recipe = attrs["preprocessing"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder = encoders.build_encoder(attrs["backbone"], weights=weights_spec(attrs, weights_path),
                                         image_size=attrs["image_size"], layers=tuple(recipe.get("layers", ())),
                                         pooling=recipe.get("pooling", "cls"), device=device)
    # random weights are said once for the whole run by predict(), in the run's terms
    notes = [] if attrs["weights"].startswith("random(") else \
        [str(w.message).splitlines()[0] for w in caught if str(w.message)]
    if encoder.recipe() != recipe:
        raise PredictError(f"the cache's preprocessing {recipe} differs from this version's {encoder.recipe()}; "
                           f"re-extract, or predict with the version that made the cache")
    if encoder.feature_dim != attrs["feature_dim"]:
        raise PredictError(f"{attrs['backbone']} gives {encoder.feature_dim} features here, the cache holds "
                           f"{attrs['feature_dim']}; predict with the version that made the cache")
    return encoder, notes


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


def embed_images(paths: list, *, encoder, attrs: dict, device, batch_size: int) -> tuple[dict, dict]:
    """({row: features as the cache stored them, float32}, {row: why it failed}) for one encoder."""
    from extract import pipeline

    features, failed = {}, {}
    for batch in pipeline.batches(np.arange(len(paths)), paths, encoder=encoder, batch_size=batch_size, workers=0):
        failed.update(dict(batch["failed"]))
        if not len(batch["rows"]):
            continue
        embedded = pipeline.embed_batch(encoder, batch, device=device, precision=attrs["precision"])
        embedded = embedded.to(getattr(torch, attrs["feature_dtype"])).float()  # rounded as the cache stored it
        features.update(zip(batch["rows"].tolist(), embedded))
    return features, failed


def say_warnings(config: dict, recipes: list, *, notes: list) -> None:
    """Each caveat once, one line each: random encoder weights (however many caches have them),
    classes the run never saw a train positive of, the encoders' own warnings."""
    random = [attrs["backbone"] for attrs in recipes if attrs["weights"].startswith("random(")]
    if random:
        notes = [f"{' + '.join(random)}: random encoder weights (the cache was made with --weights none), so "
                 f"these probabilities only test the pipeline", *notes]
    unlearned = config.get("classes_without_train_positive")
    if isinstance(unlearned, list) and unlearned:
        notes.append(f"the run had no train positive for {', '.join(map(str, unlearned))}: its probabilities for "
                     f"{'it' if len(unlearned) == 1 else 'them'} mean nothing")
    for note in dict.fromkeys(notes):
        print(f"warning: {note}", file=sys.stderr)


def predict(*, run_dir: Path, inputs, out, weights_path, device, batch_size) -> list:
    """Write the CSV; returns [(image, reason)] for images that could not be scored. A run on
    several caches embeds each image with every cache's encoder and joins the features in the
    run's column order."""
    config, recipes = read_run(run_dir)
    head, checkpoint = read_checkpoint(run_dir / "head.pt", device=device)
    recorded = checkpoint.get("cache_fingerprints")
    if recorded is not None and list(recorded) != [r["fingerprint"] for r in recipes]:
        raise PredictError(f"{run_dir}: head.pt and config.json name different caches; use an untouched run directory")
    if "pooled" in config:  # several datasets' rows, one encoder recipe (checked when pooled): embed once
        recipes = recipes[:1]
    if sum(r["feature_dim"] for r in recipes) != checkpoint["in_dim"]:
        raise PredictError(f"{run_dir}: the head takes {checkpoint['in_dim']} features, its caches give "
                           f"{sum(r['feature_dim'] for r in recipes)}; use an untouched run directory")
    built = [build_encoder(attrs, weights_path, device=device) for attrs in recipes]
    encoders = [encoder for encoder, _ in built]
    say_warnings(config, recipes, notes=[note for _, notes in built for note in notes])
    paths = list_images(inputs)
    per_encoder, failed = [], {}
    for encoder, attrs in zip(encoders, recipes):
        features, reasons = embed_images(paths, encoder=encoder, attrs=attrs, device=device, batch_size=batch_size)
        per_encoder.append(features)
        failed.update({row: reason for row, reason in reasons.items() if row not in failed})
    scored = [row for row in range(len(paths)) if row not in failed and all(row in f for f in per_encoder)]
    n_classes = len(checkpoint["classes"])
    probabilities = np.zeros((0, n_classes), np.float32)
    if scored:
        features = torch.stack([torch.cat([f[row] for f in per_encoder]) for row in scored])
        features = (features - checkpoint["feature_mean"].cpu()) / checkpoint["feature_std"].cpu()
        probabilities = predict_proba(head, features.to(device))
    frame = pd.DataFrame(probabilities, columns=[f"prob_{c}" for c in checkpoint["classes"]])
    frame.insert(0, "path", [printable(paths[row]) for row in scored])
    frame.insert(0, "image_id", [printable(paths[row].name) for row in scored])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False, float_format="%.6f")
    print(f"scored {len(scored)} images ({len(failed)} failed) with {run_dir}; wrote {out}")
    return [(paths[row], reason) for row, reason in sorted(failed.items())]


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
