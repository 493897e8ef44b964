"""heads.expert against the real google2019 file torchxrayvision ships: its images, their
official splits (checked against NIH's own lists when shared/nih holds them), the mapping; and
on a small HDF5 cache whose images are a sample of the file's, with planted scores whose AUCs
against the expert and the NLP labels are known. Bad files are refused in one line."""
import gzip
import importlib.util

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cache.schema import CLASSES
from cache.store import PartWriter, create_cache, exclusive_lock, merge_parts, read_attrs
from heads import expert
from heads.data import load_head_data
from heads.expert import FINDINGS, NIH_MAPPING, ExpertLabelsError, expert_reference, load_google2019

NODULE, MASS, PNEUMOTHORAX = (CLASSES.index(name) for name in ("Nodule", "Mass", "Pneumothorax"))


@pytest.fixture(scope="module")
def experts():
    if importlib.util.find_spec("torchxrayvision") is None:
        pytest.skip("torchxrayvision is not installed: the google2019 file comes with it (the [xrv] extra)")
    return load_google2019()


@pytest.fixture(scope="module")
def raw_file(experts):
    """The real file as text cells, to write altered copies of."""
    return pd.read_csv(experts.attrs["path"], dtype=str, keep_default_na=False)


# --- the real file ---------------------------------------------------------------------------

def test_real_file_holds_4376_nih_images_once_each(experts, raw_file):
    assert len(experts) == 4376 and experts["image_id"].is_unique
    assert list(experts["image_id"]) == list(raw_file["Image Index"])
    assert experts["image_id"].str.fullmatch(r"\d{8}_\d{3}\.png").all()


def test_real_file_splits_1962_official_test_and_2414_train_val(experts):
    assert experts["official_split"].value_counts().to_dict() == {"train_val": 2414, "test": 1962}


def test_real_file_splits_agree_with_nih_official_lists(experts, nih_metadata):
    official_test = set((nih_metadata / "test_list.txt").read_text().split())
    train_val = set((nih_metadata / "train_val_list.txt").read_text().split())
    in_test = experts["image_id"].isin(official_test)
    assert (in_test == (experts["official_split"] == "test")).all()
    assert experts.loc[~in_test, "image_id"].isin(train_val).all()
    patients = experts["image_id"].str[:8]
    assert not set(patients[in_test]) & set(patients[~in_test]), "a patient in both the file's test and others"


def test_real_file_labels_are_its_yes_and_no(experts, raw_file):
    for finding in FINDINGS:
        assert ((raw_file[finding] == "YES") == (experts[finding] == 1)).all()
        assert ((raw_file[finding] == "NO") == (experts[finding] == 0)).all()
    positives = {finding: int(experts[finding].sum()) for finding in FINDINGS}
    assert positives == {"Fracture": 186, "Pneumothorax": 238, "Airspace opacity": 2166, "Nodule or mass": 605}


def test_mapping_names_every_finding_and_only_nih_classes():
    assert set(NIH_MAPPING) == set(FINDINGS)
    assert NIH_MAPPING["Pneumothorax"].nih_classes == ("Pneumothorax",)
    assert NIH_MAPPING["Nodule or mass"].nih_classes == ("Nodule", "Mass")
    for finding in ("Airspace opacity", "Fracture"):
        assert NIH_MAPPING[finding].nih_classes == () and NIH_MAPPING[finding].why.startswith("not mapped")
    assert all(name in CLASSES for mapping in NIH_MAPPING.values() for name in mapping.nih_classes)


# --- a synthetic NIH cache of the file's images, scores planted --------------------------------

