"""The readers on the real metadata files torchxrayvision ships (torchxrayvision/data/), with
small synthetic images written for a sample of rows, and the agreement of the kit's labels
with torchxrayvision's own dataset classes on the same rows. Documented differences: the kit
keeps one row per image where torchxrayvision keeps one per CSV row (SIIM); the kit drops
PadChest rows without annotation or labelled exclude; torchxrayvision matches PadChest and
VinDr finding names by substring, which the comparison reproduces on the kit's classes."""
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest

import dataset_layouts
from benchmarks import bench_datasets
import cache
from cache import vocabulary
from cache.schema import UNKNOWN
from conftest import TINY, call_main
from extract import datasets
from extract.datasets import nih
from extract.datasets.table import Options

xrv = pytest.importorskip("torchxrayvision")
XRV_DATA = os.path.join(os.path.dirname(xrv.__file__), "data")
SAMPLE_IMAGES = 5


def _real(name):
    path = os.path.join(XRV_DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"torchxrayvision does not ship {name}")
    return path


def _read(name, **kwargs):
    return pd.read_csv(_real(name), dtype=str, keep_default_na=False, **kwargs)


def _xrv_labels(dataset, pathology):
    return dataset.labels[:, list(dataset.pathologies).index(pathology)]


# CheXpert ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chexpert_dir(tmp_path_factory):
    """train.csv: every 25th real row; valid.csv: the real rows of 20 train patients moved to
    valid/ (the real valid.csv is not shipped); JPEG-named PNGs for a few rows."""
    data_dir = tmp_path_factory.mktemp("chexpert") / "CheXpert-v1.0-small"
    data_dir.mkdir()
    frame = _read("chexpert_train.csv.gz")
    quirks = frame.index[(frame["AP/PA"].isin(["LL", "RL"])) | (frame["Age"] == "0")]
    sample = frame.loc[sorted(set(frame.index[::25]) | set(quirks))]
    patients = sample["Path"].str.extract(r"(patient\d+)", expand=False)
    moved = patients.isin(patients.drop_duplicates().iloc[-20:])
    valid = sample[moved].copy()
    valid["Path"] = valid["Path"].str.replace("/train/", "/valid/", regex=False)
    sample[~moved].to_csv(data_dir / "train.csv", index=False)
    valid.to_csv(data_dir / "valid.csv", index=False)
    for path in list(sample["Path"][~moved][:SAMPLE_IMAGES]) + list(valid["Path"][:2]):
        dataset_layouts.write_png(data_dir.parent / path)
    return data_dir


def test_chexpert_real_file(chexpert_dir):
    rows, provenance = datasets.load("chexpert", chexpert_dir, Options(views=("PA", "AP", "LATERAL", "LL", "RL")))
    train = pd.read_csv(chexpert_dir / "train.csv", dtype=str, keep_default_na=False)
    valid = pd.read_csv(chexpert_dir / "valid.csv", dtype=str, keep_default_na=False)
    assert len(rows["image_id"]) == len(train) + len(valid)
    assert set(rows["image_id"][rows["split"] == "test"]) == set(valid["Path"])
    written = [p for p in rows["path"] if (chexpert_dir / p).exists()]
    assert len(written) == SAMPLE_IMAGES + 2  # paths resolve relative to the folder given
    column = provenance["classes"].index("Pleural Effusion")
    values = pd.concat([train, valid])["Pleural Effusion"]
    assert (rows["labels"][:, column] == 1).sum() == (values == "1.0").sum()
    assert set(rows["view"]) == {"PA", "AP", "LATERAL", "LL", "RL"}
    decubitus = np.isin(rows["view"], ["LL", "RL"])
    frontal, _ = datasets.load("chexpert", chexpert_dir)
    assert decubitus.any() and not np.isin(frontal["view"], ["LL", "RL", "LATERAL"]).any()
    assert np.isnan(rows["age"]).sum() == (pd.concat([train, valid])["Age"] == "0").sum() > 0
    assert rows["patient_id"][0].startswith("patient") and set(rows["sex"]) <= {"M", "F", ""}


