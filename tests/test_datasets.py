"""The dataset registry: every registered reader on a tiny synthetic folder in its documented
layout, the common table's rules, and bad input as one DatasetError line naming file, row and
column. The real metadata files are in test_datasets_real.py."""

import numpy as np
import pandas as pd
import pytest

import dataset_layouts
from cache import vocabulary
from cache.schema import UNKNOWN
from extract import datasets
from extract.datasets import DatasetError
from extract.datasets.table import Options

ROW_COLUMNS = {"image_id", "path", "patient_id", "split", "labels", "sex", "age", "view", "study_id"}


def test_every_registered_dataset_has_a_synthetic_layout():
    assert set(datasets.names()) == set(dataset_layouts.WRITERS)


@pytest.mark.parametrize("name", datasets.names())
def test_every_registered_dataset_reads_its_layout_into_the_common_table(tmp_path, name):
    data_dir, options = dataset_layouts.WRITERS[name](tmp_path)
    rows, provenance = datasets.load(name, data_dir, options)
    assert set(rows) == ROW_COLUMNS and len(rows["image_id"]) > 0
    assert provenance["dataset"] == name
    assert rows["labels"].dtype == np.uint8 and rows["labels"].shape == (len(rows["image_id"]), len(provenance["classes"]))
    assert np.isin(rows["labels"], [0, 1, UNKNOWN]).all()
    assert all((data_dir / path).is_file() for path in rows["path"]), "every path names a written image"
    assert all(not str(path).startswith("/") and ".." not in str(path).split("/") for path in rows["path"])
    assert rows["age"].dtype == np.float32 and set(rows["sex"]) <= {"M", "F", ""}
    for patient in np.unique(rows["patient_id"]):
        assert len(set(rows["split"][rows["patient_id"] == patient])) == 1
    assert all(isinstance(vocabulary.shared_name(name, label), str) for label in provenance["classes"])


@pytest.mark.parametrize("name", [n for n in datasets.names() if n != "csv"])
def test_an_empty_folder_names_the_files_each_dataset_expects(tmp_path, name):
    with pytest.raises(DatasetError) as raised:
        datasets.load(name, tmp_path)
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path) in message and "expected" in message


def test_a_folder_of_another_dataset_says_which_one_it_looks_like(tmp_path):
    data_dir, _ = dataset_layouts.padchest(tmp_path)
    with pytest.raises(DatasetError, match=r"expected train.csv or train.csv.gz.*looks like --dataset padchest"):
        datasets.load("chexpert", data_dir)


def test_an_option_the_dataset_does_not_use_is_refused(tmp_path):
    data_dir, _ = dataset_layouts.rsna(tmp_path)
    with pytest.raises(DatasetError, match="rsna does not use --uncertain"):
        datasets.load("rsna", data_dir, Options(uncertain="zeros"))
    with pytest.raises(DatasetError, match="not a registered dataset"):
        datasets.load("chexpret", data_dir)


def test_the_registry_describes_what_each_dataset_expects():
    text = datasets.describe()
    for name in datasets.names():
        assert f"\n{name}\n" in f"\n{text}\n"
    assert "mimic-cxr-2.0.0-split.csv" in text and "no view metadata" in text


# CheXpert ----------------------------------------------------------------------------------

def _chexpert_csv(tmp_path, cells: dict, *, name="train.csv"):
    """Rewrite one cell of the synthetic CheXpert train.csv (row 0 = line 2)."""
    data_dir, _ = dataset_layouts.chexpert(tmp_path)
    frame = pd.read_csv(data_dir / name, dtype=str, keep_default_na=False)
    for (row, column), value in cells.items():
        frame.loc[row, column] = value
    frame.to_csv(data_dir / name, index=False)
    return data_dir