def planted_rows(experts, image_ids, *, seed, reverse=False):
    """(scores, NLP labels) for `image_ids`: the Pneumothorax score and the higher of the Nodule
    and Mass scores separate the expert labels perfectly (reversed: they rank every expert
    positive last); each positive has a high score in one of Nodule or Mass only, so neither
    alone separates. NLP labels are the expert ones with 15% flipped."""
    rng = np.random.default_rng(seed)
    truth = experts.set_index("image_id").loc[image_ids].fillna(0)  # a finding not given: any NLP label
    n = len(image_ids)
    scores = rng.uniform(0.0, 0.4, (n, len(CLASSES)))
    high = lambda: rng.uniform(0.6, 0.9, n)
    pneumothorax, nodule_or_mass = truth["Pneumothorax"].to_numpy() == 1, truth["Nodule or mass"].to_numpy() == 1
    as_nodule = rng.random(n) < 0.5
    if reverse:
        pneumothorax, nodule_or_mass = ~pneumothorax, ~nodule_or_mass
    scores[:, PNEUMOTHORAX] = np.where(pneumothorax, high(), scores[:, PNEUMOTHORAX])
    scores[:, NODULE] = np.where(nodule_or_mass & as_nodule, high(), scores[:, NODULE])
    scores[:, MASS] = np.where(nodule_or_mass & ~as_nodule, high(), scores[:, MASS])
    labels = (rng.random((n, len(CLASSES))) < 0.1).astype(np.uint8)
    flip = lambda values: np.where(rng.random(n) < 0.15, 1 - values, values)
    labels[:, PNEUMOTHORAX] = flip(truth["Pneumothorax"].to_numpy())
    labels[:, NODULE] = flip(truth["Nodule or mass"].to_numpy() * as_nodule)
    labels[:, MASS] = truth["Nodule or mass"].to_numpy() * ~as_nodule
    return scores, labels


def sample_ids(experts, split, n, seed):
    ids = experts.loc[experts["official_split"] == split, "image_id"].to_numpy()
    return np.sort(np.random.default_rng(seed).choice(ids, n, replace=False))


@pytest.fixture(scope="module")
def nih_like_cache(experts, tmp_path_factory):
    """A finished HDF5 cache: 500 of the file's official-test images as its test split, 400 of
    its train/val images as train and val (by patient), scored in reverse of the expert labels
    so that any of them in a test figure would pull its AUC below 1."""
    test_ids, other_ids = sample_ids(experts, "test", 500, 1), sample_ids(experts, "train_val", 400, 2)
    test_scores, test_labels = planted_rows(experts, test_ids, seed=3)
    other_scores, other_labels = planted_rows(experts, other_ids, seed=4, reverse=True)
    image_ids = np.concatenate([test_ids, other_ids])
    patients = np.array([int(image_id[:8]) for image_id in image_ids])
    split = np.where(np.arange(len(image_ids)) < len(test_ids), "test", np.where(patients % 3, "train", "val"))
    path = tmp_path_factory.mktemp("expert") / "nih.h5"
    write_cache(path, image_ids=image_ids, patients=patients, labels=np.concatenate([test_labels, other_labels]),
                split=split)
    scores = dict(zip(image_ids, np.concatenate([test_scores, other_scores])))
    return path, scores, test_ids, test_labels, test_scores


def write_cache(path, *, image_ids, patients, labels, split, dim=8):
    table = {"image_id": list(image_ids), "patient_id": patients, "labels": labels, "split": split.astype(object)}
    attrs = {"classes": list(CLASSES), "backbone": "synthetic", "weights": "none", "weights_sha256": "",
             "image_size": 0, "precision": "fp32", "preprocessing": {"none": True}, "val_fraction": 0.0,
             "split_seed": 0, "split_source": "test_expert", "source_csv": "", "source_csv_sha256": "",
             "split_lists_sha256": ""}
    create_cache(path, table=table, feature_dim=dim, feature_dtype="float32", attrs=attrs)
    writer = PartWriter(path, fingerprint=read_attrs(path)["fingerprint"])
    features = np.random.default_rng(0).standard_normal((len(image_ids), dim)).astype(np.float32)
    writer.write(rows=np.arange(len(image_ids)), features=features)
    with exclusive_lock(path):
        merge_parts(path)


def score_cache(experts, cache_path, scores, **options):
    """expert_reference on every done row of the cache, as heads.evaluate calls it."""
    data = load_head_data(cache_path)
    splits = list(data.splits.values())
    image_ids = np.concatenate([s.image_ids for s in splits])
    return expert_reference(
        experts, image_ids=image_ids, patient_ids=np.concatenate([s.patient_ids for s in splits]),
        splits=np.concatenate([np.full(len(s), s.name) for s in splits]), classes=data.classes,
        scores=np.stack([scores[i] for i in image_ids]), nlp_labels=np.concatenate([s.labels.numpy() for s in splits]),
        cache_test_is_official=data.official_nih, n_resamples=200, **options)


