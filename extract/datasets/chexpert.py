"""CheXpert (Stanford, v1.0 and v1.0-small): train.csv, valid.csv and the JPEGs their `Path`
column names.

Choices (each documented in docs/datasets.md):
- test = valid.csv (the 234 radiologist-labelled images); train.csv is split into train/val
  by patient, seeded.
- `-1` (uncertain) follows --uncertain (mask: unknown; zeros; ones). Blank (not mentioned) is
  unknown under mask and 0 under zeros/ones, as the CheXpert paper's U-Zeros/U-Ones train.
  On a row whose "No Finding" is 1 the labeller found nothing, so a blank finding there is 0
  (Support Devices excepted: "No Finding" says nothing about devices), as torchxrayvision does.
- Views: Lateral -> LATERAL; Frontal -> its AP/PA value. Frontal rows whose AP/PA reads LL or
  RL (lateral decubitus) keep that name and are not frontal views by default.
- Values may be spelled 1.0/0.0/-1.0; Age 0 is the file's placeholder for unknown.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cache.schema import TEST
from extract.datasets import register
from extract.datasets.table import (FRONTAL, DatasetError, Options, file_sha256, find_file, make_rows, read_csv,
                                    seeded_split, select, ternary_labels)

CLASSES = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
           "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
           "Fracture", "Support Devices")
NOT_IMPLIED_BY_NO_FINDING = ("No Finding", "Support Devices")
_PATIENT = r"(patient\d+)"
COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")


def read_table(path, *, uncertain: str) -> tuple[pd.DataFrame, np.ndarray]:
    """One CheXpert label CSV and its (N, C) labels."""
    frame = read_csv(path, columns=COLUMNS + CLASSES, dataset="CheXpert", only_columns=True)
    return frame, chexpert_labels(frame, path=path, uncertain=uncertain)


def chexpert_labels(frame: pd.DataFrame, *, path, uncertain: str, classes=CLASSES) -> np.ndarray:
    blank = 255 if uncertain == "mask" else 0
    labels = ternary_labels(frame, classes, path=path, uncertain=uncertain, blank=blank)
    healthy = frame["No Finding"].isin(["1", "1.0"]).to_numpy()
    for index, name in enumerate(classes):
        if name not in NOT_IMPLIED_BY_NO_FINDING:
            labels[healthy & (frame[name] == "").to_numpy(), index] = 0
    return labels


def _patients(frame: pd.DataFrame, path) -> np.ndarray:
    # pandas' extract: a Python loop of match objects is several times slower on a full train.csv
    found = frame["Path"].str.extract(_PATIENT, expand=False)
    missing = found.isna().to_numpy()
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise DatasetError(f"{path} line {row + 2} column 'Path': {frame['Path'].iloc[row]!r} names no "
                           f"patientNNNNN folder")
    return found.to_numpy(dtype=object)


def _relative_paths(paths: pd.Series, data_dir: Path) -> np.ndarray:
    """Path values name `CheXpert-v1.0-small/train/...`; relative to --data-dir when it holds
    that folder, else relative to its parent (the folder given is CheXpert-v1.0-small itself)."""
    prefix = data_dir.name + "/"
    if (data_dir / data_dir.name).is_dir():
        return paths.to_numpy(dtype=object)
    return np.array([p[len(prefix):] if p.startswith(prefix) else p for p in paths.to_numpy(dtype=object)],
                    dtype=object)


def _views(frame: pd.DataFrame) -> np.ndarray:
    lateral = frame["Frontal/Lateral"].str.upper() == "LATERAL"
    return np.where(lateral, "LATERAL", frame["AP/PA"].str.upper()).astype(object)


def _sex(column: pd.Series) -> np.ndarray:
    return column.map({"Male": "M", "Female": "F"}).fillna("").to_numpy(dtype=object)


def _check_unique(frame: pd.DataFrame, column: str, path) -> None:
    duplicated = frame[column].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DatasetError(f"{path} line {row + 2} column {column!r}: {frame[column].iloc[row]!r} appears twice")


@register("chexpert", expects="train.csv and valid.csv (CheXpert-v1.0 or -small), the JPEGs under the folder "
                              "their Path column names, relative to --data-dir or its parent",
          markers=("train.csv", "valid.csv"), options=("views", "uncertain"),
          download="https://stanfordmlgroup.github.io/competitions/chexpert/")
def read(data_dir: Path, options: Options) -> tuple[dict, dict]:
    uncertain = options.uncertain or "mask"
    views = options.views or FRONTAL
    train_path = find_file(data_dir, ("train.csv", "train.csv.gz"), dataset="CheXpert")
    valid_path = find_file(data_dir, ("valid.csv", "valid.csv.gz"), dataset="CheXpert")
    train, train_labels = read_table(train_path, uncertain=uncertain)
    valid, valid_labels = read_table(valid_path, uncertain=uncertain)
    for frame, path in ((train, train_path), (valid, valid_path)):
        _check_unique(frame, "Path", path)
        frame["patient"] = _patients(frame, path)
    in_both = valid["patient"].isin(set(train["patient"]))
    if in_both.any():
        row = int(np.flatnonzero(in_both.to_numpy())[0])
        raise DatasetError(f"{valid_path} line {row + 2} column 'Path': patient {valid['patient'].iloc[row]} "
                           f"is also in {train_path.name}; the official splits must not share a patient")
    frame = pd.concat([train, valid], ignore_index=True)
    labels = np.concatenate([train_labels, valid_labels])
    fixed = np.array([""] * len(train) + [TEST] * len(valid), dtype=object)
    split = seeded_split(frame["patient"], val_fraction=options.val_fraction, test_fraction=0, seed=options.seed,
                         fixed=fixed)
    age = pd.to_numeric(frame["Age"], errors="coerce").replace(0, np.nan)
    relative = _relative_paths(frame["Path"], data_dir)
    rows = make_rows(image_id=frame["Path"].to_numpy(dtype=object), path=relative, patient_id=frame["patient"],
                     split=split, labels=labels, sex=_sex(frame["Sex"]), age=age.to_numpy(np.float32),
                     view=_views(frame),
                     study_id=np.array([p.rpartition("/")[0] for p in relative], dtype=object))
    rows = select(rows, np.isin(rows["view"], views))
    provenance = {"classes": list(CLASSES), "uncertain": uncertain, "views": list(views),
                  "source_csv": f"{train_path.name},{valid_path.name}",
                  "source_csv_sha256": file_sha256(train_path, valid_path),
                  "split_source": "valid.csv = test; train.csv by patient",
                  "val_fraction": float(options.val_fraction), "split_seed": int(options.seed)}
    return rows, provenance