@pytest.mark.parametrize("policy, uncertain, blank", [("mask", UNKNOWN, UNKNOWN), ("zeros", 0, 0), ("ones", 1, 0)])
def test_chexpert_uncertain_and_blank_follow_the_policy(tmp_path, policy, uncertain, blank):
    data_dir = _chexpert_csv(tmp_path, {(0, "Edema"): "-1.0", (0, "Atelectasis"): "", (0, "Pneumonia"): "1.0",
                                        (0, "Cardiomegaly"): "0.0", (0, "No Finding"): ""})
    rows, provenance = datasets.load("chexpert", data_dir, Options(uncertain=policy, views=("PA", "AP", "LATERAL")))
    first = list(rows["image_id"]).index("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    label = dict(zip(provenance["classes"], rows["labels"][first]))
    assert (label["Edema"], label["Atelectasis"], label["Pneumonia"], label["Cardiomegaly"]) == (uncertain, blank, 1, 0)
    assert provenance["uncertain"] == policy


def test_chexpert_no_finding_makes_blank_findings_negative_but_not_devices(tmp_path):
    data_dir = _chexpert_csv(tmp_path, {(0, "No Finding"): "1.0", (0, "Edema"): "", (0, "Support Devices"): ""})
    rows, provenance = datasets.load("chexpert", data_dir)
    first = list(rows["image_id"]).index("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    label = dict(zip(provenance["classes"], rows["labels"][first]))
    assert (label["No Finding"], label["Edema"], label["Support Devices"]) == (1, 0, UNKNOWN)


def test_chexpert_views_test_split_and_paths(tmp_path):
    data_dir = _chexpert_csv(tmp_path, {(2, "AP/PA"): "LL"})
    rows, provenance = datasets.load("chexpert", data_dir)
    assert set(rows["view"]) == {"PA", "AP"} and provenance["views"] == ["PA", "AP"]
    everything, _ = datasets.load("chexpert", data_dir, Options(views=("PA", "AP", "LATERAL", "LL")))
    assert set(everything["view"]) == {"PA", "AP", "LATERAL", "LL"}
    test = everything["image_id"][everything["split"] == "test"]
    assert len(test) == 6 and all("/valid/" in i for i in test)
    assert everything["path"][0].startswith("train/")  # relative to the CheXpert-v1.0-small folder given
    assert set(everything["sex"]) == {"M", "F"} and everything["study_id"][0] == "train/patient00001/study1"


@pytest.mark.parametrize("cells, message", [
    ({(3, "Edema"): "2.0"}, r"train.csv line 5 column 'Edema': value '2.0' is not 1, 0, -1 or blank"),
    ({(3, "Path"): "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"},
     r"train.csv line 5 column 'Path': '.*view1_frontal.jpg' appears twice"),
    ({(1, "Path"): "CheXpert-v1.0-small/train/nobody/study1/view1_frontal.jpg"},
     r"train.csv line 3 column 'Path': .* names no patientNNNNN folder"),
])
def test_chexpert_bad_cells_name_file_line_and_column(tmp_path, cells, message):
    data_dir = _chexpert_csv(tmp_path, cells)
    with pytest.raises(DatasetError, match=message) as raised:
        datasets.load("chexpert", data_dir)
    assert "\n" not in str(raised.value)


def test_chexpert_patient_in_both_official_splits_is_refused(tmp_path):
    data_dir = _chexpert_csv(tmp_path, {(2, "Path"): "CheXpert-v1.0-small/valid/patient00003/study9/view1_frontal.jpg"},
                             name="valid.csv")
    with pytest.raises(DatasetError, match=r"valid.csv line 4 column 'Path': patient patient00003 is also in train.csv"):
        datasets.load("chexpert", data_dir)


def test_a_missing_column_names_file_and_column(tmp_path):
    data_dir, _ = dataset_layouts.chexpert(tmp_path)
    frame = pd.read_csv(data_dir / "train.csv", dtype=str, keep_default_na=False).drop(columns=["Pleural Effusion"])
    frame.to_csv(data_dir / "train.csv", index=False)
    with pytest.raises(DatasetError, match=r"train.csv: missing column 'Pleural Effusion'"):
        datasets.load("chexpert", data_dir)


def test_a_row_with_more_cells_than_the_header_names_its_line(tmp_path):
    """pandas would drop the extra cell with only a warning."""
    data_dir, options = dataset_layouts.own_csv(tmp_path)
    lines = open(options.labels_csv).read().splitlines()
    lines[3] += ",1"
    open(options.labels_csv, "w").write("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"labels.csv.* line 4\b"):
        datasets.load("csv", data_dir, options)



@pytest.mark.parametrize("header, message", [
    ("path,patient_id,split,Effusion,Effusion", r"labels.csv line 1: column 'Effusion' appears twice"),
    ("path,patient_id,split,,Mass", r"labels.csv line 1: column 4 has no name"),
    ("path,patient_id,split,Mass|Nodule,Effusion", r"labels.csv line 1: column 4 is named 'Mass\|Nodule'"),
    ("path,patient_id,split,Effusion,Mass\x1b[2J", r"labels.csv line 1: column 5 is named 'Mass\\x1b\[2J'"),
])
def test_a_label_column_named_twice_badly_or_not_at_all_is_refused(tmp_path, header, message):
    """pandas would rename it (Effusion.1, Unnamed: 3), and the cache would hold a class the file
    never named; a | or an escape sequence would break every table and terminal that shows it."""
    data_dir, options = dataset_layouts.own_csv(tmp_path)
    lines = open(options.labels_csv).read().splitlines()
    open(options.labels_csv, "w").write("\n".join([header] + lines[1:]) + "\n")
    with pytest.raises(DatasetError, match=message):
        datasets.load("csv", data_dir, options)

# MIMIC -------------------------------------------------------------------------------------

def test_mimic_study_labels_reach_every_image_of_the_study_and_splits_are_official(tmp_path):
    data_dir, _ = dataset_layouts.mimic(tmp_path)
    rows, provenance = datasets.load("mimic", data_dir, Options(views=("PA", "LATERAL")))
    labels = pd.read_csv(data_dir / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str, keep_default_na=False)
    for study, group in pd.DataFrame({"study": rows["study_id"], "row": range(len(rows["study_id"]))}).groupby("study"):
        assert len(group) == 2 and (rows["labels"][group["row"].iloc[0]] == rows["labels"][group["row"].iloc[1]]).all()
    edema = labels.set_index("study_id")["Edema"]
    column = provenance["classes"].index("Edema")
    for study, value in zip(rows["study_id"], rows["labels"][:, column]):
        assert value == {"1.0": 1, "0.0": 0}.get(edema[study], UNKNOWN) or (edema[study] == "" and value == 0)
    assert dict(zip(rows["patient_id"], rows["split"])) == {"10000001": "train", "10000002": "train",
                                                             "11000003": "val", "12000004": "test"}
    assert rows["path"][0].startswith("files/p10/p10000001/s")


def test_mimic_image_of_a_study_without_labels_is_unknown_and_a_subject_in_two_splits_is_refused(tmp_path):
    data_dir, _ = dataset_layouts.mimic(tmp_path)
    path = data_dir / "mimic-cxr-2.0.0-chexpert.csv.gz"
    labels = pd.read_csv(path, dtype=str, keep_default_na=False)
    labels.iloc[1:].to_csv(path, index=False)
    rows, provenance = datasets.load("mimic", data_dir)
    missing = rows["study_id"] == labels["study_id"].iloc[0]
    assert missing.sum() == 1 and (rows["labels"][missing] == UNKNOWN).all()
    assert provenance["images_without_study_labels"] == 2  # its PA and its lateral
    split_path = data_dir / "mimic-cxr-2.0.0-split.csv.gz"
    splits = pd.read_csv(split_path, dtype=str)
    splits.loc[3, "split"] = "test"
    splits.to_csv(split_path, index=False)
    with pytest.raises(DatasetError, match=r"split.csv.gz line 5 column 'split': subject 10000001 is in two official splits"):
        datasets.load("mimic", data_dir)


# PadChest ----------------------------------------------------------------------------------

def test_padchest_quirks(tmp_path):
    data_dir, _ = dataset_layouts.padchest(tmp_path)
    path = data_dir / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    extra = frame.iloc[[0, 0, 0, 0]].copy()
    extra["ImageID"] = ["nan.png", "blank.png", "exclude.png", "rnn.png"]
    extra["Labels"] = ["nan", "['']", "['exclude']", "['emphysema']"]
    extra["MethodLabel"] = ["Physician", "Physician", "Physician", "RNN_model"]
    pd.concat([frame, extra]).to_csv(path, index=False)
    rows, provenance = datasets.load("padchest", data_dir, Options(views=("PA", "AP", "LATERAL")))
    assert provenance["rows_dropped"] == {"no annotation": 2, "exclude": 1, "other label method": 1}
    assert "cardiomegaly" in provenance["classes"] and " cardiomegaly" not in provenance["classes"]
    assert "exclude" not in provenance["classes"] and "emphysema" in provenance["classes"]
    by_id = dict(zip(rows["image_id"], range(len(rows["image_id"]))))
    supine = by_id[f"{1:030d}_abc.png"]
    assert rows["view"][supine] == "AP"  # AP_horizontal
    assert rows["path"][supine] == f"54/{1:030d}_abc.png" and rows["path"][0].startswith("0/")
    label = dict(zip(provenance["classes"], rows["labels"][supine]))
    assert label["cardiomegaly"] == 1 and label["pleural effusion"] == 1 and label["nodule"] == 0
    assert rows["age"][0] == 65 and isinstance(rows["patient_id"][0], str)
    everything, all_methods = datasets.load("padchest", data_dir, Options(label_method="all"))
    assert "rnn.png" in set(everything["image_id"]) and all_methods["label_method"] == "all"


@pytest.mark.parametrize("labels, message", [
    ("['a', 3]", r"line 2 column 'Labels': \"\['a', 3\]\" is not a list of finding names"),
    ("__import__('os').system('true')", r"line 2 column 'Labels'.* is not a list of finding names"),
])
def test_padchest_labels_are_parsed_as_literals_never_evaluated(tmp_path, labels, message):
    data_dir, _ = dataset_layouts.padchest(tmp_path)
    path = data_dir / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[0, "Labels"] = labels
    frame.to_csv(path, index=False)
    with pytest.raises(DatasetError, match=message):
        datasets.load("padchest", data_dir)


def test_padchest_duplicate_image_names_its_line(tmp_path):
    data_dir, _ = dataset_layouts.padchest(tmp_path)
    path = data_dir / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    pd.concat([frame, frame.iloc[[2]]]).to_csv(path, index=False)
    with pytest.raises(DatasetError, match=rf"line {len(frame) + 2} column 'ImageID': '{2:030d}_abc.png' appears twice"):
        datasets.load("padchest", data_dir)


# VinDr, RSNA, SIIM -------------------------------------------------------------------------

def test_vindr_physionet_raters_and_official_test(tmp_path):
    data_dir, _ = dataset_layouts.vindr(tmp_path)
    votes = pd.read_csv(data_dir / "annotations/image_labels_train.csv", dtype={"image_id": str})
    rows, provenance = datasets.load("vindr", data_dir)
    any_rows, any_provenance = datasets.load("vindr", data_dir, Options(raters="any"))
    sums = votes.groupby("image_id")[dataset_layouts.VINDR_CLASSES].sum()
    train = ~np.isin(rows["split"], ["test"])
    expected_majority = (sums.loc[rows["image_id"][train]] >= 2).to_numpy().astype(np.uint8)
    expected_any = (sums.loc[rows["image_id"][train]] >= 1).to_numpy().astype(np.uint8)
    assert (rows["labels"][train] == expected_majority).all() and (any_rows["labels"][train] == expected_any).all()
    assert (provenance["raters"], any_provenance["raters"]) == ("majority", "any")
    assert set(rows["image_id"][rows["split"] == "test"]) == {f"{i:032x}" for i in range(6, 9)}
    assert (rows["patient_id"] == rows["image_id"]).all()


def test_vindr_kaggle_majority_counts_distinct_radiologists_not_boxes(tmp_path):
    rows = [["img1", "Cardiomegaly", 3, "R1"], ["img1", "Cardiomegaly", 3, "R1"], ["img1", "No finding", 14, "R2"],
            ["img1", "No finding", 14, "R3"], ["img2", "Cardiomegaly", 3, "R1"], ["img2", "Cardiomegaly", 3, "R2"],
            ["img2", "Aortic enlargement", 0, "R3"]]
    pd.DataFrame(rows, columns=["image_id", "class_name", "class_id", "rad_id"]).to_csv(tmp_path / "train.csv", index=False)
    table, provenance = datasets.load("vindr", tmp_path)
    assert provenance["classes"] == ["Aortic enlargement", "Cardiomegaly", "No finding"]
    label = {i: dict(zip(provenance["classes"], table["labels"][k])) for k, i in enumerate(table["image_id"])}
    assert label["img1"] == {"Aortic enlargement": 0, "Cardiomegaly": 0, "No finding": 1}
    assert label["img2"] == {"Aortic enlargement": 0, "Cardiomegaly": 1, "No finding": 0}
    assert table["path"][0] == "train/img1.dicom"


def test_rsna_counts_a_positive_image_once_and_refuses_disagreeing_rows(tmp_path):
    data_dir, _ = dataset_layouts.rsna(tmp_path)
    rows, _ = datasets.load("rsna", data_dir)
    frame = pd.read_csv(data_dir / "stage_2_train_labels.csv")
    assert len(rows["image_id"]) == frame["patientId"].nunique() == 10
    assert dict(zip(rows["image_id"], rows["labels"][:, 0])) == frame.groupby("patientId")["Target"].max().to_dict()
    frame.loc[len(frame)] = [frame["patientId"].iloc[1], None, None, None, None, 0]
    frame.to_csv(data_dir / "stage_2_train_labels.csv", index=False)
    with pytest.raises(DatasetError, match=r"column 'Target': patientId .* has rows with Target 0 and 1"):
        datasets.load("rsna", data_dir)


def test_siim_ids_keep_their_dots_and_missing_dicoms_are_counted(tmp_path):
    data_dir, _ = dataset_layouts.siim(tmp_path)
    missing = "1.2.276.0.7230010.3.1.4.8323329.99.1517875201.850819"
    with open(data_dir / "train-rle.csv", "a") as handle:
        handle.write(f"{missing},-1\n")
    rows, provenance = datasets.load("siim", data_dir)
    assert provenance["images_without_dicom"] == 1 and missing not in set(rows["image_id"])
    frame = pd.read_csv(data_dir / "train-rle.csv")
    assert set(rows["image_id"]) == set(frame["ImageId"]) - {missing}  # never cut at a dot
    for image_id, path in zip(rows["image_id"], rows["path"]):
        assert path.endswith(f"/{image_id}.dcm")
    positive = frame.groupby("ImageId")[" EncodedPixels"].agg(lambda cells: int((cells != "-1").any()))
    assert dict(zip(rows["image_id"], rows["labels"][:, 0])) == positive.drop(missing).to_dict()


# A user's own CSV --------------------------------------------------------------------------

@pytest.mark.parametrize("bad_path", ["../outside.png", "/etc/passwd", "scans/../../x.png", "C:\\x.png"])
def test_own_csv_paths_that_leave_the_data_folder_are_refused(tmp_path, bad_path):
    data_dir, options = dataset_layouts.own_csv(tmp_path)
    frame = pd.read_csv(options.labels_csv, dtype=str, keep_default_na=False)
    frame.loc[4, "path"] = bad_path
    frame.to_csv(options.labels_csv, index=False)
    with pytest.raises(DatasetError, match=r"labels.csv line 6 column 'path': image path .* leaves the data folder"):
        datasets.load("csv", data_dir, options)


@pytest.mark.parametrize("column, row, value, message", [
    ("split", 2, "test", r"line 5 column 'split': patient p1 is in both test and train"),
    ("split", 0, "holdout", r"line 2 column 'split': 'holdout' is not train, val or test"),
    ("Mass", 3, "yes", r"line 5 column 'Mass': value 'yes' is not 1, 0, -1 or blank"),
    ("path", 5, "scans/0.png", r"line 7 column 'path': 'scans/0.png' appears twice"),
])
def test_own_csv_bad_cells_name_line_and_column(tmp_path, column, row, value, message):
    data_dir, options = dataset_layouts.own_csv(tmp_path)
    frame = pd.read_csv(options.labels_csv, dtype=str, keep_default_na=False)
    frame.loc[row, column] = value
    frame.to_csv(options.labels_csv, index=False)
    with pytest.raises(DatasetError, match=message):
        datasets.load("csv", data_dir, options)


def test_own_csv_without_split_is_split_by_patient_and_labels_follow_the_policy(tmp_path):
    data_dir, options = dataset_layouts.own_csv(tmp_path)
    frame = pd.read_csv(options.labels_csv, dtype=str, keep_default_na=False).drop(columns=["split"])
    frame.to_csv(options.labels_csv, index=False)
    rows, provenance = datasets.load("csv", data_dir, Options(labels_csv=options.labels_csv, uncertain="ones", seed=3))
    assert provenance["split_source"].startswith("random patient-wise") and provenance["classes"] == ["Effusion", "Mass"]
    assert rows["labels"][:4, 0].tolist() == [1, 0, 1, 0]  # 1, 0, -1 -> ones, blank -> 0
    assert provenance["uncertain"] == "ones"


# The vocabulary ----------------------------------------------------------------------------

def test_vocabulary_maps_each_datasets_spelling_onto_one_name():
    assert vocabulary.shared_name("chexpert", "Pleural Effusion") == "Effusion"
    assert vocabulary.shared_name("padchest", "pleural effusion") == "Effusion"
    assert vocabulary.shared_name("vindr", "Pleural effusion") == "Effusion"
    assert vocabulary.shared_name("nih", "Effusion") == "Effusion"
    assert vocabulary.shared_name("vindr", "Nodule/Mass") == "Nodule/Mass"  # no one-to-one counterpart
    assert set().union(*(set(aliases.values()) for aliases in vocabulary.ALIASES.values())) <= set(vocabulary.SHARED)
    assert set(vocabulary.ALIASES) <= set(datasets.names())
    assert "Pleural Effusion -> Effusion" in vocabulary.describe("chexpert", ["Pleural Effusion", "Pleural Other"])


def test_nih_metadata_through_the_registry_and_impossible_ages_missing(tmp_path):
    dataset_layouts.write_dataset(tmp_path, patients=4, images_per_patient=2, size=16, csv_format="2017")
    csv = tmp_path / "Data_Entry_2017.csv"
    lines = csv.read_text().splitlines()
    fields = lines[1].split(",")
    fields[4] = "412Y"  # the 2017 file holds a few such ages
    lines[1] = ",".join(fields)
    csv.write_text("\n".join(lines) + "\n")
    rows, _ = datasets.load("nih", tmp_path)
    first = list(rows["image_id"]).index(fields[0])
    assert np.isnan(rows["age"][first]) and (~np.isnan(np.delete(rows["age"], first))).all()
    assert set(rows["sex"]) <= {"M", "F"} and set(rows["view"]) <= {"PA", "AP"} and rows["study_id"][first] == "000"
