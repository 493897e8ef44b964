"""The NIH ChestX-ray14 download: label CSV, official split lists and where the PNGs are.

Label contract: `CLASSES` in this order, multi-hot uint8; "No Finding" is all zeros.
Split contract: `test` is exactly the official test_list.txt; `train` and `val` partition the
official train_val_list.txt by patient, so no patient is ever in two splits.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cache.schema import CLASSES, TEST, TRAIN, VAL
from extract.datasets import register
from extract.datasets.table import (MAX_AGE, DatasetError, Options, assert_patient_disjoint, choose_patients,
                                    file_sha256, make_rows)

NO_FINDING = "No Finding"
# The v2020 file first: it fixes 181 labels of the 2017 one that many mirrors still serve.
LABEL_CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv",
                   "Data_Entry_2017_v2020.csv.gz", "Data_Entry_2017.csv.gz")
TRAIN_VAL_LIST, TEST_LIST = "train_val_list.txt", "test_list.txt"
_REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
_DOWNLOAD_HINT = "they come with the NIH download (https://nihcc.app.box.com/v/ChestXray-NIHCC)"


def find_labels_csv(data_dir) -> Path:
    for name in LABEL_CSV_NAMES:
        if (Path(data_dir) / name).exists():
            return Path(data_dir) / name
    raise DatasetError(f"no label CSV in {data_dir}: expected one of {', '.join(LABEL_CSV_NAMES[:2])} ({_DOWNLOAD_HINT})",
                       missing_files=True)


def read_labels_csv(path) -> pd.DataFrame:
    """image_id, patient_id and the multi-hot `labels` (an (N, 14) array in `.attrs`), sorted
    by image id. Reads both the v2020 and the original 2017 variants."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DatasetError(f"cannot read label CSV {path}: {err}") from err
    # The 2017 file's header ends with a comma, which adds an empty "Unnamed: N" column.
    frame = frame.loc[:, [c for c in frame.columns if not c.startswith("Unnamed")]]
    frame.columns = [c.strip() for c in frame.columns]
    missing = [c for c in _REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path} lacks columns {missing} (found {list(frame.columns)[:6]}); "
                           f"is it the NIH Data_Entry CSV?")
    image_ids = frame["Image Index"].str.strip()
    for line, image_id in zip(range(2, len(frame) + 2), image_ids):
        _check_image_id(image_id, where=f"{path} line {line}")
    duplicated = image_ids[image_ids.duplicated()]
    if len(duplicated):
        raise DatasetError(f"{path}: image ids appear twice, e.g. {duplicated.iloc[0]}")
    patient_ids = _parse_patient_ids(frame["Patient ID"], path)
    labels = _parse_labels(frame["Finding Labels"], image_ids, path)
    table = pd.DataFrame({"image_id": image_ids.to_numpy(), "patient_id": patient_ids, **_metadata(frame)})
    order = np.argsort(table["image_id"].to_numpy(), kind="stable")
    table = table.iloc[order].reset_index(drop=True)
    table.attrs["labels"] = labels[order]
    return table


def _metadata(frame: pd.DataFrame) -> dict:
    """sex, age (years), view and follow-up number where the CSV has them (the 2017 file spells
    the sex column "Patient Sex" in some mirrors and ages as "058Y")."""
    n_rows = len(frame)
    sex_column = next((c for c in ("Patient Gender", "Patient Sex") if c in frame.columns), None)
    sex = frame[sex_column].str.strip().str.upper() if sex_column else pd.Series([""] * n_rows)
    age = (pd.to_numeric(frame["Patient Age"].str.strip().str.rstrip("Y"), errors="coerce")
           if "Patient Age" in frame.columns else pd.Series(np.full(n_rows, np.nan)))
    age = age.where(age <= MAX_AGE)  # the 2017 file has a few ages in the hundreds, fixed in v2020
    view = frame["View Position"].str.strip().str.upper() if "View Position" in frame.columns else [""] * n_rows
    follow_up = frame["Follow-up #"].str.strip() if "Follow-up #" in frame.columns else [""] * n_rows
    return {"sex": np.where(np.isin(sex, ["M", "F"]), sex, ""), "age": np.asarray(age, dtype=np.float32),
            "view": np.asarray(view, dtype=object), "study_id": np.asarray(follow_up, dtype=object)}


def _check_image_id(image_id: str, *, where: str) -> None:
    if not image_id or "/" in image_id or "\\" in image_id or ".." in image_id or image_id.startswith("."):
        raise DatasetError(f"{where}: image id {image_id!r} is not a plain file name; refusing "
                           f"to read outside the image folders")


