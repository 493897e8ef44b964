"""The common table every dataset reader returns, the options readers take, and the checks
and parsers they share.

rows (a dict of equal-length arrays, one row per image the cache will hold):
    image_id    str      the dataset's own image identifier (unique)
    path        str      the image file relative to the data folder (never absolute, never `..`)
    patient_id  int64 or str   integers where the dataset's are (NIH), else strings
    split       str      train | val | test
    labels      (N, C) uint8   1, 0 or UNKNOWN (255) in the order of provenance["classes"]
    sex         str      "M" | "F" | "" (not published)
    age         float32  years at the study; NaN where not published
    view        str      "PA" | "AP" | "LATERAL" | the dataset's own spelling of anything else | ""
    study_id    str      the study (or follow-up) the image belongs to; "" where not published
provenance: classes, the label policy (views, uncertain, raters, label_method as they apply),
the source files and their sha256, split_source, split_seed, val_fraction.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from cache.schema import SPLITS, TEST, TRAIN, UNKNOWN, VAL

FRONTAL = ("PA", "AP")
METADATA_DEFAULTS = {"sex": "", "age": np.nan, "view": "", "study_id": ""}
MAX_AGE = 120  # years; above it an age is a typo (the NIH 2017 file has a few), recorded as missing
UNCERTAIN_POLICIES = ("mask", "zeros", "ones")
RATER_POLICIES = ("any", "majority")
LABEL_METHODS = ("physician", "all")


class DatasetError(Exception):
    """The data folder or a label file is not what the named dataset's download contains.
    `missing_files` marks a folder that lacks the dataset's files (the registry then names
    another dataset the folder looks like)."""

    def __init__(self, message: str, *, missing_files: bool = False):
        super().__init__(message)
        self.missing_files = missing_files


@dataclass(frozen=True)
class Options:
    """How to read a dataset. None means "not given": the reader's default applies, and a
    reader refuses an option it does not use only when the option was given."""
    views: tuple | None = None  # canonical view names; default FRONTAL
    uncertain: str | None = None  # mask | zeros | ones; default mask
    raters: str | None = None  # any | majority; default majority
    label_method: str | None = None  # physician | all; default physician
    labels_csv: str | None = None
    val_list: str | None = None
    random_split: bool = False
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0

    def given(self) -> dict:
        """The reader-specific options set to something other than their default."""
        specific = ("views", "uncertain", "raters", "label_method", "labels_csv", "val_list", "random_split")
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in specific and getattr(self, f.name) not in (None, False)}


def parse_views(text: str) -> tuple:
    """`--views PA,AP,LATERAL` as canonical names (upper case, no blanks)."""
    views = tuple(dict.fromkeys(part.strip().upper() for part in text.split(",") if part.strip()))
    if not views:
        raise DatasetError(f"--views {text!r} names no view; give e.g. PA,AP or PA,AP,LATERAL")
    return views


def file_sha256(*paths) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def find_file(folder, candidates, *, dataset: str, hint: str = "") -> Path:
    """The first of `candidates` (names relative to `folder`) that exists; else one line
    naming them."""
    for name in candidates:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise DatasetError(f"{folder} does not hold the {dataset} files: expected {' or '.join(candidates)}"
                       + (f" ({hint})" if hint else ""), missing_files=True)


def read_csv(path, *, columns, dataset: str, only_columns: bool = False) -> pd.DataFrame:
    """Every cell as a stripped string, blank as ""; column names stripped (real files carry
    a leading space in one); refuses a file that lacks one of `columns`. only_columns: parse
    just those (PadChest's report texts would otherwise dominate the time)."""
    wanted = set(columns)
    usecols = (lambda name: str(name).strip() in wanted) if only_columns else None
    try:
        with warnings.catch_warnings():
            # pandas only warns when a row has more cells than the header, and drops them
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False, usecols=usecols)
    except pd.errors.ParserWarning:
        raise DatasetError(f"{path} line {_first_ragged_line(path)}: more cells than the header has columns; "
                           f"is it the {dataset} CSV?") from None
    except (OSError, ValueError, pd.errors.ParserError, EOFError) as err:
        raise DatasetError(f"cannot read {path}: {str(err).splitlines()[0]}; is it the {dataset} CSV?") from None
    _check_header(path, dataset=dataset)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing column {missing[0]!r} (found {', '.join(list(frame.columns)[:8])}); "
                           f"is it the {dataset} CSV?")
    for column in columns:
        frame[column] = stripped(frame[column])
    return frame


