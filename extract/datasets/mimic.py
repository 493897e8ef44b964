"""MIMIC-CXR-JPG (2.0.0 / 2.1.0): the CheXpert-labeller labels per study, the official split
and the DICOM metadata, images as files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg.

Choices: the labels of a study are given to each of its images; an image whose study has no
label row is unknown for every class. Splits are the official ones (validate -> val). The
uncertain and blank rules are CheXpert's (see extract/datasets/chexpert.py). Views are the
metadata's ViewPosition (PA, AP, LATERAL, LL, ...; blank = not recorded). MIMIC-CXR publishes
no age or sex in these files (they are in MIMIC-IV's patients table): missing here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cache.schema import UNKNOWN
from extract.datasets import register
from extract.datasets.chexpert import CLASSES, chexpert_labels
from extract.datasets.table import (FRONTAL, DatasetError, Options, file_sha256, find_file, make_rows, read_csv,
                                    select)

PREFIX = "mimic-cxr-2.0.0-"
OFFICIAL_SPLITS = {"train": "train", "validate": "val", "test": "test"}


def _find(data_dir: Path, kind: str) -> Path:
    return find_file(data_dir, (f"{PREFIX}{kind}.csv", f"{PREFIX}{kind}.csv.gz"), dataset="MIMIC-CXR-JPG",
                     hint="they come with MIMIC-CXR-JPG on PhysioNet")


@register("mimic", expects=f"{PREFIX}chexpert.csv(.gz), {PREFIX}split.csv(.gz), {PREFIX}metadata.csv(.gz), "
                           "files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg",
          markers=(f"{PREFIX}*.csv*",), options=("views", "uncertain"),
          download="https://physionet.org/content/mimic-cxr-jpg/")
def read(data_dir: Path, options: Options) -> tuple[dict, dict]:
    uncertain = options.uncertain or "mask"
    views = options.views or FRONTAL
    paths = {kind: _find(data_dir, kind) for kind in ("chexpert", "split", "metadata")}
    labels_frame = read_csv(paths["chexpert"], columns=("subject_id", "study_id", *CLASSES), dataset="MIMIC-CXR-JPG")
    split_frame = read_csv(paths["split"], columns=("dicom_id", "study_id", "subject_id", "split"), dataset="MIMIC-CXR-JPG")
    meta = read_csv(paths["metadata"], columns=("dicom_id", "subject_id", "study_id", "ViewPosition"),
                    dataset="MIMIC-CXR-JPG")
    _check_split_file(split_frame, paths["split"])
    for frame, path, key in ((split_frame, paths["split"], "dicom_id"), (meta, paths["metadata"], "dicom_id"),
                             (labels_frame, paths["chexpert"], "study_id")):
        duplicated = frame[key].duplicated()
        if duplicated.any():
            row = int(np.flatnonzero(duplicated.to_numpy())[0])
            raise DatasetError(f"{path} line {row + 2} column {key!r}: {frame[key].iloc[row]!r} appears twice")
    table = meta.merge(split_frame[["dicom_id", "split"]], on="dicom_id", how="inner", validate="one_to_one")
    study_labels = chexpert_labels(labels_frame, path=paths["chexpert"], uncertain=uncertain)
    index = pd.Series(np.arange(len(labels_frame)), index=labels_frame["study_id"])
    position = table["study_id"].map(index)
    labels = np.full((len(table), len(CLASSES)), UNKNOWN, dtype=np.uint8)
    known = position.notna().to_numpy()
    labels[known] = study_labels[position[known].astype(int).to_numpy()]
    subject = table["subject_id"]
    relative = ("files/p" + subject.str[:2] + "/p" + subject + "/s" + table["study_id"] + "/" + table["dicom_id"] + ".jpg")
    rows = make_rows(image_id=table["dicom_id"], path=relative, patient_id=subject.to_numpy(dtype=object),
                     split=table["split"].map(OFFICIAL_SPLITS).to_numpy(dtype=object), labels=labels,
                     view=table["ViewPosition"].str.upper().to_numpy(dtype=object),
                     study_id=table["study_id"].to_numpy(dtype=object))
    rows = select(rows, np.isin(rows["view"], views))
    provenance = {"classes": list(CLASSES), "uncertain": uncertain, "views": list(views),
                  "source_csv": ",".join(p.name for p in paths.values()),
                  "source_csv_sha256": file_sha256(*paths.values()), "split_source": "official split file",
                  # every cache records these (fingerprinted); the official file leaves them unused
                  "val_fraction": 0.0, "split_seed": 0,
                  "images_without_study_labels": int((~known).sum())}
    return rows, provenance


def _check_split_file(frame: pd.DataFrame, path) -> None:
    bad = ~frame["split"].isin(list(OFFICIAL_SPLITS))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DatasetError(f"{path} line {row + 2} column 'split': {frame['split'].iloc[row]!r} is not train, "
                           f"validate or test")
    per_subject = frame.groupby("subject_id")["split"].nunique()
    if (per_subject > 1).any():
        subject = per_subject.index[per_subject > 1][0]
        row = int(np.flatnonzero(((frame["subject_id"] == subject)
                                  & (frame["split"] != frame["split"][frame["subject_id"] == subject].iloc[0])).to_numpy())[0])
        raise DatasetError(f"{path} line {row + 2} column 'split': subject {subject} is in two official splits")
