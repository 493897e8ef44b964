import gzip
import shutil

import numpy as np
import pandas as pd
import pytest

from extract.datasets import nih
from extract.synthetic import write_dataset

REAL_POSITIVES = {
    "Atelectasis": 11559, "Cardiomegaly": 2776, "Consolidation": 4667, "Edema": 2303,
    "Effusion": 13317, "Emphysema": 2516, "Fibrosis": 1686, "Hernia": 227, "Infiltration": 19894,
    "Mass": 5782, "Nodule": 6331, "Pleural_Thickening": 3385, "Pneumonia": 1431, "Pneumothorax": 5302,
}


@pytest.fixture(scope="module")
def real_rows(nih_metadata):
    return nih.load_dataset(nih_metadata, val_fraction=0.1, seed=0)


def test_real_metadata_counts(real_rows):
    rows, provenance = real_rows
    assert len(rows["image_id"]) == 112_120
    assert len(np.unique(rows["patient_id"])) == 30_805
    assert (rows["split"] == "test").sum() == 25_596
    assert np.isin(rows["split"], ["train", "val"]).sum() == 86_524
    assert dict(zip(nih.CLASSES, rows["labels"].sum(axis=0).tolist())) == REAL_POSITIVES
    assert (rows["labels"].sum(axis=1) == 0).sum() == 60_361  # "No Finding"
    assert provenance["split_source"] == "official lists"


def test_real_splits_are_patient_disjoint_and_test_is_official(real_rows, nih_metadata):
    rows, _ = real_rows
    patients = {s: set(rows["patient_id"][rows["split"] == s]) for s in ("train", "val", "test")}
    assert not patients["train"] & patients["val"]
    assert not (patients["train"] | patients["val"]) & patients["test"]
    official_test = set((nih_metadata / "test_list.txt").read_text().split())
    assert set(rows["image_id"][rows["split"] == "test"]) == official_test
    assert 0.09 < len(patients["val"]) / (len(patients["train"]) + len(patients["val"])) < 0.11


def test_val_split_is_seeded(real_rows, nih_metadata):
    rows, _ = real_rows
    again, _ = nih.load_dataset(nih_metadata, val_fraction=0.1, seed=0)
    other, _ = nih.load_dataset(nih_metadata, val_fraction=0.1, seed=1)
    assert (again["split"] == rows["split"]).all()
    assert (other["split"] != rows["split"]).any()


def test_real_2017_variant_parses_to_the_same_table(nih_metadata, tmp_path):
    """Rewrite the real v2020 file the way the original 2017 file is formatted."""
    frame = pd.read_csv(nih_metadata / "Data_Entry_2017_v2020.csv.gz", dtype=str)
    frame["Patient ID"] = frame["Patient ID"].astype(int).map("{:05d}".format)
    frame["Patient Age"] = frame["Patient Age"].astype(int).map("{:03d}Y".format)
    frame = frame.rename(columns={"Patient Gender": "Patient Sex"})
    old = tmp_path / "Data_Entry_2017.csv"
    frame.to_csv(old, index=False)
    header, rest = old.read_text().split("\n", 1)
    old.write_text(header + ",\n" + rest)  # the 2017 header's trailing comma
    new_table = nih.read_labels_csv(nih_metadata / "Data_Entry_2017_v2020.csv.gz")
    old_table = nih.read_labels_csv(old)
    assert (old_table["image_id"] == new_table["image_id"]).all()
    assert (old_table["patient_id"] == new_table["patient_id"]).all()
    assert (old_table.attrs["labels"] == new_table.attrs["labels"]).all()


def test_both_synthetic_csv_formats_agree(tmp_path):
    a = write_dataset(tmp_path / "a", patients=5, images_per_patient=2, size=16, csv_format="v2020")
    write_dataset(tmp_path / "b", patients=5, images_per_patient=2, size=16, csv_format="2017")
    table_a = nih.read_labels_csv(tmp_path / "a" / "Data_Entry_2017_v2020.csv")
    table_b = nih.read_labels_csv(tmp_path / "b" / "Data_Entry_2017.csv")
    assert (table_a.attrs["labels"] == a["labels"]).all()
    assert (table_b.attrs["labels"] == table_a.attrs["labels"]).all()
    assert table_b["patient_id"].tolist() == table_a["patient_id"].tolist()


def _csv(tmp_path, rows):
    path = tmp_path / "Data_Entry_2017_v2020.csv"
    path.write_text("Image Index,Finding Labels,Follow-up #,Patient ID\n" + "\n".join(rows) + "\n")
    return path


def test_unknown_label_names_the_row(tmp_path):
    path = _csv(tmp_path, ["a_000.png,Effusion,0,1", "b_000.png,Effusion|Pneumonai,0,2"])
    with pytest.raises(nih.DatasetError, match=r"line 3 \(b_000.png\).*Pneumonai"):
        nih.read_labels_csv(path)


