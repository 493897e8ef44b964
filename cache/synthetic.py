"""A feature cache with a known answer, for tests and benchmarks of the heads and the search.

Each feature is standard normal noise, except that feature c of a row is shifted by
`separation` when the row has class c. A score equal to that feature then has AUC
Phi(separation / sqrt(2)) for class c: the best any head can do.

    python -m cache.synthetic outputs/cache/synthetic_nih_scale.h5   # 78k/8.5k/25.6k rows, 2048-d
"""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from cache.schema import CLASSES as CLASS_NAMES
from cache.store import PartWriter, create_cache, exclusive_lock, merge_parts, read_attrs

NIH_SCALE = {"train": 78_146, "val": 8_378, "test": 25_596}  # the official split, val fraction 0.1


def known_auc(separation: float) -> float:
    return 0.5 * (1 + math.erf(separation / 2))  # Phi(s / sqrt 2)


def write_synthetic_cache(path, *, rows: dict, dim: int = 2048, separation: float = 1.19,
                          prevalence: float = 0.15, images_per_patient: int = 3, seed: int = 0,
                          feature_dtype: str = "float16", block_rows: int = 16384) -> dict:
    """Write a finished cache; returns its row table. Patients never span two splits."""
    rng = np.random.default_rng(seed)
    split = np.concatenate([np.full(n, name, dtype=object) for name, n in rows.items()])
    n_rows, n_classes = len(split), len(CLASS_NAMES)
    first_patient = np.cumsum([0] + [n // images_per_patient + 1 for n in rows.values()])[:-1]
    patient = np.concatenate([start + np.arange(n) // images_per_patient
                              for start, n in zip(first_patient, rows.values())])
    labels = (rng.random((n_rows, n_classes)) < prevalence).astype(np.uint8)
    table = {"image_id": [f"{i:08d}_000.png" for i in range(n_rows)], "patient_id": patient,
             "labels": labels, "split": split}
    attrs = {"classes": list(CLASS_NAMES), "backbone": "synthetic-gaussian", "weights": f"separation={separation}",
             "weights_sha256": "", "image_size": 0, "precision": "fp32", "preprocessing": {"none": True},
             "val_fraction": 0.0, "split_seed": seed, "split_source": "synthetic", "source_csv": "",
             "source_csv_sha256": "", "split_lists_sha256": ""}
    create_cache(path, table=table, feature_dim=dim, feature_dtype=feature_dtype, attrs=attrs)
    writer = PartWriter(path, fingerprint=read_attrs(path)["fingerprint"])
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        signal = min(dim, n_classes)
        block[:, :signal] += separation * labels[start:stop, :signal]
        writer.write(rows=np.arange(start, stop), features=block.astype(feature_dtype))
    with exclusive_lock(path):
        merge_parts(path)
    return table


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