def _parse_patient_ids(column: pd.Series, path) -> np.ndarray:
    # 2017 files zero-pad patient ids ("00001"); int() reads both forms alike.
    numbers = pd.to_numeric(column.str.strip(), errors="coerce")
    bad = numbers.isna() | (numbers % 1 != 0)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DatasetError(f"{path} line {row + 2}: Patient ID {column.iloc[row]!r} is not an integer")
    return numbers.to_numpy(dtype=np.int64)


def _parse_labels(column: pd.Series, image_ids: pd.Series, path) -> np.ndarray:
    index = {name: i for i, name in enumerate(CLASSES)}
    labels = np.zeros((len(column), len(CLASSES)), dtype=np.uint8)
    for row, text in enumerate(column):
        for name in (part.strip() for part in text.split("|")):
            if name == NO_FINDING:
                continue
            if name not in index:
                raise DatasetError(
                    f"{path} line {row + 2} ({image_ids.iloc[row]}): unknown finding {name!r}; "
                    f"expected '{NO_FINDING}' or one of {', '.join(CLASSES)}")
            labels[row, index[name]] = 1
    return labels


def read_split_list(path) -> list[str]:
    """The image ids of a split list, one per line; blank lines skipped."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(
            f"split list {path} is missing: {_DOWNLOAD_HINT}. Without the official lists the "
            f"test split is not the published one; --random-split falls back to a seeded "
            f"patient-wise split")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:  # a folder, unreadable, or not a text file
        raise DatasetError(f"cannot read split list {path} ({err}); it should be a text file of image "
                           f"ids, one per line") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    for line, image_id in enumerate(ids, start=1):
        _check_image_id(image_id, where=f"{path} line {line}")
    return ids


def official_splits(table: pd.DataFrame, *, data_dir, val_fraction: float, seed: int, val_list=None) -> np.ndarray:
    """test from test_list.txt; train/val by patient from train_val_list.txt, or val exactly
    the ids of `val_list` (a published split). Rows listed in neither are marked "" (the
    caller drops them)."""
    train_val = set(read_split_list(Path(data_dir) / TRAIN_VAL_LIST))
    test = set(read_split_list(Path(data_dir) / TEST_LIST))
    both = train_val & test
    if both:
        raise DatasetError(f"{len(both)} image ids are in both split lists, e.g. {sorted(both)[0]}")
    unknown = (train_val | test) - set(table["image_id"])
    if unknown:
        raise DatasetError(f"{len(unknown)} ids in the split lists are not in the label CSV, "
                           f"e.g. {sorted(unknown)[0]}: do the lists and the CSV come from the same download?")
    split = np.full(len(table), "", dtype=object)
    split[table["image_id"].isin(test).to_numpy()] = TEST
    in_train_val = table["image_id"].isin(train_val).to_numpy()
    if val_list is not None:
        is_val = _val_from_list(table, val_list, train_val=train_val, test=test)
    else:
        val_patients = choose_patients(table["patient_id"][in_train_val], val_fraction, seed)
        is_val = table["patient_id"].isin(val_patients).to_numpy()
    split[in_train_val & is_val] = VAL
    split[in_train_val & ~is_val] = TRAIN
    return split


def _val_from_list(table: pd.DataFrame, val_list, *, train_val: set, test: set) -> np.ndarray:
    """Rows named by the val list; refused if it names a test image or splits a patient."""
    if not Path(val_list).exists():
        raise DatasetError(f"--val-list {val_list}: no such file; give a text file of image ids, one per line")
    wanted = read_split_list(val_list)
    if not wanted:  # an empty val split would leave model selection nothing to select on
        raise DatasetError(f"--val-list {val_list}: no image ids in it; give one image id per line")
    in_test = sorted(set(wanted) & test)
    if in_test:
        raise DatasetError(f"--val-list {val_list}: {len(in_test)} ids are official test images "
                           f"(e.g. {in_test[0]}); a val split must come from train_val_list.txt")
    outside = sorted(set(wanted) - train_val)
    if outside:
        raise DatasetError(f"--val-list {val_list}: {len(outside)} ids are not in train_val_list.txt "
                           f"(e.g. {outside[0]})")
    is_val = table["image_id"].isin(set(wanted)).to_numpy()
    in_train_val = table["image_id"].isin(train_val).to_numpy()
    val_patients = set(table["patient_id"][is_val])
    train_patients = set(table["patient_id"][in_train_val & ~is_val])
    spanning = sorted(val_patients & train_patients)
    if spanning:
        raise DatasetError(f"--val-list {val_list}: {len(spanning)} patients have images in both val and "
                           f"train (patients {', '.join(map(str, spanning[:5]))}{' ...' if len(spanning) > 5 else ''}); "
                           f"a val list must hold all of a patient's train_val images or none")
    return is_val


def random_splits(table: pd.DataFrame, *, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """A seeded patient-wise split for data without the official lists (not comparable to
    published test results)."""
    warnings.warn("using a random patient-wise split: test results are not comparable with "
                  "papers that use the official test_list.txt", stacklevel=2)
    patients = table["patient_id"]
    test_patients = choose_patients(patients, test_fraction, seed)
    rest = ~patients.isin(test_patients)
    val_patients = choose_patients(patients[rest], val_fraction / (1 - test_fraction), seed + 1)
    split = np.full(len(table), TRAIN, dtype=object)
    split[patients.isin(val_patients).to_numpy()] = VAL
    split[patients.isin(test_patients).to_numpy()] = TEST
    return split


def index_images(data_dir) -> dict[str, Path]:
    """Map file name to path for the PNGs in `images/` or the official `images_001/images/`
    ... `images_012/images/` folders (and unpacked variants of either)."""
    data_dir = Path(data_dir)
    folders = [data_dir / "images"]
    for entry in sorted(data_dir.glob("images_*")):
        folders += [entry / "images", entry]
    found = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".png") and entry.name not in found:
                    found[entry.name] = Path(entry.path)
    return found


def load_dataset(data_dir, *, val_fraction: float, seed: int, random_split: bool = False,
                 labels_csv=None, val_list=None, with_metadata: bool = False) -> tuple[dict, dict]:
    """The cache's row table (image_id, patient_id, labels, split; with_metadata: also sex,
    age, view and the follow-up number as study_id) and its provenance.
    `val_list`: a file of image ids that is the val split (instead of the seeded one)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"--data-dir {data_dir} is not a folder")
    csv_path = Path(labels_csv) if labels_csv else find_labels_csv(data_dir)
    table = read_labels_csv(csv_path)
    labels = table.attrs["labels"]
    lists = [data_dir / TRAIN_VAL_LIST, data_dir / TEST_LIST]
    if random_split and not all(p.exists() for p in lists):
        if val_list is not None:
            raise DatasetError(f"--val-list {val_list} needs the official split lists in {data_dir}")
        split = random_splits(table, val_fraction=val_fraction, test_fraction=0.2, seed=seed)
        source, lists_hash = "random patient-wise (test 0.2)", ""
    else:
        split = official_splits(table, data_dir=data_dir, val_fraction=val_fraction, seed=seed, val_list=val_list)
        source, lists_hash = "official lists", file_sha256(*lists)
        if val_list is not None:
            source, lists_hash = f"official lists, val from {Path(val_list).name}", file_sha256(*lists, val_list)
    keep = split != ""
    rows = {"image_id": table["image_id"].to_numpy()[keep], "patient_id": table["patient_id"].to_numpy()[keep],
            "labels": labels[keep], "split": split[keep]}
    if with_metadata:
        rows.update({key: table[key].to_numpy()[keep] for key in ("sex", "age", "view", "study_id")})
    assert_patient_disjoint(rows["patient_id"], rows["split"])
    provenance = {"source_csv": csv_path.name, "source_csv_sha256": file_sha256(csv_path),
                  "split_lists_sha256": lists_hash, "split_source": source,
                  "val_fraction": float(val_fraction), "split_seed": int(seed),
                  "classes": list(CLASSES)}
    return rows, provenance


