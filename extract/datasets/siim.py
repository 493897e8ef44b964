"""SIIM-ACR Pneumothorax Segmentation: train-rle.csv and the DICOMs anywhere below --data-dir.

Choices: one class, Pneumothorax: EncodedPixels `-1` = none, a run-length mask = present; a
positive image has one row per mask, and counts once. Image ids are DICOM UIDs full of dots:
the file of image X is `X.dcm` (the name is never cut at its first dot). Each image is its
own patient (the file publishes no patient id). An image of the CSV with no DICOM below the
folder is dropped and counted in the provenance (the public copies lack a few). No official
test labels: seeded split. Views, sex and age are in the DICOM headers only: missing here,
read by extract as it creates the cache (datasets.add_header_metadata).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from extract.datasets import register
from extract.datasets.table import (DatasetError, Options, file_sha256, find_file, make_rows, read_csv, scan_files,
                                    seeded_split)

CLASSES = ("Pneumothorax",)
CSV_NAMES = ("train-rle.csv", "train-rle.csv.gz")


@register("siim", expects="train-rle.csv and the .dcm files anywhere below --data-dir", markers=("train-rle.csv",),
          has_views=False, header_metadata=True, download="https://www.kaggle.com/c/siim-acr-pneumothorax-segmentation")
def read(data_dir: Path, options: Options) -> tuple[dict, dict]:
    csv_path = find_file(data_dir, CSV_NAMES, dataset="SIIM-ACR")
    frame = read_csv(csv_path, columns=("ImageId", "EncodedPixels"), dataset="SIIM-ACR")
    empty = frame["EncodedPixels"] == ""
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise DatasetError(f"{csv_path} line {row + 2} column 'EncodedPixels': blank; expected -1 or a run-length mask")
    frame["positive"] = (frame["EncodedPixels"] != "-1").astype(np.uint8)
    per_image = frame.groupby("ImageId", sort=True)["positive"].max()
    files = scan_files(data_dir, (".dcm",))
    if not files:
        raise DatasetError(f"no .dcm files below {data_dir}: expected the SIIM-ACR DICOMs (dicom-images-train/...)",
                           missing_files=True)
    found = np.array([f"{image_id}.dcm" in files for image_id in per_image.index])
    per_image = per_image[found]
    image_ids = per_image.index.to_numpy(dtype=object)
    rows = make_rows(image_id=image_ids, path=[files[f"{i}.dcm"] for i in image_ids], patient_id=image_ids,
                     split=seeded_split(image_ids, val_fraction=options.val_fraction,
                                        test_fraction=options.test_fraction, seed=options.seed),
                     labels=per_image.to_numpy(np.uint8)[:, None])
    provenance = {"classes": list(CLASSES), "views": "no view metadata", "source_csv": csv_path.name,
                  "source_csv_sha256": file_sha256(csv_path),
                  "split_source": f"random by image (test {options.test_fraction})",
                  "val_fraction": float(options.val_fraction), "split_seed": int(options.seed),
                  "images_without_dicom": int((~found).sum())}
    return rows, provenance
