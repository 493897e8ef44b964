"""heads.subgroups on a version-2 cache whose metadata carries a planted gap: scores are noisier
for women than for men, so each group's AUC is known in advance; the report must find the gap,
its intervals must cover the planted AUCs, and every figure must be recomputable."""
import argparse
import json
import types

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import cache
from cache.store import create_cache
from cache.synthetic import known_auc
from heads.operating import write_operating_report
from heads.subgroups import age_bands, parse_by, subgroup_difference, subgroups

CLASSES = ["Effusion", "Nodule", "Hernia"]
SEPARATION = 1.5
NOISE = {"M": 1.0, "F": 2.0, "": 1.0}  # a logit's noise: AUC = Phi(separation / (noise * sqrt 2))
PLANTED_AUC = {sex: known_auc(SEPARATION / noise) for sex, noise in NOISE.items()}
UNKNOWN = 255
N_LATERAL = 3


def write_cache(path, *, rows: dict, seed: int) -> None:
    """A version-2 cache (no features needed): two images per patient; sex and age per patient,
    some missing; view per image, with a few laterals; 5% of labels unknown."""
    rng = np.random.default_rng(seed)
    n_rows = sum(rows.values())
    split = np.concatenate([np.full(n, name, dtype=object) for name, n in rows.items()])
    patient = np.arange(n_rows) // 2
    n_patients = patient[-1] + 1
    sex = rng.choice(np.array(["M", "F", ""], dtype=object), size=n_patients, p=[0.49, 0.49, 0.02])[patient]
    age = rng.uniform(1, 99, n_patients).astype(np.float32)
    age[rng.random(n_patients) < 0.03] = np.nan
    view = np.where(rng.random(n_rows) < 0.6, "PA", "AP").astype(object)
    view[np.flatnonzero(split == "test")[:N_LATERAL]] = "LATERAL"
    labels = (rng.random((n_rows, len(CLASSES))) < 0.3).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.05] = UNKNOWN
    table = {"image_id": [f"img{i:06d}.png" for i in range(n_rows)], "patient_id": [f"p{p:05d}" for p in patient],
             "labels": labels, "split": split, "sex": sex, "age": age[patient], "view": view,
             "study_id": np.full(n_rows, "", dtype=object)}
    attrs = {"classes": CLASSES, "backbone": "synthetic-gaussian", "weights": "none", "weights_sha256": "",
             "image_size": 0, "precision": "fp32", "preprocessing": {"none": True}, "val_fraction": 0.0,
             "split_seed": seed, "split_source": "synthetic", "source_csv": "", "source_csv_sha256": "",
             "split_lists_sha256": "", "dataset": "csv", "views": "n/a", "uncertain": "n/a", "raters": "n/a",
             "label_method": "n/a"}
    create_cache(path, table=table, feature_dim=4, feature_dtype="float32", attrs=attrs)