@register("nih", expects="Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv, .gz), train_val_list.txt, "
                         "test_list.txt, PNGs in images/ or images_001/images/ ... images_012/images/",
          markers=("Data_Entry_2017*.csv*", "train_val_list.txt"),
          options=("views", "labels_csv", "val_list", "random_split"),
          download="https://nihcc.app.box.com/v/ChestXray-NIHCC")
def read(data_dir: Path, options: Options) -> tuple[dict, dict]:
    """The common table: NIH's labels are all known (a finding not listed is a negative), the
    views PA and AP are the only ones NIH has; an image not found on disk is given its path
    in images/ (the embed step reports it missing)."""
    rows, provenance = load_dataset(data_dir, val_fraction=options.val_fraction, seed=options.seed,
                                    random_split=options.random_split, labels_csv=options.labels_csv,
                                    val_list=options.val_list, with_metadata=True)
    found = index_images(data_dir) if len(rows["image_id"]) else {}
    paths = [str(found[i].relative_to(data_dir)) if i in found else f"images/{i}" for i in rows["image_id"]]
    table = make_rows(image_id=rows["image_id"], path=paths, patient_id=rows["patient_id"], split=rows["split"],
                      labels=rows["labels"], sex=rows["sex"], age=rows["age"], view=rows["view"],
                      study_id=rows["study_id"])
    if options.views is not None:
        keep = np.isin(table["view"], options.views)
        table = {key: value[keep] for key, value in table.items()}
        provenance["views"] = list(options.views)
    return table, provenance