def test_planted_scores_come_out_as_planted_on_official_test_images_only(experts, nih_like_cache):
    path, scores, test_ids, test_labels, test_scores = nih_like_cache
    reference = score_cache(experts, path, scores)
    by_finding = {f.finding: f for f in reference.findings}
    assert set(by_finding) == {"Pneumothorax", "Nodule or mass"}
    assert set(reference.not_evaluated) == {"Airspace opacity", "Fracture"}
    assert sorted(reference.rows["image_id"]) == list(test_ids)  # no train/val image in the test figure
    truth = experts.set_index("image_id").loc[test_ids]
    nlp_nodule_or_mass = np.maximum(test_labels[:, NODULE], test_labels[:, MASS])
    planted = {"Pneumothorax": (test_labels[:, PNEUMOTHORAX], test_scores[:, PNEUMOTHORAX]),
               "Nodule or mass": (nlp_nodule_or_mass, test_scores[:, [NODULE, MASS]].max(axis=1))}
    for finding, (nlp, score) in planted.items():
        result = by_finding[finding]
        assert result.n_images == 500 and result.expert_positive == int(truth[finding].sum())
        assert result.expert_auc == 1.0 and result.expert_ci == [1.0, 1.0]
        assert result.nlp_auc == pytest.approx(roc_auc_score(nlp, score), abs=1e-12) and result.nlp_auc < 0.95
        assert result.nlp_ci[0] <= result.nlp_auc <= result.nlp_ci[1]
        assert result.difference_ci[0] > 0
    # neither NIH class alone separates the expert "Nodule or mass": the max is what scores it
    assert roc_auc_score(truth["Nodule or mass"], test_scores[:, NODULE]) < 0.9
    notes = " ".join(reference.notes)
    assert "1962 in NIH's official test list and 2414 in the official train/val list" in notes
    assert "500 of the official-test images are in the cache's test split and scored" in notes
    assert "1462 official-test images are not among the cache rows given" in notes


def test_every_number_is_recomputable_from_the_rows(experts, nih_like_cache):
    path, scores, *_ = nih_like_cache
    reference = score_cache(experts, path, scores)
    for result in reference.findings:
        rows = reference.rows
        for kind, auc in (("expert", result.expert_auc), ("nlp", result.nlp_auc)):
            assert roc_auc_score(rows[f"{kind}_{result.finding}"], rows[f"score_{result.finding}"]) == pytest.approx(auc)
    assert "| Nodule or mass | max(Nodule, Mass) | 500 (" in reference.markdown()
    assert reference.to_dict()["findings"][0]["expert_auc"] == 1.0


def arrays_for(experts, image_ids, split, *, seed=5, reverse=False):
    scores, labels = planted_rows(experts, image_ids, seed=seed, reverse=reverse)
    return {"image_ids": image_ids, "patient_ids": [int(i[:8]) for i in image_ids], "splits": split,
            "classes": list(CLASSES), "scores": scores, "nlp_labels": labels.astype(float)}


def test_a_cache_split_that_disagrees_with_the_official_one_is_never_scored_as_test(experts):
    """The cache holds 30 of the file's train/val images in its test split and 30 of its
    official-test images in train: neither set is scored, each is counted."""
    test_ids, other_ids = sample_ids(experts, "test", 300, 6), sample_ids(experts, "train_val", 30, 7)
    image_ids = np.concatenate([test_ids, other_ids])
    split = np.where(np.arange(len(image_ids)) < 270, "test", "train")
    split[300:] = "test"
    clean = arrays_for(experts, image_ids[:270], split[:270])
    moved = arrays_for(experts, image_ids[270:], split[270:], reverse=True)
    arrays = {key: np.concatenate([clean[key], moved[key]]) if key != "classes" else clean[key] for key in clean}
    reference = expert_reference(experts, **arrays, cache_test_is_official=True, n_resamples=50)
    assert sorted(reference.rows["image_id"]) == sorted(test_ids[:270])
    assert [f.expert_auc for f in reference.findings] == [1.0, 1.0]
    notes = " ".join(reference.notes)
    assert "30 official-test images are in the cache's train or val split, not scored" in notes
    assert ("30 images the file puts in the official train/val list are in the cache's test split, not scored "
            "(the file and test_list.txt disagree on them)") in notes