@pytest.mark.parametrize("bad_id", ["../etc/passwd", "images/a.png", "..png", "a\\b.png"])
def test_path_like_image_ids_are_rejected(tmp_path, bad_id):
    with pytest.raises(nih.DatasetError, match="not a plain file name"):
        nih.read_labels_csv(_csv(tmp_path, ["ok_000.png,No Finding,0,1", f"{bad_id},No Finding,0,2"]))


def test_wrong_csv_names_missing_columns(tmp_path):
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text("file,label\nx.png,Mass\n")
    with pytest.raises(nih.DatasetError, match=r"lacks columns \['Image Index', 'Finding Labels', 'Patient ID'\]"):
        nih.read_labels_csv(path)


def test_missing_split_lists_explain_and_random_split_is_patient_wise(tmp_path):
    write_dataset(tmp_path, patients=30, images_per_patient=3, size=16)
    (tmp_path / "test_list.txt").unlink()
    with pytest.raises(nih.DatasetError, match="test_list.txt is missing.*--random-split"):
        nih.load_dataset(tmp_path, val_fraction=0.1, seed=0)
    with pytest.warns(UserWarning, match="random patient-wise split"):
        rows, provenance = nih.load_dataset(tmp_path, val_fraction=0.1, seed=0, random_split=True)
    nih.assert_patient_disjoint(rows["patient_id"], rows["split"])
    assert set(rows["split"]) == {"train", "val", "test"}
    assert provenance["split_source"].startswith("random")


def test_patient_leak_is_detected():
    with pytest.raises(nih.DatasetError, match="patient 7 is in both train and test"):
        nih.assert_patient_disjoint([7, 8, 7], ["train", "val", "test"])


def test_split_list_ids_missing_from_csv_are_an_error(tmp_path):
    write_dataset(tmp_path, patients=4, images_per_patient=1, size=16)
    with open(tmp_path / "test_list.txt", "a") as handle:
        handle.write("99999999_000.png\n")
    with pytest.raises(nih.DatasetError, match="not in the label CSV, e.g. 99999999_000.png"):
        nih.load_dataset(tmp_path, val_fraction=0.1, seed=0)


@pytest.mark.parametrize("folders", [0, 3])
def test_images_are_found_in_either_layout(tmp_path, folders):
    info = write_dataset(tmp_path, patients=4, images_per_patient=2, size=16, folders=folders)
    found = nih.index_images(tmp_path)
    assert sorted(found) == sorted(info["image_ids"])
    assert all(path.exists() for path in found.values())


def test_gzipped_csv_is_found(tmp_path):
    write_dataset(tmp_path, patients=3, images_per_patient=1, size=16)
    csv = tmp_path / "Data_Entry_2017_v2020.csv"
    with open(csv, "rb") as src, gzip.open(str(csv) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    csv.unlink()
    rows, provenance = nih.load_dataset(tmp_path, val_fraction=0.34, seed=0)
    assert provenance["source_csv"] == "Data_Entry_2017_v2020.csv.gz" and len(rows["image_id"]) == 3


def test_real_val_list_reproduces_a_split_and_refuses_a_split_patient(real_rows, nih_metadata, tmp_path):
    rows, _ = real_rows
    val_ids = rows["image_id"][rows["split"] == "val"]
    listed = tmp_path / "val_list.txt"
    listed.write_text("\n".join(val_ids) + "\n")
    again, provenance = nih.load_dataset(nih_metadata, val_fraction=0.1, seed=0, val_list=listed)
    assert (again["split"] == rows["split"]).all()
    assert provenance["split_source"] == "official lists, val from val_list.txt"
    assert provenance["split_lists_sha256"] != real_rows[1]["split_lists_sha256"]
    patients = rows["patient_id"][rows["split"] == "val"]
    first_of_a_repeat = next(i for i, p in enumerate(patients) if (patients == p).sum() > 1)
    listed.write_text("\n".join(np.delete(val_ids, first_of_a_repeat)) + "\n")
    with pytest.raises(nih.DatasetError, match=f"1 patients have images in both val and train \\(patients {patients[first_of_a_repeat]}\\)"):
        nih.load_dataset(nih_metadata, val_fraction=0.1, seed=0, val_list=listed)


@pytest.mark.parametrize("content, message", [
    (b"", "no image ids in it"),
    (b"\xff\xfe\x00 not text\n", "cannot read split list .*text file of image ids"),
    (None, "cannot read split list .*text file of image ids"),  # a folder
    ("missing", "no such file; give a text file"),
])
def test_a_val_list_that_is_not_a_list_of_ids_is_one_clear_error(tmp_path, content, message):
    write_dataset(tmp_path / "data", patients=6, images_per_patient=1, size=16)
    listed = tmp_path / "val_list.txt"
    if content is None:
        listed.mkdir()
    elif content != "missing":
        listed.write_bytes(content)
    with pytest.raises(nih.DatasetError, match=message):
        nih.load_dataset(tmp_path / "data", val_fraction=0.1, seed=0, val_list=listed)
