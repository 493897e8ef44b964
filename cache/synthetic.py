"""A feature cache with a known answer, for tests and benchmarks of the heads and the search.

Each feature is standard normal noise, except that feature c of a row is shifted by
`separation` when the row has class c. A score equal to that feature then has AUC
Phi(separation / sqrt(2)) for class c: the best any head can do. `separation` may be one value
per class, and `signal_offset` moves class c's signal to feature c + offset: two caches with
different offsets are two "hospitals" where a head trained on one sees only noise on the other.

Given a `dataset` name the cache is version 2, as a non-NIH reader writes it: `unknown` is the
share of labels set to UNKNOWN (255) at random, and the metadata group holds random sex, age and
view.

    python -m cache.synthetic outputs/cache/synthetic_nih_scale.h5   # 78k/8.5k/25.6k rows, 2048-d
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from cache.schema import CLASSES as CLASS_NAMES
from cache.schema import UNKNOWN
from cache.store import PartWriter, create_cache, exclusive_lock, merge_parts, read_attrs

NIH_SCALE = {"train": 78_146, "val": 8_378, "test": 25_596}  # the official split, val fraction 0.1


def known_auc(separation: float) -> float:
    return 0.5 * (1 + math.erf(separation / 2))  # Phi(s / sqrt 2)


def write_synthetic_cache(path, *, rows: dict, dim: int = 2048, separation=1.19,
                          prevalence: float = 0.15, images_per_patient: int = 3, seed: int = 0,
                          feature_dtype: str = "float16", block_rows: int = 16384, classes=CLASS_NAMES,
                          dataset: str | None = None, unknown: float = 0.0, signal_offset: int = 0,
                          weights: str | None = None) -> dict:
    """Write a finished cache; returns its row table (labels as written: UNKNOWN where masked).
    Patients never span two splits. `weights` names the "encoder" (default: from the
    separation, so caches of other separations read as other encoders; caches of one encoder on
    two datasets give the same `weights`)."""
    rng = np.random.default_rng(seed)
    split = np.concatenate([np.full(n, name, dtype=object) for name, n in rows.items()])
    n_rows, n_classes = len(split), len(classes)
    first_patient = np.cumsum([0] + [n // images_per_patient + 1 for n in rows.values()])[:-1]
    patient = np.concatenate([start + np.arange(n) // images_per_patient
                              for start, n in zip(first_patient, rows.values())])
    labels = (rng.random((n_rows, n_classes)) < prevalence).astype(np.uint8)
    weights = weights or f"separation={separation}"
    separation = np.broadcast_to(np.asarray(separation, dtype=np.float32), (n_classes,))
    table = {"image_id": [f"{i:08d}_000.png" for i in range(n_rows)], "patient_id": patient,
             "labels": labels, "split": split}
    attrs = {"classes": list(classes), "backbone": "synthetic-gaussian", "weights": weights,
             "weights_sha256": "", "image_size": 0, "precision": "fp32", "preprocessing": {"none": True},
             "val_fraction": 0.0, "split_seed": seed, "split_source": "synthetic", "source_csv": "",
             "source_csv_sha256": "", "split_lists_sha256": ""}
    if dataset is not None:
        table.update(_random_metadata(rng, n_rows))
        table["labels"] = np.where(rng.random(labels.shape) < unknown, UNKNOWN, labels).astype(np.uint8)
        attrs.update(dataset=dataset, views="n/a", uncertain="n/a", raters="n/a", label_method="n/a")
    create_cache(path, table=table, feature_dim=dim, feature_dtype=feature_dtype, attrs=attrs)
    writer = PartWriter(path, fingerprint=read_attrs(path)["fingerprint"])
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        signal = min(dim - signal_offset, n_classes)
        block[:, signal_offset:signal_offset + signal] += separation[:signal] * labels[start:stop, :signal]
        writer.write(rows=np.arange(start, stop), features=block.astype(feature_dtype))
    with exclusive_lock(path):
        merge_parts(path)
    return table


def _random_metadata(rng, n_rows: int) -> dict:
    return {"sex": rng.choice(np.array(["M", "F", ""], dtype=object), n_rows, p=[0.48, 0.48, 0.04]),
            "age": np.where(rng.random(n_rows) < 0.03, np.nan, rng.uniform(1, 95, n_rows)),
            "view": rng.choice(np.array(["PA", "AP"], dtype=object), n_rows), "study_id": np.full(n_rows, "", object)}


def main(args) -> int:
    rows = NIH_SCALE if args.scale == "nih" else {"train": 3000, "val": 1000, "test": 2000}
    write_synthetic_cache(args.path, rows=rows, dim=args.dim, separation=args.separation, seed=args.seed)
    print(f"wrote {sum(rows.values())} rows x {args.dim} to {args.path}; "
          f"best possible AUC per class {known_auc(args.separation):.3f}")
    return 0


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m cache.synthetic", add_help=add_help,
                                     description="Write a synthetic feature cache with known AUCs.")
    parser.add_argument("path")
    parser.add_argument("--scale", default="nih", choices=["nih", "small"])
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--separation", type=float, default=1.19, help="class shift; AUC = Phi(s/sqrt 2)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