def header_names(path) -> list[str]:
    """The names in the file's first line, stripped, as written (pandas renames a blank one
    "Unnamed: N" and a repeated one "NAME.1")."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="", errors="replace") as handle:
        return [name.strip() for name in next(csv.reader(handle), [])]


def _check_header(path, *, dataset: str) -> None:
    """Refuse a column name given twice: pandas would keep both as NAME and NAME.1, and a
    label column would enter the cache under a name the file never gave."""
    names = [name for name in header_names(path) if name]
    repeated = [name for position, name in enumerate(names) if name in names[:position]]
    if repeated:
        raise DatasetError(f"{path} line 1: column {repeated[0]!r} appears twice; each column once "
                           f"(is it the {dataset} CSV?)")


def _first_ragged_line(path) -> int | str:
    """The line of the first row whose cell count differs from the header's ("?" if none)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="", errors="replace") as handle:
        reader = csv.reader(handle)
        width = len(next(reader, []))
        for row in reader:
            if len(row) != width:
                return reader.line_num
    return "?"


def stripped(column: pd.Series) -> pd.Series:
    """The column with surrounding blanks removed; only the distinct values that need it are
    touched (pandas' per-cell .str.strip dominates reading a 200,000-row file otherwise)."""
    values = column.to_numpy(dtype=object)
    changed = {value: value.strip() for value in pd.unique(values) if value != value.strip()}
    if not changed:
        return column
    return pd.Series([changed.get(value, value) for value in values], index=column.index, dtype=object)


_TERNARY = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": None}


def ternary_labels(frame: pd.DataFrame, classes, *, path, uncertain: str, blank: int = UNKNOWN) -> np.ndarray:
    """(N, C) uint8 from columns of 1 / 0 / -1 / blank (also spelled 1.0 / 0.0 / -1.0).
    -1 (uncertain) becomes UNKNOWN, 0 or 1 by the `uncertain` policy; blank becomes `blank`."""
    meaning = {1: 1, 0: 0, -1: {"mask": UNKNOWN, "zeros": 0, "ones": 1}[uncertain], None: blank}
    labels = np.empty((len(frame), len(classes)), dtype=np.uint8)
    for index, name in enumerate(classes):
        codes, values = pd.factorize(frame[name].to_numpy(dtype=object))
        unexpected = [value for value in values if value not in _TERNARY]
        if unexpected:
            row = int(np.flatnonzero(codes == list(values).index(unexpected[0]))[0])
            raise DatasetError(f"{path} line {row + 2} column {name!r}: value {unexpected[0]!r} is not "
                               f"1, 0, -1 or blank")
        lookup = np.array([meaning[_TERNARY[value]] for value in values] or [0], dtype=np.uint8)
        labels[:, index] = lookup[codes]
    return labels


def choose_patients(patient_ids, fraction: float, seed: int) -> set:
    """A seeded `fraction` of the distinct patients."""
    unique = np.unique(np.asarray(patient_ids))
    chosen = np.random.default_rng(seed).permutation(unique)[: int(round(fraction * len(unique)))]
    return set(chosen.tolist())


def seeded_split(patient_ids, *, val_fraction: float, test_fraction: float, seed: int, fixed=None) -> np.ndarray:
    """Patient-wise train/val/test. Rows whose `fixed` entry is non-empty keep it (an
    official test set); the others are split into train/val (and test if test_fraction)."""
    patients = pd.Series(np.asarray(patient_ids))
    split = np.array(fixed if fixed is not None else [""] * len(patients), dtype=object)
    free = split == ""
    test_patients = choose_patients(patients[free], test_fraction, seed) if test_fraction else set()
    rest = free & ~patients.isin(test_patients).to_numpy()
    remaining_share = 1 - (test_fraction or 0)
    val_patients = choose_patients(patients[rest], val_fraction / remaining_share, seed + 1)
    split[free] = TRAIN
    split[free & patients.isin(val_patients).to_numpy()] = VAL
    split[free & patients.isin(test_patients).to_numpy()] = TEST
    return split


