"""`python -m cache info|verify PATH`: what a cache holds, and whether it is sound."""
from __future__ import annotations

import json

import h5py
import numpy as np

from cache import vocabulary
from cache.schema import SPLITS, TEST, TRAIN, UNKNOWN, VAL
from cache.store import (
    METADATA, METADATA_DATASETS, READABLE_VERSIONS, ROW_DATASETS, CacheError, compute_fingerprint,
    fingerprint_keys, no_metadata_reason, open_cache, pending_part_rows, read_attrs, read_metadata, read_table,
)


def describe(path) -> str:
    """Schema, provenance and per-split / per-class counts, as printable text."""
    attrs = read_attrs(path)
    classes_problem = _classes_problem(attrs["classes"])
    if classes_problem:
        raise CacheError(f"{path}: {classes_problem}; run `python -m cache verify {path}` for the full report")
    table = read_table(path)
    lines = [f"cache {path}", "", "datasets:"]
    with open_cache(path) as f:
        for name in (*ROW_DATASETS, "features"):
            shape, dtype = (f[name].shape, f[name].dtype) if name in f else ("missing", "")
            lines.append(f"  {name:<11} {str(shape):<16} {dtype}")
    lines += ["", "provenance:"]
    for key in sorted(attrs):
        value = attrs[key]
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        lines.append(f"  {key:<19} {value}")
    lines += ["", _split_counts(table), "", _class_counts(table, attrs["classes"]), "", _metadata_counts(path)]
    lines += ["", f"shared label vocabulary ({attrs.get('dataset', 'nih')}'s names -> shared names, cache/vocabulary.py):"]
    lines += [f"  {line}" for line in vocabulary.describe(attrs.get("dataset", "nih"), attrs["classes"])]
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
    unknown = table["labels"] == UNKNOWN
    width = max([19, *(len(name) for name in classes)])
    lines = [f"{'positives':<{width}} {'train':>7} {'val':>7} {'test':>7}" + ("   unknown" if unknown.any() else "")]
    for index, name in enumerate(classes):
        counts = [int((table["labels"][table["split"] == s, index] == 1).sum()) for s in SPLITS]
        lines.append(f"{name:<{width}} " + " ".join(f"{c:>7}" for c in counts)
                     + (f" {int(unknown[:, index].sum()):>9}" if unknown.any() else ""))
    normal = (table["labels"] == 0).all(axis=1)
    lines.append(f"{'(no finding)':<{width}} " + " ".join(
        f"{int((normal & (table['split'] == s)).sum()):>7}" for s in SPLITS))
    return "\n".join(lines)


def _metadata_counts(path) -> str:
    """The metadata group's columns, how many rows miss each, and their commonest values."""
    metadata = read_metadata(path)
    if metadata is None:
        return f"metadata: none ({no_metadata_reason(path)})"
    n_rows = len(metadata["age"])
    lines = [f"{'metadata':<12} {'missing':>7}  values   ({METADATA}/, {n_rows} rows; missing = \"\" or NaN)"]
    for name in METADATA_DATASETS:
        values = metadata[name]
        if name == "age":
            known = values[~np.isnan(values)]
            missing, seen = n_rows - len(known), (f"{known.min():g} to {known.max():g} years" if len(known) else "")
        else:
            missing = int((values == "").sum())
            names, counts = np.unique(values[values != ""], return_counts=True)
            order = np.argsort(-counts, kind="stable")[:4]
            seen = ", ".join(f"{names[i]} {counts[i]}" for i in order) + (", ..." if len(names) > 4 else "")
        lines.append(f"  {name:<10} {missing:>7}  {seen}")
    return "\n".join(lines)