def test_chexpert_labels_agree_with_torchxrayvision(chexpert_dir):
    rows, provenance = datasets.load("chexpert", chexpert_dir, Options(uncertain="mask"))
    theirs = xrv.datasets.CheX_Dataset(imgpath=str(chexpert_dir), csvpath=str(chexpert_dir / "train.csv"),
                                       views=["PA", "AP"], unique_patients=False)
    ours = pd.Series(np.arange(len(rows["image_id"])), index=rows["image_id"])
    assert set(theirs.csv["Path"]) == set(rows["image_id"][rows["split"] != "test"])  # same rows, same views
    order = ours[theirs.csv["Path"]].to_numpy()
    shared = vocabulary.mapping("chexpert", provenance["classes"])
    compared = 0
    for own, name in shared.items():
        if name not in theirs.pathologies:
            continue
        expected = _xrv_labels(theirs, name)
        got = rows["labels"][order, provenance["classes"].index(own)].astype(float)
        got[got == UNKNOWN] = np.nan
        np.testing.assert_array_equal(got, expected, err_msg=f"{own} ({name})")
        compared += 1
    assert compared == 13  # every xrv CheXpert pathology, Effusion through the vocabulary


# PadChest ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def padchest_dir(tmp_path_factory):
    """Every 15th real row plus every row holding a quirk; 16-bit PNGs for a few rows."""
    data_dir = tmp_path_factory.mktemp("padchest")
    frame = _read("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz")
    quirky = (frame["Labels"].isin(["nan", "['']"]) | frame["Labels"].str.contains("exclude")
              | frame["Labels"].str.contains("' ") | frame["Projection"].isin(["AP_horizontal", "COSTAL", "UNK"]))
    keep = sorted(set(frame.index[::15]) | set(frame.index[quirky][::4]))
    frame.loc[keep].to_csv(data_dir / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", index=False)
    for _, row in frame.loc[keep[:SAMPLE_IMAGES]].iterrows():
        dataset_layouts.write_png(data_dir / row["ImageDir"] / row["ImageID"], bits=16)
    return data_dir


def test_padchest_real_file(padchest_dir):
    frame = pd.read_csv(padchest_dir / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", dtype=str,
                        keep_default_na=False)
    rows, provenance = datasets.load("padchest", padchest_dir, Options(label_method="all",
                                                                      views=("PA", "AP", "LATERAL")))
    assert not any(c != c.strip() or c in ("", "exclude") for c in provenance["classes"])
    dropped = provenance["rows_dropped"]
    assert dropped["no annotation"] == frame["Labels"].isin(["nan", "['']"]).sum() > 0
    assert dropped["exclude"] == frame["Labels"].str.contains("'exclude'|' exclude'", regex=True).sum() > 0
    effusion = provenance["classes"].index("pleural effusion")
    spelled = frame["Labels"].str.contains("'pleural effusion'|' pleural effusion'", regex=True)
    kept = frame.set_index("ImageID").loc[rows["image_id"]]
    assert (rows["labels"][:, effusion] == 1).sum() == spelled[frame["ImageID"].isin(rows["image_id"])].sum()
    supine = (kept["Projection"] == "AP_horizontal").to_numpy()
    assert supine.any() and (rows["view"][supine] == "AP").all()
    assert sum((padchest_dir / p).exists() for p in rows["path"]) >= 1  # IMAGEDIR/IMAGEID resolved
    assert isinstance(rows["patient_id"][0], str) and len(rows["patient_id"][0]) > 20
    physician, physician_provenance = datasets.load("padchest", padchest_dir)
    assert 0 < len(physician["image_id"]) < len(rows["image_id"])
    assert physician_provenance["label_method"] == "physician"


def _padchest_xrv_match(pattern: str, name: str) -> bool:
    """torchxrayvision's str.contains on the raw Labels text, on one parsed finding name; a
    trailing ' in its pattern means "ends with"."""
    return name.endswith(pattern[:-1]) if pattern.endswith("'") else pattern in name


def test_padchest_labels_agree_with_torchxrayvision(padchest_dir):
    csv_path = padchest_dir / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
    rows, provenance = datasets.load("padchest", padchest_dir, Options(label_method="all", views=("PA", "AP")))
    theirs = xrv.datasets.PC_Dataset(imgpath=str(padchest_dir), csvpath=str(csv_path),
                                     views=["PA", "AP", "AP Supine"], unique_patients=False)
    ours = pd.Series(np.arange(len(rows["image_id"])), index=rows["image_id"])
    common = theirs.csv["ImageID"].isin(ours.index).to_numpy()
    assert common.sum() > 0.9 * len(rows["image_id"])  # they also drop age <= 10 and a list of bad files
    order = ours[theirs.csv["ImageID"][common]].to_numpy()
    synonyms = {"Infiltration": ["infiltrates", "interstitial pattern", "ground glass pattern",
                                 "reticular interstitial pattern", "reticulonodular interstitial pattern",
                                 "alveolar pattern", "consolidation", "air bronchogram"],
                "Pleural_Thickening": ["pleural thickening"], "Consolidation": ["air bronchogram"],
                "Hilar Enlargement": ["adenopathy", "pulmonary artery enlargement"],
                "Support Devices": ["device", "pacemaker"], "Tube": ["stent'"]}
    for pathology in theirs.pathologies:
        patterns = [("tube'" if pathology == "Tube" else pathology.lower()), *synonyms.get(pathology, [])]
        columns = [i for i, c in enumerate(provenance["classes"]) if any(_padchest_xrv_match(p, c) for p in patterns)]
        got = rows["labels"][order][:, columns].max(axis=1) if columns else np.zeros(len(order))
        np.testing.assert_array_equal(got, _xrv_labels(theirs, pathology)[common], err_msg=pathology)


# VinDr (Kaggle VinBigData) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def vindr_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("vindr")
    frame = _read("vinbigdata-train.csv.gz")
    frame.to_csv(data_dir / "train.csv", index=False)
    for image_id in frame["image_id"].drop_duplicates()[:SAMPLE_IMAGES]:
        dataset_layouts.write_dicom(data_dir / "train" / f"{image_id}.dicom")
    return data_dir


def test_vindr_real_file_majority_counts_radiologists(vindr_dir):
    frame = pd.read_csv(vindr_dir / "train.csv", dtype=str, keep_default_na=False)
    majority, provenance = datasets.load("vindr", vindr_dir)
    anyone, _ = datasets.load("vindr", vindr_dir, Options(raters="any"))
    assert len(majority["image_id"]) == 15_000 and provenance["classes"][-1] == "No finding"
    assert sum((vindr_dir / p).exists() for p in majority["path"]) == SAMPLE_IMAGES
    radiologists = frame.groupby(["image_id", "class_name"])["rad_id"].nunique().unstack(fill_value=0)
    radiologists = radiologists.loc[majority["image_id"], provenance["classes"]].to_numpy()
    np.testing.assert_array_equal(majority["labels"], (radiologists >= 2).astype(np.uint8))
    np.testing.assert_array_equal(anyone["labels"], (radiologists >= 1).astype(np.uint8))
    boxes = frame.groupby(["image_id", "class_name"]).size().unstack(fill_value=0)
    boxes = boxes.loc[majority["image_id"], provenance["classes"]].to_numpy()
    assert ((boxes >= 2) & (radiologists == 1)).any()  # the quirk is in the real file: boxes are not votes


def test_vindr_labels_agree_with_torchxrayvision(vindr_dir):
    rows, provenance = datasets.load("vindr", vindr_dir, Options(raters="any"))
    theirs = xrv.datasets.VinBrain_Dataset(imgpath=str(vindr_dir / "train"), csvpath=str(vindr_dir / "train.csv"))
    order = pd.Series(np.arange(len(rows["image_id"])), index=rows["image_id"])[theirs.csv["image_id"]].to_numpy()
    for pathology in theirs.pathologies:
        names = [pathology.lower(), *(n.lower() for n in theirs.mapping.get(pathology, []))]
        columns = [i for i, c in enumerate(provenance["classes"]) if any(n in c.lower() for n in names)]
        got = rows["labels"][order][:, columns].max(axis=1)
        np.testing.assert_array_equal(got, _xrv_labels(theirs, pathology), err_msg=pathology)
    effusion = [c for c in provenance["classes"] if vocabulary.shared_name("vindr", c) == "Effusion"]
    assert effusion == ["Pleural effusion"]


# RSNA Pneumonia ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rsna_dir(tmp_path_factory):
    import zipfile
    data_dir = tmp_path_factory.mktemp("rsna")
    with zipfile.ZipFile(_real("kaggle_stage_2_train_labels.csv.zip")) as archive:
        archive.extract("stage_2_train_labels.csv", data_dir)
    frame = pd.read_csv(data_dir / "stage_2_train_labels.csv", dtype=str)
    for patient in frame["patientId"].drop_duplicates()[:SAMPLE_IMAGES]:
        dataset_layouts.write_dicom(data_dir / "stage_2_train_images" / f"{patient}.dcm")
    return data_dir


def test_rsna_real_file_and_agreement_with_torchxrayvision(rsna_dir):
    rows, provenance = datasets.load("rsna", rsna_dir)
    frame = pd.read_csv(rsna_dir / "stage_2_train_labels.csv")
    assert len(rows["image_id"]) == frame["patientId"].nunique() == 26_684 < len(frame)  # box rows counted once
    assert sum((rsna_dir / p).exists() for p in rows["path"]) == SAMPLE_IMAGES
    theirs = xrv.datasets.RSNA_Pneumonia_Dataset(imgpath=str(rsna_dir / "stage_2_train_images"),
                                                 csvpath=str(rsna_dir / "stage_2_train_labels.csv"),
                                                 views=["PA", "AP"], extension=".dcm")
    ours = dict(zip(rows["image_id"], rows["labels"][:, 0]))
    assert len(theirs.csv) == len(ours)
    got = np.array([ours[p] for p in theirs.csv["patientId"]])
    np.testing.assert_array_equal(got, _xrv_labels(theirs, "Pneumonia"))
    assert provenance["classes"] == ["Pneumonia"]


# SIIM-ACR ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def siim_dir(tmp_path_factory):
    """The real CSV; DICOMs (nested as in the Kaggle download) for 300 images, among them
    every image with several mask rows."""
    data_dir = tmp_path_factory.mktemp("siim")
    with open(_real("siim-pneumothorax-train-rle.csv.gz"), "rb") as handle:
        import gzip
        (data_dir / "train-rle.csv").write_bytes(gzip.decompress(handle.read()))
    frame = pd.read_csv(data_dir / "train-rle.csv", dtype=str)
    counts = frame["ImageId"].value_counts()
    chosen = sorted(set(counts.index[counts > 1][:150]) | set(counts.index[counts == 1][:150]))
    for image_id in chosen:
        dataset_layouts.write_dicom(data_dir / "dicom-images-train" / image_id[-12:] / f"{image_id}.dcm")
    return data_dir, chosen


def test_siim_real_file_and_agreement_with_torchxrayvision(siim_dir):
    data_dir, chosen = siim_dir
    rows, provenance = datasets.load("siim", data_dir)
    assert sorted(rows["image_id"]) == chosen
    assert provenance["images_without_dicom"] == pd.read_csv(data_dir / "train-rle.csv")["ImageId"].nunique() - len(chosen)
    theirs = xrv.datasets.SIIM_Pneumothorax_Dataset(imgpath=str(data_dir), csvpath=str(data_dir / "train-rle.csv"))
    per_row = pd.DataFrame({"image": theirs.csv["ImageId"], "label": _xrv_labels(theirs, "Pneumothorax")})
    assert (per_row.groupby("image")["label"].nunique() == 1).all()  # their rows of one image agree
    per_image = per_row.groupby("image")["label"].max()
    np.testing.assert_array_equal(rows["labels"][:, 0], per_image.loc[rows["image_id"]].to_numpy())
    assert rows["labels"][:, 0].sum() > 0 and (rows["labels"][:, 0] == 0).sum() > 0


# NIH through the registry ------------------------------------------------------------------

def test_nih_through_the_registry_keeps_the_table_and_adds_metadata(nih_metadata, tmp_path):
    data_dir = tmp_path / "nih"
    shutil.copytree(nih_metadata, data_dir)
    before, _ = nih.load_dataset(data_dir, val_fraction=0.1, seed=0)
    rows, provenance = datasets.load("nih", data_dir)
    for key in ("image_id", "patient_id", "split", "labels"):
        np.testing.assert_array_equal(rows[key], before[key])
    assert set(rows["view"]) == {"PA", "AP"} and set(rows["sex"]) == {"M", "F"}
    assert 0 <= np.nanmin(rows["age"]) and np.nanmax(rows["age"]) < 120 and not np.isnan(rows["age"]).any()
    assert rows["path"][0] == f"images/{rows['image_id'][0]}"  # where the images belong, before they are there
    assert provenance["dataset"] == "nih" and provenance["classes"] == list(nih.CLASSES)


# Reading speed (benchmarks/bench_datasets.py) ----------------------------------------------

def test_bench_datasets_quick_reports_a_row_per_dataset():
    result = call_main("benchmarks.bench_datasets", "--quick", check_rc=0)
    measures = [line for line in result.stdout.splitlines() if line.startswith("datasets ")]
    assert "import extract.datasets only (baseline)" in measures[0]
    for name, line in zip(bench_datasets.DATASETS, measures[1:], strict=True):
        read, kept = (int(n.replace(",", "")) for n in re.search(r"([\d,]+) rows read, ([\d,]+) kept", line).groups())
        assert f"read + validate {name}:" in line and read == bench_datasets.QUICK_ROWS and 0 < kept <= read
    assert "cpu flags:" in result.stdout and "load after" in result.stdout


# End to end on real rows: extract -> cache verify -> heads.train -> heads.compare -------------

def _through_the_kit(root, name, data_dir):
    """The real rows' labels, with a synthetic image each, through every stage; returns the cache."""
    path = root / f"{name}.h5"
    call_main("extract", "--dataset", name, "--data-dir", data_dir, "--cache", path, "--val-fraction", 0.4,
              *TINY, check_rc=0)
    call_main("cache", "verify", path, check_rc=0)
    for seed in (0, 1):
        call_main("heads.train", "--cache", path, "--out", root / f"run{seed}", "--max-epochs", 2, "--seed", seed,
                  "--bootstrap", 20, "--device", "cpu", "--precision", "fp32", check_rc=0)
    call_main("heads.compare", root / "run0", root / "run1", "--out", root / "cmp", "--bootstrap", 50, check_rc=0)
    return path


def test_chexpert_real_rows_end_to_end(tmp_path):
    data_dir = tmp_path / "CheXpert-v1.0-small"
    data_dir.mkdir()
    frame = _read("chexpert_train.csv.gz")
    patient = frame["Path"].str.extract(r"(patient\d+)", expand=False)
    frame = frame[patient.isin(patient.drop_duplicates().iloc[:48])].copy()
    moved = patient[frame.index].isin(patient[frame.index].drop_duplicates().iloc[-12:])
    frame.loc[moved, "Path"] = frame.loc[moved, "Path"].str.replace("/train/", "/valid/", regex=False)
    frame[~moved].to_csv(data_dir / "train.csv", index=False)
    frame[moved].to_csv(data_dir / "valid.csv", index=False)
    for relative in frame["Path"]:
        dataset_layouts.write_png(tmp_path / relative)
    path = _through_the_kit(tmp_path, "chexpert", data_dir)
    table = cache.read_table(path)
    assert (table["labels"] == cache.UNKNOWN).any() and table["done"].all()
    predictions = pd.read_csv(tmp_path / "run0" / "predictions_test.csv")
    assert predictions.filter(like="label_").isna().any().any()  # blank and -1: unknown, an empty cell


def test_padchest_real_rows_end_to_end(tmp_path):
    frame = _read("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz")
    frame = frame[(frame["MethodLabel"] == "Physician") & frame["Projection"].isin(["PA", "AP"])].iloc[:90]
    frame.to_csv(tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", index=False)
    for _, row in frame.iterrows():
        dataset_layouts.write_png(tmp_path / row["ImageDir"] / row["ImageID"], bits=16)
    path = _through_the_kit(tmp_path, "padchest", tmp_path)
    table = cache.read_table(path)  # rows the reader drops (no annotation, exclude) are not in it
    assert cache.read_attrs(path)["dataset"] == "padchest" and table["done"].all() and len(table["image_id"]) > 80