def make_rows(*, image_id, path, patient_id, split, labels, **metadata) -> dict:
    """The common table, with every metadata column present (missing = its documented value)."""
    n_rows = len(image_id)
    rows = {"image_id": np.asarray(image_id, dtype=object), "path": np.asarray(path, dtype=object),
            "patient_id": np.asarray(patient_id) if np.asarray(patient_id).dtype.kind == "i"
            else np.asarray(patient_id, dtype=object),
            "split": np.asarray(split, dtype=object), "labels": np.asarray(labels, dtype=np.uint8)}
    for name, default in METADATA_DEFAULTS.items():
        value = metadata.pop(name, None)
        if value is None:
            value = np.full(n_rows, default, dtype=np.float32 if name == "age" else object)
        rows[name] = np.asarray(value, dtype=np.float32 if name == "age" else object)
    if metadata:
        raise TypeError(f"unknown row columns {sorted(metadata)}")
    return rows


def select(rows: dict, keep) -> dict:
    keep = np.asarray(keep)
    return {key: value[keep] for key, value in rows.items()}


def check_table(rows: dict, *, data_dir, name: str) -> None:
    """The invariants of the common table; one DatasetError naming the row that breaks one."""
    n_rows = len(rows["image_id"])
    for key, value in rows.items():
        if len(value) != n_rows:
            raise DatasetError(f"{name} reader: column {key} has {len(value)} rows, image_id {n_rows}")
    labels = rows["labels"]
    if labels.dtype != np.uint8 or not np.isin(labels, [0, 1, UNKNOWN]).all():
        raise DatasetError(f"{name} reader: labels must be uint8 0, 1 or {UNKNOWN}")
    bad_split = ~np.isin(rows["split"], SPLITS)
    if bad_split.any():
        row = int(np.flatnonzero(bad_split)[0])
        raise DatasetError(f"{name}: row {rows['image_id'][row]}: split {rows['split'][row]!r} is not one of {SPLITS}")
    image_ids = pd.Series(rows["image_id"])
    duplicated = image_ids.duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DatasetError(f"{name}: image {image_ids.iloc[row]!r} appears twice (row {row + 1} of the table)")
    outside = np.flatnonzero(leaves_folder(rows["path"]))
    if len(outside):
        check_relative_path(rows["path"][outside[0]], where=f"{name} image {rows['image_id'][outside[0]]}")
    assert_patient_disjoint(rows["patient_id"], rows["split"])


def leaves_folder(paths) -> np.ndarray:
    """Per path: could it leave the data folder (check_relative_path's test, without building
    a path object per row)."""
    return np.array([_leaves(str(path).replace("\\", "/")) for path in paths], dtype=bool)


def _leaves(text: str) -> bool:
    return (not text or text.startswith("/") or text[1:2] == ":"
            or (".." in text and ".." in text.split("/")))


def check_relative_path(path: str, *, where: str) -> None:
    """Refuse a path that could leave the data folder: absolute, drive-qualified or with `..`."""
    text = str(path)
    if _leaves(text.replace("\\", "/")):
        raise DatasetError(f"{where}: image path {text!r} leaves the data folder; paths must be relative to "
                           f"--data-dir, without '..'")


def assert_patient_disjoint(patient_ids, splits) -> None:
    """Raise if any patient has images in two splits: the leak behind inflated published AUCs."""
    frame = pd.DataFrame({"patient": np.asarray(patient_ids), "split": np.asarray(splits)})
    per_patient = frame.groupby("patient", sort=False)["split"].nunique()
    if (per_patient > 1).any():
        patient = per_patient.index[int(np.flatnonzero((per_patient > 1).to_numpy())[0])]
        found = sorted(frame["split"][frame["patient"] == patient].unique(), key=list(SPLITS).index)
        raise DatasetError(f"patient {patient} is in both {found[0]} and {found[1]}: splits must be patient-wise")


def scan_files(folder, suffixes) -> dict[str, str]:
    """file name -> path relative to `folder` for files below it ending in one of `suffixes`
    (first found wins; sorted walk, so the choice is the same on every machine)."""
    folder = Path(folder)
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for file_name in sorted(files):
            if file_name.lower().endswith(suffixes) and file_name not in found:
                found[file_name] = str(PurePosixPath(Path(root).relative_to(folder), file_name))
    return found
