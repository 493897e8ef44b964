"""RSNA Pneumonia Detection Challenge (Kaggle, stage 2): stage_2_train_labels.csv and
stage_2_train_images/PATIENTID.dcm.

Choices: one class, Pneumonia, from Target (1 = the image has at least one box of lung
opacity suggesting pneumonia). A positive image has one row per box: its rows must agree on
Target, and count once. Each patientId is one image (the challenge's own design). No official
test labels: seeded split. Views, sex and age are in the DICOM headers only:
missing here, read by extract as it creates the cache (datasets.add_header_metadata).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from extract.datasets import register
from extract.datasets.table import DatasetError, Options, file_sha256, find_file, make_rows, read_csv, seeded_split

CLASSES = ("Pneumonia",)
CSV_NAME, IMAGE_FOLDER = "stage_2_train_labels.csv", "stage_2_train_images"


@register("rsna", expects=f"{CSV_NAME}, {IMAGE_FOLDER}/*.dcm", markers=(CSV_NAME,), has_views=False,
          header_metadata=True,
          download="https://www.kaggle.com/c/rsna-pneumonia-detection-challenge")
def read(data_dir: Path, options: Options) -> tuple[dict, dict]:
    csv_path = find_file(data_dir, (CSV_NAME,), dataset="RSNA Pneumonia")
    frame = read_csv(csv_path, columns=("patientId", "Target"), dataset="RSNA Pneumonia")
    bad = ~frame["Target"].isin(["0", "1"])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DatasetError(f"{csv_path} line {row + 2} column 'Target': {frame['Target'].iloc[row]!r} is not 0 or 1")
    disagree = frame.groupby("patientId")["Target"].transform("nunique") > 1
    if disagree.any():
        row = int(np.flatnonzero(disagree.to_numpy())[0])
        raise DatasetError(f"{csv_path} line {row + 2} column 'Target': patientId {frame['patientId'].iloc[row]} "
                           f"has rows with Target 0 and 1")
    per_image = frame.drop_duplicates("patientId").reset_index(drop=True)
    image_ids = per_image["patientId"].to_numpy(dtype=object)
    rows = make_rows(image_id=image_ids, path=[f"{IMAGE_FOLDER}/{i}.dcm" for i in image_ids], patient_id=image_ids,
                     split=seeded_split(image_ids, val_fraction=options.val_fraction,
                                        test_fraction=options.test_fraction, seed=options.seed),
                     labels=per_image["Target"].astype(np.uint8).to_numpy()[:, None])
    provenance = {"classes": list(CLASSES), "views": "no view metadata", "source_csv": csv_path.name,
                  "source_csv_sha256": file_sha256(csv_path),
                  "split_source": f"random patient-wise (test {options.test_fraction})",
                  "val_fraction": float(options.val_fraction), "split_seed": int(options.seed)}
    return rows, provenance
