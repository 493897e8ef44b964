"""VinDr-CXR: the PhysioNet release (annotations/image_labels_train.csv and _test.csv,
train/*.dicom, test/*.dicom) or the Kaggle VinBigData form (train.csv, one row per
radiologist finding and box, train/*.dicom).

Choices (documented in docs/datasets.md):
- Each training image was read by 3 radiologists. --raters majority (default): a finding is
  positive when more than half of the image's distinct radiologists marked it; any: when one
  did. Kaggle's several box rows per radiologist and finding count once (distinct rad_id).
  The PhysioNet test labels are the consensus of 5 and are used as they are.
- Every finding is annotated for every image (a finding not marked is 0): no unknowns.
- No patient ids are published: each image is its own patient (so a patient-wise split is
  an image-wise one, and two images of one person may fall in different splits).
- Splits: PhysioNet's train/test, val seeded from train; Kaggle: seeded train/val/test.
- Views, sex and age are only in the DICOM headers: this reader leaves them missing, and
  extract reads them from the headers as it creates the cache (datasets.add_header_metadata).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cache.schema import TEST
from extract.datasets import register
from extract.datasets.table import (DatasetError, Options, file_sha256, find_file, make_rows, read_csv,
                                    seeded_split)

PHYSIONET_TRAIN, PHYSIONET_TEST = "annotations/image_labels_train.csv", "annotations/image_labels_test.csv"
KAGGLE_TRAIN = "train.csv"
KAGGLE_COLUMNS = ("image_id", "class_name", "rad_id")


def _positive(votes: pd.DataFrame, raters: str) -> pd.DataFrame:
    """votes: one row per (image, radiologist) with 0/1 columns; the image's label per finding."""
    grouped = votes.groupby("image_id", sort=True)
    if raters == "any":
        return (grouped.max() > 0).astype(np.uint8)
    return (grouped.sum() * 2 > grouped.size().to_numpy()[:, None]).astype(np.uint8)


def _kaggle_votes(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (image, radiologist) and a 0/1 column per class_name, from the box rows."""
    marks = frame[["image_id", "rad_id", "class_name"]].drop_duplicates()
    # groupby-size rather than pd.crosstab: the same table, without crosstab's per-group Python aggregation
    votes = marks.groupby(["image_id", "rad_id", "class_name"]).size().unstack(fill_value=0).clip(upper=1)
    return votes.reset_index(level="rad_id", drop=True).reset_index()


def _physionet_frame(path, *, raters: str, dataset: str = "VinDr-CXR") -> tuple[pd.DataFrame, list]:
    frame = read_csv(path, columns=("image_id",), dataset=dataset)
    classes = [c for c in frame.columns if c not in ("image_id", "rad_id")]
    values = frame[classes]
    bad = ~values.isin(["0", "1", "0.0", "1.0"])
    if bad.to_numpy().any():
        row, column = (int(i[0]) for i in np.nonzero(bad.to_numpy()))
        raise DatasetError(f"{path} line {row + 2} column {classes[column]!r}: value {values.iat[row, column]!r} "
                           f"is not 0 or 1")
    votes = values.astype(float).astype(np.uint8)
    votes.insert(0, "image_id", frame["image_id"])
    if "rad_id" not in frame.columns:
        _check_unique(frame, path)
    return _positive(votes, raters), classes


def _check_unique(frame: pd.DataFrame, path) -> None:
    duplicated = frame["image_id"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DatasetError(f"{path} line {row + 2} column 'image_id': {frame['image_id'].iloc[row]!r} appears twice")


@register("vindr", expects=f"{PHYSIONET_TRAIN}, {PHYSIONET_TEST}, train/*.dicom, test/*.dicom (PhysioNet) or "
                           f"{KAGGLE_TRAIN} and train/*.dicom (Kaggle VinBigData)",
          markers=(PHYSIONET_TRAIN,), options=("raters",), has_views=False, header_metadata=True,
          download="https://physionet.org/content/vindr-cxr/ (or the Kaggle VinBigData competition)")
def read(data_dir: Path, options: Options) -> tuple[dict, dict]:
    raters = options.raters or "majority"
    if (data_dir / PHYSIONET_TRAIN).is_file():
        train_path = data_dir / PHYSIONET_TRAIN
        test_path = find_file(data_dir, (PHYSIONET_TEST,), dataset="VinDr-CXR (PhysioNet)")
        train, classes = _physionet_frame(train_path, raters=raters)
        test, test_classes = _physionet_frame(test_path, raters=raters)
        if test_classes != classes:
            raise DatasetError(f"{test_path}: its label columns differ from {train_path.name}'s")
        in_both = test.index.isin(train.index)
        if in_both.any():
            raise DatasetError(f"{test_path} line {int(np.flatnonzero(in_both)[0]) + 2} column 'image_id': "
                               f"{test.index[in_both][0]} is also in {train_path.name}")
        labels = pd.concat([train, test])
        fixed = np.array([""] * len(train) + [TEST] * len(test), dtype=object)
        folders = ["train"] * len(train) + ["test"] * len(test)
        sources, split_source, test_fraction = (train_path, test_path), "official train/test; val by image", 0
    else:
        kaggle_path = find_file(data_dir, (KAGGLE_TRAIN, PHYSIONET_TRAIN), dataset="VinDr-CXR")
        frame = read_csv(kaggle_path, columns=KAGGLE_COLUMNS, dataset="VinBigData")
        labels = _positive(_kaggle_votes(frame), raters)
        classes = _kaggle_classes(frame, list(labels.columns))
        labels = labels[classes]
        fixed, folders = None, ["train"] * len(labels)
        sources, split_source = (kaggle_path,), f"random by image (test {options.test_fraction})"
        test_fraction = options.test_fraction
    image_ids = labels.index.to_numpy(dtype=object)
    split = seeded_split(image_ids, val_fraction=options.val_fraction, test_fraction=test_fraction,
                         seed=options.seed, fixed=fixed)
    rows = make_rows(image_id=image_ids, path=[f"{folder}/{i}.dicom" for folder, i in zip(folders, image_ids)],
                     patient_id=image_ids, split=split, labels=labels[classes].to_numpy(np.uint8))
    provenance = {"classes": classes, "raters": raters, "views": "no view metadata", "source_csv": ",".join(p.name for p in sources),
                  "source_csv_sha256": file_sha256(*sources), "split_source": split_source,
                  "val_fraction": float(options.val_fraction), "split_seed": int(options.seed),
                  "patients": "none published: one patient per image"}
    return rows, provenance


def _kaggle_classes(frame: pd.DataFrame, present: list) -> list:
    """class names in class_id order where the file has class_id, else alphabetical."""
    if "class_id" not in frame.columns:
        return sorted(present)
    ids = frame.drop_duplicates("class_name").set_index("class_name")["class_id"]
    return sorted(present, key=lambda name: (pd.to_numeric(ids.get(name), errors="coerce"), name))
