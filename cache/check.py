"""`python -m cache info|verify PATH`: what a cache holds, and whether it is sound."""
from __future__ import annotations

import json

import h5py
import numpy as np

from cache.schema import SPLITS, TEST, TRAIN, VAL
from cache.store import (
    FINGERPRINT_KEYS, ROW_DATASETS, CacheError, compute_fingerprint, pending_part_rows,
    read_attrs, read_table,
)


def describe(path) -> str:
    """Schema, provenance and per-split / per-class counts, as printable text."""
    attrs = read_attrs(path)
    table = read_table(path)
    lines = [f"cache {path}", "", "datasets:"]
    with h5py.File(path, "r") as f:
        for name in (*ROW_DATASETS, "features"):
            ds = f[name]
            lines.append(f"  {name:<11} {str(ds.shape):<16} {ds.dtype}")
    lines += ["", "provenance:"]
    for key in sorted(attrs):
        value = attrs[key]
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        lines.append(f"  {key:<19} {value}")
    lines += ["", _split_counts(table), "", _class_counts(table, attrs["classes"])]
    pending = pending_part_rows(path)
    if pending:
        lines.append(f"\n{pending} finished rows wait in part files; rerun extract to merge them")
    return "\n".join(lines)


def _split_counts(table) -> str:
    lines = [f"{'split':<6} {'rows':>7} {'done':>7} {'failed':>7} {'patients':>9}"]
    for split in SPLITS:
        in_split = table["split"] == split
        failed = in_split & (table["error"] != "")
        lines.append(
            f"{split:<6} {in_split.sum():>7} {(in_split & table['done']).sum():>7} "
            f"{failed.sum():>7} {len(np.unique(table['patient_id'][in_split])):>9}"
        )
    return "\n".join(lines)


def _class_counts(table, classes) -> str:
    lines = [f"{'positives':<19} {'train':>7} {'val':>7} {'test':>7}"]
    for index, name in enumerate(classes):
        counts = [int(table["labels"][table["split"] == s, index].sum()) for s in SPLITS]
        lines.append(f"{name:<19} " + " ".join(f"{c:>7}" for c in counts))
    normal = (table["labels"].sum(axis=1) == 0)
    lines.append(f"{'(no finding)':<19} " + " ".join(
        f"{int((normal & (table['split'] == s)).sum()):>7}" for s in SPLITS))
    return "\n".join(lines)


def check_readable(path) -> None:
    """The cheap structural checks of `verify`, run by every reader before it trusts a cache
    (patient-disjoint splits, split names, fingerprint, shapes). Raises CacheError naming the
    first problem. The finite-features scan is left to the reader, on the rows it uses."""
    problems = find_problems(path, scan_features=False)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CacheError(f"{path}: {problems[0]}{more}; run `python -m cache verify {path}` for the full report")


def find_problems(path, *, block_rows: int = 8192, scan_features: bool = True) -> list[str]:
    """Every integrity problem found; an empty list means the cache is sound."""
    try:
        attrs = read_attrs(path)
        table = read_table(path)
    except CacheError as err:
        return [str(err)]
    problems = []
    missing = [key for key in FINGERPRINT_KEYS if key not in attrs]
    if missing:
        return [f"attributes missing: {missing}"]
    if compute_fingerprint(attrs) != attrs.get("fingerprint"):
        problems.append("fingerprint does not match the stored settings (attributes were edited)")
    n_rows = len(table["image_id"])
    n_classes, dim = len(attrs["classes"]), attrs["feature_dim"]
    if table["labels"].shape != (n_rows, n_classes):
        problems.append(f"labels shape {table['labels'].shape}, expected {(n_rows, n_classes)}")
    for name in ("patient_id", "split", "done", "error"):
        if len(table[name]) != n_rows:
            problems.append(f"{name} has {len(table[name])} rows, image_id has {n_rows}")
    if len(set(table["image_id"])) != n_rows:
        problems.append("image_id values are not unique")
    bad_splits = set(table["split"]) - set(SPLITS)
    if bad_splits:
        problems.append(f"unknown split names {sorted(bad_splits)}")
    problems += _patient_overlaps(table)
    if scan_features:
        problems += _feature_problems(path, table["done"], dim, block_rows)
    return problems


def _patient_overlaps(table) -> list[str]:
    problems = []
    patients = {s: set(table["patient_id"][table["split"] == s]) for s in SPLITS}
    for a, b in ((TRAIN, VAL), (TRAIN, TEST), (VAL, TEST)):
        shared = patients[a] & patients[b]
        if shared:
            problems.append(f"{len(shared)} patients are in both {a} and {b} (e.g. {[int(p) for p in sorted(shared)[:3]]})")
    return problems


def _feature_problems(path, done, dim, block_rows) -> list[str]:
    with h5py.File(path, "r") as f:
        features = f["features"]
        if features.shape != (len(done), dim):
            return [f"features shape {features.shape}, expected {(len(done), dim)}"]
        bad_rows = []
        for start in range(0, len(done), block_rows):
            block_done = done[start:start + block_rows]
            if not block_done.any():
                continue
            block = features[start:start + block_rows][block_done]
            bad = ~np.isfinite(block).all(axis=1)
            bad_rows += list(np.flatnonzero(block_done)[bad] + start)
    if bad_rows:
        return [f"{len(bad_rows)} done rows have NaN or infinite features (rows {[int(r) for r in bad_rows[:5]]}...)"]
    return []