def scored_split(path, name, *, seed):
    """A split of the cache as the run writer holds it (labels NaN where unknown), with scores
    that rank positives higher, noisier for F; and its rows' metadata."""
    table, metadata = cache.read_table(path), cache.read_metadata(path)
    rows = table["split"] == name
    labels = table["labels"][rows].astype(np.float64)
    labels[labels == UNKNOWN] = np.nan
    noise = np.array([NOISE[s] for s in metadata["sex"][rows]])[:, None]
    logits = SEPARATION * np.nan_to_num(labels) + noise * np.random.default_rng(seed).standard_normal(labels.shape)
    scores = (1 / (1 + np.exp(-logits))).astype(np.float32)
    split = types.SimpleNamespace(labels=labels, scores=scores, patient_ids=table["patient_id"][rows],
                                  image_ids=table["image_id"][rows])
    return split, {key: values[rows] for key, values in metadata.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("subgroups")
    write_cache(root / "features.h5", rows={"train": 10, "val": 1500, "test": 4000}, seed=0)
    val, _ = scored_split(root / "features.h5", "val", seed=1)
    test, metadata = scored_split(root / "features.h5", "test", seed=2)
    out = root / "run"
    out.mkdir()
    summary = write_operating_report(out, classes=CLASSES, val=val, test=test, metadata_test=metadata,
                                     by=("sex", "age", "view"), n_resamples=300, seed=0)
    return types.SimpleNamespace(out=out, summary=summary, test=test, metadata=metadata)


def test_age_bands_have_closed_lower_ends_and_missing_ages_form_no_band():
    ages = [0, 17.99, 18, 39.5, 40, 79.9, 80, 104, float("nan"), -1]
    assert list(age_bands(ages)) == ["0-17", "0-17", "18-39", "18-39", "40-59", "60-79", "80+", "80+", "", ""]


def test_groups_come_from_the_cache_metadata_and_missing_values_are_counted(run):
    groups = subgroups(run.metadata, ("sex", "age", "view"))
    n_rows = len(run.test.labels)
    assert list(groups["sex"]["groups"]) == ["F", "M"]
    assert groups["sex"]["missing"] == (run.metadata["sex"] == "").sum() > 0
    assert groups["age"]["missing"] == np.isnan(run.metadata["age"]).sum() > 0
    assert list(groups["age"]["groups"]) == ["0-17", "18-39", "40-59", "60-79", "80+"]
    for attribute in ("sex", "age", "view"):
        sizes = sum(mask.sum() for mask in groups[attribute]["groups"].values())
        assert sizes + groups[attribute]["missing"] == n_rows
    assert run.summary["subgroups"]["missing"] == {a: groups[a]["missing"] for a in ("sex", "age", "view")}
    assert "missing: " in (run.out / "subgroups.md").read_text()


def test_the_planted_sex_gap_is_found_and_the_intervals_cover_the_planted_aucs(run):
    table = pd.read_csv(run.out / "subgroups.csv")
    sex = table[(table["attribute"] == "sex") & (table["class"] != "mean")]
    for _, row in sex.iterrows():
        assert row["auc_ci_low"] <= PLANTED_AUC[row["group"]] <= row["auc_ci_high"], row.to_dict()
    gaps = pd.read_csv(run.out / "subgroup_gaps.csv")
    by_sex = gaps[gaps["attribute"] == "sex"]
    assert len(by_sex) == len(CLASSES) + 1 and by_sex["gap"].all()  # each class and the mean
    for _, row in by_sex.iterrows():
        planted_difference = PLANTED_AUC[row["group"]] - PLANTED_AUC[row["reference"]]
        assert row["ci_low"] <= planted_difference <= row["ci_high"], row.to_dict()
        assert np.sign(row["difference"]) == np.sign(planted_difference)
    view_mean = gaps[(gaps["attribute"] == "view") & (gaps["class"] == "mean")]
    assert not view_mean["gap"].any()  # views were drawn independently of the noise
    flagged = {(g["attribute"], g["class"]) for g in run.summary["subgroups"]["gaps"]}
    assert {("sex", c) for c in CLASSES + ["mean"]} <= flagged


def test_fnr_uses_the_whole_validation_threshold_and_every_group_figure_is_recomputable(run):
    thresholds = json.loads((run.out / "thresholds.json").read_text())["thresholds"]
    table = pd.read_csv(run.out / "subgroups.csv")
    groups = pd.read_csv(run.out / "subgroup_rows.csv", keep_default_na=False, dtype=str)
    assert list(groups["image_id"]) == list(run.test.image_ids)
    labels, scores = run.test.labels, run.test.scores.astype(np.float64)
    checked = 0
    for _, row in table[table["class"] != "mean"].iterrows():
        c = CLASSES.index(row["class"])
        assert row["threshold"] == thresholds[row["class"]]  # one per class, not per group
        in_group = (groups[row["attribute"]] == row["group"]).to_numpy() & ~np.isnan(labels[:, c])
        y, s = labels[in_group, c], scores[in_group, c]
        assert (row["n_pos"], row["n_neg"]) == ((y == 1).sum(), (y == 0).sum())
        if not row["scorable"]:
            continue
        assert row["auc"] == pytest.approx(roc_auc_score(y, s), rel=1e-5)
        called = s >= thresholds[row["class"]]
        assert row["fnr"] == pytest.approx((~called[y == 1]).mean(), rel=1e-5)
        assert row["sensitivity"] == pytest.approx(called[y == 1].mean(), rel=1e-5)
        checked += 1
    assert checked >= 2 * len(CLASSES) + 5 * len(CLASSES)


def test_a_group_too_small_to_score_a_class_reports_it_not_scorable(run):
    table = pd.read_csv(run.out / "subgroups.csv")
    lateral = table[(table["attribute"] == "view") & (table["group"] == "LATERAL")]
    assert lateral["n_rows"].iloc[0] == N_LATERAL
    per_class = lateral[lateral["class"] != "mean"]
    assert not per_class["scorable"].all() and per_class.loc[~per_class["scorable"], "auc"].isna().all()
    mean = lateral[lateral["class"] == "mean"].iloc[0]
    assert "not scorable" in mean["note"]
    assert "not scorable" in (run.out / "subgroups.md").read_text()


def test_the_difference_of_two_groups_is_unpaired(run):
    labels, scores, patients = run.test.labels, run.test.scores, run.test.patient_ids
    women = run.metadata["sex"] == "F"
    same = subgroup_difference(labels, scores, patients, women, women, n_resamples=200)
    mean = same[-1]
    assert mean["class"] is None and mean["difference"] == 0
    # a paired bootstrap of a group against itself would give [0, 0]; independent draws do not
    assert mean["ci"][0] < -0.005 and mean["ci"][1] > 0.005 and not mean["gap"]
    men = run.metadata["sex"] == "M"
    forward = subgroup_difference(labels, scores, patients, women, men, n_resamples=200)
    backward = subgroup_difference(labels, scores, patients, men, women, n_resamples=200)
    assert [e["difference"] for e in forward] == pytest.approx([-e["difference"] for e in backward])
    assert all(e["gap"] for e in forward)


def test_by_names_known_attributes_and_needs_metadata(run, tmp_path):
    assert parse_by("age, sex,age") == ("age", "sex")
    with pytest.raises(argparse.ArgumentTypeError, match="sex, age, view"):
        parse_by("sex,height")
    whole_cache = {name: np.concatenate([values, values[:5]]) for name, values in run.metadata.items()}
    for metadata, by in ((None, ("sex",)), (run.metadata, ("sex", "height")), (whole_cache, ("age",))):
        with pytest.raises(ValueError, match="metadata"):
            write_operating_report(tmp_path, classes=CLASSES, val=run.test, test=run.test, metadata_test=metadata,
                                   by=by, n_resamples=10)
    assert not any(tmp_path.iterdir())  # refused before anything was written
