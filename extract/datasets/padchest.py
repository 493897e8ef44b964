"""PadChest (BIMCV, 160K release): the labels CSV and 16-bit PNGs as IMAGEDIR/IMAGEID or flat.

Choices (documented in docs/datasets.md):
- Labels are the `Labels` list, a Python literal parsed with ast.literal_eval (never eval).
  Spellings are stripped of surrounding spaces (the file has both 'pleural effusion' and
  ' pleural effusion'). Classes are every finding the file names (normal included), sorted;
  a finding not listed for an image is 0 (the reports are read exhaustively).
- Rows whose Labels cell is empty, `nan` or `['']` carry no annotation and are dropped; rows
  labelled `exclude` (the annotators excluded the image) are dropped. Both counted in the
  provenance.
- --label-method physician (default) keeps the rows a physician labelled; all also keeps the
  RNN-labelled ones.
- Views: Projection PA -> PA, AP -> AP, AP_horizontal (supine AP) -> AP, L -> LATERAL;
  COSTAL, EXCLUDE and UNK keep their own names and are not frontal.
- Images: IMAGEDIR/IMAGEID where that folder exists (the folders are not numbered
  contiguously: 0..50 and 54), else IMAGEID at the top of --data-dir.
- No official split: seeded by patient. Age = study year - birth year.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pandas as pd

from extract.datasets import register
from extract.datasets.table import (FRONTAL, DatasetError, Options, file_sha256, find_file, make_rows, read_csv,
                                    seeded_split, select)

CSV_NAMES = ("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
             "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz")
COLUMNS = ("ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
           "Projection", "MethodLabel", "Labels")
VIEWS = {"PA": "PA", "AP": "AP", "AP_HORIZONTAL": "AP", "L": "LATERAL"}
NO_ANNOTATION = ("", "nan", "[]", "['']")
EXCLUDE = "exclude"
_SIMPLE_LIST = re.compile(r"\[(?:'[^'\\]*'(?:, *'[^'\\]*')*)?\]")
_QUOTED = re.compile(r"'([^'\\]*)'")
METHODS = {"physician": ("Physician",), "all": ("Physician", "RNN_model")}


def parse_labels(cells: pd.Series, path) -> tuple[np.ndarray, list]:
    """(codes, findings): row i's findings are findings[codes[i]], a list of stripped names or
    None for a cell without annotation. Each distinct cell is parsed once."""
    codes, texts = pd.factorize(cells.to_numpy(dtype=object))
    findings = []
    for code, text in enumerate(texts):
        if text in NO_ANNOTATION:
            findings.append(None)
            continue
        if _SIMPLE_LIST.fullmatch(text):  # the common spelling, read without building a syntax tree
            value = _QUOTED.findall(text)
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                value = None
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            row = int(np.flatnonzero(codes == code)[0])
            raise DatasetError(f"{path} line {row + 2} column 'Labels': {text[:60]!r} is not a list of finding names")
        findings.append([name.strip() for name in value if name.strip()] or None)
    return codes, findings


@register("padchest", expects=f"{CSV_NAMES[0]} (or .gz), PNGs as IMAGEDIR/IMAGEID (folders 0..54) or flat",
          markers=("PADCHEST_chest_x_ray_images_labels_160K*.csv*",), options=("views", "label_method"),
          download="https://bimcv.cipf.es/bimcv-projects/padchest/")
def read(data_dir: Path, options: Options) -> tuple[dict, dict]:
    views = options.views or FRONTAL
    label_method = options.label_method or "physician"
    csv_path = find_file(data_dir, CSV_NAMES, dataset="PadChest")
    frame = read_csv(csv_path, columns=COLUMNS, dataset="PadChest", only_columns=True)
    duplicated = frame["ImageID"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise DatasetError(f"{csv_path} line {row + 2} column 'ImageID': {frame['ImageID'].iloc[row]!r} appears twice")
    codes, findings = parse_labels(frame["Labels"], csv_path)
    classes = sorted({name for names in findings if names for name in names} - {EXCLUDE})
    annotated = np.array([names is not None for names in findings], dtype=bool)[codes]
    excluded = np.array([bool(names) and EXCLUDE in names for names in findings], dtype=bool)[codes]
    by_method = frame["MethodLabel"].isin(METHODS[label_method]).to_numpy()
    keep = annotated & ~excluded & by_method
    labels = _multi_hot(findings, classes)[codes[keep]]
    frame = frame[keep].reset_index(drop=True)
    rows = make_rows(image_id=frame["ImageID"], path=_paths(frame, data_dir),
                     patient_id=frame["PatientID"].to_numpy(dtype=object),
                     split=seeded_split(frame["PatientID"], val_fraction=options.val_fraction,
                                        test_fraction=options.test_fraction, seed=options.seed),
                     labels=labels, sex=frame["PatientSex_DICOM"].where(frame["PatientSex_DICOM"].isin(["M", "F"]), ""),
                     age=_age(frame), view=_views(frame["Projection"]), study_id=frame["StudyID"].to_numpy(dtype=object))
    rows = select(rows, np.isin(rows["view"], views))
    provenance = {"classes": classes, "views": list(views), "label_method": label_method,
                  "source_csv": csv_path.name, "source_csv_sha256": file_sha256(csv_path),
                  "split_source": f"random patient-wise (test {options.test_fraction})",
                  "val_fraction": float(options.val_fraction), "split_seed": int(options.seed),
                  "rows_dropped": {"no annotation": int((~annotated).sum()), "exclude": int(excluded.sum()),
                                   "other label method": int((annotated & ~excluded & ~by_method).sum())}}
    return rows, provenance


def _multi_hot(findings: list, classes: list) -> np.ndarray:
    index = {name: i for i, name in enumerate(classes)}
    labels = np.zeros((len(findings), len(classes)), dtype=np.uint8)
    for row, names in enumerate(findings):
        labels[row, [index[name] for name in names or () if name in index]] = 1
    return labels


def _paths(frame: pd.DataFrame, data_dir: Path) -> np.ndarray:
    folders = {name for name in frame["ImageDir"].unique() if name and (data_dir / name).is_dir()}
    in_folder = frame["ImageDir"].isin(folders)
    return np.where(in_folder, frame["ImageDir"] + "/" + frame["ImageID"], frame["ImageID"]).astype(object)


def _age(frame: pd.DataFrame) -> np.ndarray:
    birth = pd.to_numeric(frame["PatientBirth"], errors="coerce")
    study_year = pd.to_numeric(frame["StudyDate_DICOM"].str[:4], errors="coerce")
    return (study_year - birth).to_numpy(dtype=np.float32)


def _views(projection: pd.Series) -> np.ndarray:
    upper = projection.str.upper()
    return upper.map(VIEWS).fillna(upper).to_numpy(dtype=object)
