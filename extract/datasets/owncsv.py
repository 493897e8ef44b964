"""A user's own data: --labels-csv FILE with columns `path` (relative to --data-dir),
`patient_id`, an optional `split` (train/val/test) and one column per label holding 1, 0, -1
or blank. Optional metadata columns: sex (M/F), age (years), view, study_id.

Choices: -1 follows --uncertain; blank is unknown under mask, 0 under zeros/ones (as for
CheXpert). The image id is the path. Without a split column the split is seeded by patient.
A view column is used only when --views is given (a user's spellings are their own).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cache.schema import SPLITS
from extract.datasets import register
from extract.datasets.table import (DatasetError, Options, check_relative_path, file_sha256, header_names, make_rows, read_csv,
                                    seeded_split, select, ternary_labels)

REQUIRED = ("path", "patient_id")
METADATA = ("split", "sex", "age", "view", "study_id", "image_id")


@register("csv", expects="--labels-csv FILE (columns path, patient_id, optional split, one column per label "
                         "with 1/0/-1/blank) and the images at the paths it names, relative to --data-dir",
          options=("views", "uncertain", "labels_csv"))
def read(data_dir: Path, options: Options) -> tuple[dict, dict]:
    if not options.labels_csv:
        raise DatasetError("--dataset csv needs --labels-csv FILE (columns path, patient_id, optional split, "
                           "and one column per label)")
    csv_path = Path(options.labels_csv)
    if not csv_path.is_file():
        raise DatasetError(f"--labels-csv {csv_path}: no such file")
    uncertain = options.uncertain or "mask"
    frame = read_csv(csv_path, columns=REQUIRED, dataset="own labels")
    _check_header(csv_path)
    classes = [c for c in frame.columns if c not in REQUIRED + METADATA]
    if not classes:
        raise DatasetError(f"{csv_path}: no label columns besides {', '.join(REQUIRED + METADATA)}")
    _check_rows(frame, csv_path)
    labels = ternary_labels(frame, classes, path=csv_path, uncertain=uncertain,
                            blank=255 if uncertain == "mask" else 0)
    split, split_source = _split(frame, csv_path, options)
    metadata = {"sex": frame["sex"].str.upper().where(frame["sex"].str.upper().isin(["M", "F"]), "")
                if "sex" in frame.columns else None,
                "age": pd.to_numeric(frame["age"], errors="coerce").to_numpy(np.float32) if "age" in frame.columns else None,
                "view": frame["view"].str.upper() if "view" in frame.columns else None,
                "study_id": frame["study_id"] if "study_id" in frame.columns else None}
    rows = make_rows(image_id=frame["path"], path=frame["path"], patient_id=frame["patient_id"].to_numpy(dtype=object),
                     split=split, labels=labels, **{k: v for k, v in metadata.items() if v is not None})
    provenance = {"classes": classes, "uncertain": uncertain, "views": "all rows",
                  "source_csv": csv_path.name, "source_csv_sha256": file_sha256(csv_path),
                  "split_source": split_source, "val_fraction": float(options.val_fraction),
                  "split_seed": int(options.seed)}
    if options.views is not None:
        if "view" not in frame.columns:
            raise DatasetError(f"--views needs a 'view' column in {csv_path}")
        rows = select(rows, np.isin(rows["view"], options.views))
        provenance["views"] = list(options.views)
    return rows, provenance


def _check_header(path: Path) -> None:
    """A label's name becomes a column of every table and a title of every figure, so it must
    be there and printable, without the | or ` that would break a markdown table."""
    for position, name in enumerate(header_names(path), start=1):
        if not name:
            raise DatasetError(f"{path} line 1: column {position} has no name; name it (a label) or remove it")
        if any(c in name for c in "|`") or not name.isprintable():
            raise DatasetError(f"{path} line 1: column {position} is named {name!r}; a label's name may not hold "
                               f"| or ` or control characters: rename it")


def _check_rows(frame: pd.DataFrame, path) -> None:
    for row, (image_path, patient) in enumerate(zip(frame["path"], frame["patient_id"])):
        check_relative_path(image_path, where=f"{path} line {row + 2} column 'path'")
        if not patient:
            raise DatasetError(f"{path} line {row + 2} column 'patient_id': blank")
    duplicated = frame["path"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DatasetError(f"{path} line {row + 2} column 'path': {frame['path'].iloc[row]!r} appears twice")


def _split(frame: pd.DataFrame, path, options: Options) -> tuple[np.ndarray, str]:
    if "split" not in frame.columns:
        split = seeded_split(frame["patient_id"], val_fraction=options.val_fraction,
                             test_fraction=options.test_fraction, seed=options.seed)
        return split, f"random patient-wise (test {options.test_fraction})"
    split = frame["split"].str.lower()
    bad = ~split.isin(SPLITS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DatasetError(f"{path} line {row + 2} column 'split': {frame['split'].iloc[row]!r} is not train, val or test")
    first = split.groupby(frame["patient_id"]).transform("first")
    crossing = split != first
    if crossing.any():
        row = int(np.flatnonzero(crossing.to_numpy())[0])
        raise DatasetError(f"{path} line {row + 2} column 'split': patient {frame['patient_id'].iloc[row]} is "
                           f"in both {first.iloc[row]} and {split.iloc[row]}")
    return split.to_numpy(dtype=object), "given in the CSV"