def check_readable(path) -> None:
    """The cheap structural checks of `verify`, run by every reader before it trusts a cache:
    known schema_version, every dataset and attribute present, fingerprint, every row dataset
    and `features` with N rows and the right width, labels only 0/1 (and UNKNOWN in version 2),
    split names, patient-disjoint splits. Reads the row table, never `features` (well under a
    second at NIH scale). Raises CacheError, one line naming the first problem and `python -m
    cache verify`. The finite-features scan is left to the reader, on the rows it uses.
    Unknown labels (UNKNOWN) are sound: every reader leaves them out of what it computes."""
    problems = structural_problems(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CacheError(f"{path}: {problems[0]}{more}; run `python -m cache verify {path}` for the full report")


def find_problems(path, *, block_rows: int = 8192, scan_features: bool = True) -> list[str]:
    """Every integrity problem found; an empty list means the cache is sound."""
    try:
        problems = structural_problems(path)
    except CacheError as err:
        return [str(err)]
    try:
        pending_part_rows(path)  # a damaged part file would stop the next extract
    except CacheError as err:
        problems.append(str(err))
    if not problems:  # a group with a dataset missing or cut short is already reported
        problems += _metadata_problems(path)
    if not scan_features:
        return problems
    try:
        done, dim = read_table(path)["done"], read_attrs(path)["feature_dim"]
    except CacheError:  # already reported as a missing dataset or attribute
        return problems
    return problems + _feature_problems(path, done, dim, block_rows)


def _metadata_problems(path) -> list[str]:
    """Values outside the metadata contract: a sex other than "M"/"F"/"", an infinite age
    (missing is NaN; which ages are plausible is each reader's documented rule). Left to
    `verify`: readers need not decode the strings."""
    metadata = read_metadata(path)
    if metadata is None:
        return []
    problems = []
    odd_sex = sorted(set(metadata["sex"]) - {"M", "F", ""})
    if odd_sex:
        problems.append(f"metadata/sex holds values other than M/F/\"\": {odd_sex[:5]}")
    if np.isinf(metadata["age"]).any():
        problems.append(f"metadata/age holds {int(np.isinf(metadata['age']).sum())} infinite values; missing is NaN")
    return problems


def structural_problems(path) -> list[str]:
    """Problems found without reading `features`; CacheError if `path` is no cache at all."""
    with open_cache(path) as f:
        missing_data = [name for name in (*ROW_DATASETS, "features") if name not in f]
        version = f.attrs.get("schema_version")
        has_metadata = METADATA in f  # required in version 2; optional (caches made before it) in version 1
        if version == 2 or has_metadata:
            missing_data += [f"{METADATA}/{name}" for name in METADATA_DATASETS
                             if not has_metadata or name not in f[METADATA]]
        missing_attrs = [key for key in (*fingerprint_keys(version), "fingerprint") if key not in f.attrs]
        if missing_data or missing_attrs:
            return [f"{kind} missing: {names}" for kind, names in
                    (("datasets", missing_data), ("attributes", missing_attrs)) if names]
        shapes = {name: f[name].shape for name in (*ROW_DATASETS, "features")}
        if has_metadata:
            shapes.update({f"{METADATA}/{name}": f[METADATA][name].shape for name in METADATA_DATASETS})
        feature_dtype = str(f["features"].dtype)
    attrs = read_attrs(path)
    if attrs["schema_version"] not in READABLE_VERSIONS:  # the other checks assume a known layout
        return [f"schema_version {attrs['schema_version']!r} is not one this kit reads (it reads "
                f"{', '.join(map(str, READABLE_VERSIONS))})"]
    classes_problem = _classes_problem(attrs["classes"])
    if classes_problem:  # the label checks below count on it
        return [classes_problem]
    problems = []
    if compute_fingerprint(attrs) != attrs["fingerprint"]:
        problems.append("fingerprint does not match the stored settings (attributes were edited)")
    shape_problems = _shape_problems(shapes, attrs, feature_dtype)
    if shape_problems:  # the row table cannot be read row by row
        return problems + shape_problems
    # Strings stay undecoded bytes and `error` is not read: reading the variable-length
    # strings is most of the check's time (about 0.13 s per column at NIH scale).
    with open_cache(path) as f:
        image_ids, split, labels = f["image_id"][()], f["split"][()], np.unique(f["labels"][()])
        patients = f["patient_id"][()]
    allowed = (0, 1, UNKNOWN) if attrs["schema_version"] == 2 else (0, 1)
    if not np.isin(labels, allowed).all():
        problems.append(f"labels hold values other than {'/'.join(map(str, allowed))}: "
                        f"{[v.item() for v in labels[~np.isin(labels, allowed)][:5]]}")
    if len(set(image_ids.tolist())) != len(image_ids):
        problems.append("image_id values are not unique")
    names = {raw: raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else str(raw)
             for raw in set(split.tolist())}
    bad_splits = sorted(set(names.values()) - set(SPLITS))
    if bad_splits:
        problems.append(f"unknown split names {bad_splits[:5]} (known: {list(SPLITS)})")
    in_split = {name: np.zeros(len(split), bool) for name in SPLITS}
    for raw, name in names.items():
        if name in in_split:
            in_split[name] |= split == raw
    return problems + _patient_overlaps(patients, in_split)


def _classes_problem(classes) -> str | None:
    """The `classes` attribute must name each label column once, as text."""
    if not isinstance(classes, list) or not classes or not all(isinstance(name, str) and name for name in classes):
        return f"attribute classes is {str(classes)[:60]!r}, not a list of class names"
    unprintable = [name for name in classes if not name.isprintable()]
    if unprintable:
        return f"attribute classes holds a name with control characters: {unprintable[0][:60]!r}"
    if len(set(classes)) < len(classes):
        return f"attribute classes names a class twice: {sorted({c for c in classes if classes.count(c) > 1})}"
    return None


def _shape_problems(shapes: dict, attrs: dict, feature_dtype: str) -> list[str]:
    n_rows = shapes["image_id"][0] if len(shapes["image_id"]) == 1 else -1
    expected = {name: (n_rows,) for name in shapes}
    expected.update(labels=(n_rows, len(attrs["classes"])), features=(n_rows, attrs["feature_dim"]))
    problems = [f"{name} has shape {shapes[name]}, expected {expected[name]} (image_id has {n_rows} rows)"
                for name in shapes if shapes[name] != expected[name]]
    if feature_dtype != attrs["feature_dtype"]:
        problems.append(f"features are stored as {feature_dtype}, the attributes say {attrs['feature_dtype']}")
    return problems


def _patient_overlaps(patient_ids: np.ndarray, in_split: dict) -> list[str]:
    problems = []
    patients = {s: np.unique(patient_ids[in_split[s]]) for s in SPLITS}
    for a, b in ((TRAIN, VAL), (TRAIN, TEST), (VAL, TEST)):
        shared = np.intersect1d(patients[a], patients[b], assume_unique=True)
        if len(shared):
            examples = [p.decode() if isinstance(p, bytes) else p.item() if isinstance(p, np.generic) else p
                        for p in shared[:3]]
            problems.append(f"{len(shared)} patients are in both {a} and {b} (e.g. {examples})")
    return problems


def _feature_problems(path, done, dim, block_rows) -> list[str]:
    with h5py.File(path, "r") as f:
        if "features" not in f or f["features"].shape != (len(done), dim):  # reported as structural
            return []
        features = f["features"]
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