def test_a_finding_without_a_known_positive_is_not_scorable_not_half(experts):
    negatives = experts[(experts["official_split"] == "test") & (experts["Pneumothorax"] == 0)]["image_id"]
    image_ids = np.sort(negatives.to_numpy()[:200])
    reference = expert_reference(experts, **arrays_for(experts, image_ids, "test"), n_resamples=50)
    pneumothorax = reference.findings[0]
    assert pneumothorax.finding == "Pneumothorax" and pneumothorax.expert_auc is None
    assert np.isnan(pneumothorax.expert_ci).all() and np.isnan(pneumothorax.difference_ci).all()
    assert "| Pneumothorax | Pneumothorax | 200 (" in reference.markdown()
    assert "not scorable" in reference.markdown()


def test_a_run_without_a_mapped_class_lists_the_finding_as_not_evaluated(experts):
    image_ids = sample_ids(experts, "test", 200, 8)
    arrays = arrays_for(experts, image_ids, "test")
    keep = [c for c, name in enumerate(CLASSES) if name != "Mass"]
    arrays.update(classes=[CLASSES[c] for c in keep], scores=arrays["scores"][:, keep],
                  nlp_labels=arrays["nlp_labels"][:, keep])
    reference = expert_reference(experts, **arrays, n_resamples=50)
    assert [f.finding for f in reference.findings] == ["Pneumothorax"]
    assert reference.not_evaluated["Nodule or mass"] == "the run has no Mass score"


def test_no_official_test_image_in_the_cache_is_one_line(experts):
    image_ids = sample_ids(experts, "train_val", 100, 9)
    with pytest.raises(ExpertLabelsError, match="none of the 1962 official-test images") as err:
        expert_reference(experts, **arrays_for(experts, image_ids, "test"), n_resamples=50)
    assert "\n" not in str(err.value)


# --- files given with --labels-csv --------------------------------------------------------------

def write_copy(raw_file, path, rows=40, change=None):
    frame = raw_file.head(rows).copy()
    if change:
        frame = change(frame)
    frame.to_csv(path, index=False)
    return path


def test_an_empty_cell_is_a_finding_not_given_and_left_out(raw_file, tmp_path):
    test_rows = raw_file.index[raw_file["Set Id"] == "test"][:60]

    def blank(frame):
        frame.loc[test_rows[:5], "Pneumothorax"] = ""
        return frame
    path = write_copy(raw_file, tmp_path / "blank.csv.gz", rows=test_rows[-1] + 1, change=blank)
    experts = load_google2019(path)
    assert experts["Pneumothorax"].isna().sum() == 5 and experts["Nodule or mass"].notna().all()
    image_ids = experts["image_id"].to_numpy()[test_rows]
    reference = expert_reference(experts, **arrays_for(experts, image_ids, "test"), n_resamples=50)
    assert reference.findings[0].labels_unknown == 5 and reference.findings[0].n_images == 55
    assert reference.findings[1].n_images == 60


def test_a_file_without_set_id_takes_the_split_of_an_official_cache_only(raw_file, experts, tmp_path):
    path = write_copy(raw_file, tmp_path / "no_split.csv", rows=len(raw_file),
                      change=lambda frame: frame.drop(columns="Set Id"))
    unsplit = load_google2019(path)
    assert (unsplit["official_split"] == "").all()
    image_ids = sample_ids(experts, "test", 100, 10)
    arrays = arrays_for(experts, image_ids, "test")
    with pytest.raises(ExpertLabelsError, match="no 'Set Id' column and the cache's test split is not"):
        expert_reference(unsplit, **arrays, n_resamples=50)
    reference = expert_reference(unsplit, **arrays, cache_test_is_official=True, n_resamples=50)
    assert len(reference.rows) == 100
    assert "no Set Id column; the 100 in the cache's test split (NIH's official test_list.txt)" in reference.notes[0]


def set_cell(column, row, value):
    def change(frame):
        frame.loc[row, column] = value(frame) if callable(value) else value
        return frame
    return change


BAD_FILES = {
    "missing column": (lambda frame: frame.drop(columns="Pneumothorax"), "no column 'Pneumothorax'"),
    "bad value": (set_cell("Fracture", 3, "MAYBE"), "line 5, column 'Fracture': 'MAYBE' is not YES, NO or empty"),
    "bad split": (set_cell("Set Id", 7, "train"), "line 9, column 'Set Id': 'train' is not one of test, val"),
    "repeated image": (set_cell("Image Index", 10, lambda frame: frame.loc[2, "Image Index"]),
                       "line 12, column 'Image Index': 00000032_002.png is already on line 4"),
    "column twice": (lambda frame: pd.concat([frame, frame[["Fracture"]]], axis=1),
                     "the header names column 'Fracture' twice"),
    "not an NIH id": (set_cell("Image Index", 0, "patient1.jpg"),
                      "line 2, column 'Image Index': 'patient1.jpg' is not an NIH image id"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_is_one_line_naming_file_line_and_column(raw_file, tmp_path, case):
    change, message = BAD_FILES[case]
    path = write_copy(raw_file, tmp_path / "labels.csv", change=change)
    with pytest.raises(ExpertLabelsError) as err:
        load_google2019(path)
    assert str(err.value).startswith(f"{path}") and message in str(err.value) and "\n" not in str(err.value)


def test_a_file_that_is_not_a_csv_or_not_there_is_one_line(tmp_path):
    garbage = tmp_path / "labels.csv.gz"
    with gzip.open(garbage, "wb") as handle:
        handle.write(b'"a,b\n' + bytes(range(256)) * 4)
    for path, message in ((garbage, "cannot be read as a CSV"), (tmp_path / "absent.csv", "no such file")):
        with pytest.raises(ExpertLabelsError, match=message) as err:
            load_google2019(path)
        assert "\n" not in str(err.value)


def test_a_short_row_is_refused_not_read_as_findings_not_given(raw_file, tmp_path):
    path = write_copy(raw_file, tmp_path / "labels.csv", rows=3)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines[:2], "", lines[2].rsplit(",", 3)[0]]) + "\n")  # a blank line, then 13 cells
    with pytest.raises(ExpertLabelsError, match=r"labels.csv, line 4: 13 cells where the header has 16"):
        load_google2019(path)


def test_without_torchxrayvision_the_default_file_names_both_ways_out(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(expert.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchxrayvision" else real_find_spec(name, *a))
    with pytest.raises(ExpertLabelsError) as err:
        load_google2019()
    assert "--labels-csv" in str(err.value) and "[xrv]" in str(err.value)


def test_heads_evaluate_labels_google2019_scores_a_run_on_official_test_images_only(experts, nih_like_cache,
                                                                                     tmp_path):
    """The command a user runs: heads.train on the NIH-like cache, then heads.evaluate --labels
    google2019 writes the expert table beside the evaluation; every image it scores is in the
    official test list, and every AUC recomputes from expert_rows.csv."""
    import json

    from conftest import call_main

    path, _, test_ids, *_ = nih_like_cache
    call_main("heads.train", "--cache", path, "--out", tmp_path / "run", "--max-epochs", 2, "--bootstrap", 20,
              "--device", "cpu", "--precision", "fp32", check_rc=0)
    out = tmp_path / "expert"
    result = call_main("heads.evaluate", tmp_path / "run", "--cache", path, "--labels", "google2019", "--out", out,
                       "--bootstrap", 50, check_rc=0)
    assert "against Google's expert labels" in result.stdout and "| Pneumothorax |" in result.stdout
    rows = pd.read_csv(out / "expert_rows.csv", dtype={"image_id": str})
    official_test = set(experts.loc[experts["official_split"] == "test", "image_id"])
    assert len(rows) == len(test_ids) and set(rows["image_id"]) <= official_test
    recorded = {f["finding"]: f for f in json.loads((out / "expert.json").read_text())["findings"]}
    for finding, figures in recorded.items():
        assert roc_auc_score(rows[f"expert_{finding}"], rows[f"score_{finding}"]) == pytest.approx(figures["expert_auc"])
    assert set(recorded) == {"Pneumothorax", "Nodule or mass"}
    refused = call_main("heads.evaluate", tmp_path / "run", "--cache", path, "--labels-csv", "x.csv",
                        "--out", tmp_path / "no", check_rc=2)
    assert "--labels google2019" in refused.stderr and not (tmp_path / "no").exists()
