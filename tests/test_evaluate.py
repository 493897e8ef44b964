"""heads.evaluate: a run scored on another cache. Its own cache gives back its own predictions,
classes meet through the shared vocabulary, a planted shift shows at its planted size, unknown
labels are left out per class, the target's train and val rows play no part, and heads.compare
reads two encoders' evaluations as runs and gives their paired difference."""
import json
import math
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import cache
from cache.outdir import folder_kind
from conftest import call_main
from heads.external import score_known
from shifted_caches import planted_auc, write_dataset_cache

FAST = ["--lr", "0.05", "--max-epochs", "20", "--patience", "3", "--precision", "fp32", "--device", "cpu", "--bootstrap", "100"]
SEPARATION = {"encoder-a": 2.0, "encoder-b": 1.0}
ROTATED = math.pi / 3  # CheXpert's Cardiomegaly: heads trained elsewhere read cos(60 deg) = half its signal


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """NIH and CheXpert caches under two encoders (same rows and labels), runs on NIH's, and
    caches that must be refused or handled: other classes only, unknown labels."""
    root = tmp_path_factory.mktemp("evaluate")
    for encoder, separation in SEPARATION.items():
        write_dataset_cache(root / f"nih-{encoder}.h5", dataset="nih", separation=separation, weights=encoder)
        write_dataset_cache(root / f"chexpert-{encoder}.h5", dataset="chexpert", seed=1, separation=separation,
                            weights=encoder, rotate={"Cardiomegaly": ROTATED})
        call_main("heads.train", "--cache", root / f"nih-{encoder}.h5", "--out", root / f"run-{encoder}",
                  "--name", f"nih-{encoder}", *FAST, check_rc=0)
    write_dataset_cache(root / "unknown.h5", dataset="chexpert", seed=3, weights="encoder-a", unknown=0.25)
    write_dataset_cache(root / "unrelated.h5", dataset="padchest", classes=["scoliosis", "kyphosis"], seed=4,
                        weights="encoder-a")
    return root


def evaluate(world, run, target, out, *extra, check_rc=0):
    return call_main("heads.evaluate", world / run, "--cache", world / target, "--out", world / out,
                     "--bootstrap", "200", *extra, check_rc=check_rc)


def test_a_run_scored_on_its_own_cache_gives_back_its_test_predictions(world):
    evaluate(world, "run-encoder-a", "nih-encoder-a.h5", "own")
    saved = pd.read_csv(world / "run-encoder-a" / "predictions_test.csv")
    again = pd.read_csv(world / "own" / "predictions_test.csv")
    assert list(again.columns) == list(saved.columns) and again.equals(saved)
    run_auc = json.loads((world / "run-encoder-a" / "metrics.json").read_text())["test"]["auc"]
    assert json.loads((world / "own" / "metrics.json").read_text())["test"]["auc"] == run_auc
    assert folder_kind(world / "own") == "evaluation"


def test_classes_meet_through_the_vocabulary_and_the_planted_shift_shows(world):
    result = evaluate(world, "run-encoder-a", "chexpert-encoder-a.h5", "on-chexpert")
    metrics = json.loads((world / "on-chexpert" / "metrics.json").read_text())
    assert [p["pair"] for p in metrics["pairs"]] == ["Effusion (NIH) vs Pleural Effusion (CheXpert)",
                                                   "Cardiomegaly (NIH) vs Cardiomegaly (CheXpert)"]
    assert metrics["not_evaluated"] == {"run_classes_without_counterpart": ["Nodule", "Hernia"],
                                        "target_classes_without_counterpart": ["Edema"]}
    assert "Effusion (NIH) vs Pleural Effusion (CheXpert)" in result.stdout and "Nodule, Hernia" in result.stdout
    auc = metrics["test"]["auc"]
    assert auc["Pleural Effusion"] == pytest.approx(planted_auc(2.0), abs=0.04)
    assert auc["Cardiomegaly"] == pytest.approx(planted_auc(2.0, ROTATED), abs=0.05)
    assert metrics["test"]["mean_over"] == ["Pleural Effusion", "Cardiomegaly"]
    low, high = metrics["test"]["ci95"]["per_class"][1]
    assert low < auc["Cardiomegaly"] < high < planted_auc(2.0)
    # every figure recomputes from the predictions, which hold the target's test rows only
    frame = pd.read_csv(world / "on-chexpert" / "predictions_test.csv")
    for name in ("Pleural Effusion", "Cardiomegaly"):
        assert roc_auc_score(frame[f"label_{name}"], frame[f"prob_{name}"]) == pytest.approx(auc[name], abs=1e-9)
    table = cache.read_table(world / "chexpert-encoder-a.h5")
    assert set(frame["image_id"]) == set(table["image_id"][table["split"] == "test"])
    assert metrics["target"]["fingerprint"] == cache.read_attrs(world / "chexpert-encoder-a.h5")["fingerprint"]
    assert metrics["source_run"]["path"] == str((world / "run-encoder-a").resolve())
    config = json.loads((world / "on-chexpert" / "config.json").read_text())
    assert config["source_run"]["config"]["name"] == "nih-encoder-a"


def test_the_targets_train_and_val_rows_play_no_part(world):
    """Their features scrambled and labels flipped: the evaluation is the same to the last digit."""
    poisoned = world / "poisoned.h5"
    shutil.copy(world / "chexpert-encoder-a.h5", poisoned)
    with h5py.File(poisoned, "r+") as f:
        rows = np.flatnonzero(f["split"].asstr()[()] != "test")
        f["features"][rows[0]:rows[-1] + 1] = 1e4 * np.random.default_rng(9).standard_normal((len(rows), f["features"].shape[1]))
        f["labels"][rows[0]:rows[-1] + 1] = 1 - f["labels"][rows[0]:rows[-1] + 1]
    evaluate(world, "run-encoder-a", "chexpert-encoder-a.h5", "clean")
    evaluate(world, "run-encoder-a", "poisoned.h5", "poisoned")
    assert pd.read_csv(world / "clean" / "predictions_test.csv").equals(pd.read_csv(world / "poisoned" / "predictions_test.csv"))
    clean, dirty = (json.loads((world / name / "metrics.json").read_text())["test"] for name in ("clean", "poisoned"))
    assert clean == dirty


def test_split_all_scores_every_done_row_of_another_dataset(world):
    evaluate(world, "run-encoder-a", "chexpert-encoder-a.h5", "all-rows", "--split", "all")
    frame = pd.read_csv(world / "all-rows" / "predictions_test.csv")
    assert len(frame) == len(cache.read_table(world / "chexpert-encoder-a.h5")["image_id"])
    assert json.loads((world / "all-rows" / "metrics.json").read_text())["target"]["split"] == "all"


def test_unknown_labels_are_left_out_of_their_class_only():
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 3)) < 0.3).astype(np.float32)
    scores = labels + rng.standard_normal(labels.shape)
    labels[rng.random(400) < 0.3, 0] = np.nan  # class 0: a third unknown
    labels[:, 2] = np.where(labels[:, 2] == 1, 1, np.nan)  # class 2: no known negative
    patients = np.arange(400) // 2
    scored = score_known(labels, scores, patients, n_bootstrap=100, seed=0)
    known = ~np.isnan(labels[:, 0])
    assert scored["auc"][0] == pytest.approx(roc_auc_score(labels[known, 0], scores[known, 0]), abs=1e-12)
    assert scored["auc"][1] == pytest.approx(roc_auc_score(labels[:, 1], scores[:, 1]), abs=1e-12)
    assert scored["auc"][2] is None  # not scorable: listed, never 0.5
    assert scored["mean_auc"] == pytest.approx((scored["auc"][0] + scored["auc"][1]) / 2)
    assert scored["n_pos"][0] + scored["n_neg"][0] + scored["n_unknown"][0] == 400
    assert scored["n_unknown"][0] == int((~known).sum()) and scored["n_neg"][2] == 0
    assert np.isfinite(scored["ci95"]["per_class"][0]).all() and np.isnan(scored["ci95"]["per_class"][2]).all()


def test_an_unknown_label_is_an_empty_cell_and_counted_apart(world):
    evaluate(world, "run-encoder-a", "unknown.h5", "unknown")
    frame = pd.read_csv(world / "unknown" / "predictions_test.csv", keep_default_na=False, dtype=str)
    table = cache.read_table(world / "unknown.h5")
    test = table["split"] == "test"
    stored = table["labels"][test][:, 0]  # Pleural Effusion, in the cache's row order as written
    assert ((frame["label_Pleural Effusion"] == "").to_numpy() == (stored == cache.UNKNOWN)).all()
    metrics = json.loads((world / "unknown" / "metrics.json").read_text())["test"]
    assert metrics["n_unknown"]["Pleural Effusion"] == int((stored == cache.UNKNOWN).sum()) > 0


def test_refusals_are_one_line_and_write_nothing(world):
    cases = [("run-encoder-a", "chexpert-encoder-b.h5", "differ: weights"),
             ("run-encoder-a", "unrelated.h5", "share no class"),
             ("nih-encoder-a.h5", "chexpert-encoder-a.h5", "is not a folder"),
             ("", "chexpert-encoder-a.h5", "not a head run directory"),
             ("run-encoder-a", "nih-encoder-a.h5", "would score its train and val rows", "--split", "all")]
    for run, target, said, *flags in cases:
        result = evaluate(world, run, target, "refused", *flags, check_rc=2)
        assert said in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (world / "refused").exists() and not (world / "refused.partial").exists()


def test_compare_reads_two_encoders_evaluations_and_gives_their_paired_difference(world):
    for encoder in SEPARATION:
        evaluate(world, f"run-{encoder}", f"chexpert-{encoder}.h5", f"external-{encoder}")
    result = call_main("heads.compare", world / "external-encoder-a", world / "external-encoder-b",
                       "--out", world / "compared", "--bootstrap", "200", check_rc=0)
    means = {e: json.loads((world / f"external-{e}" / "metrics.json").read_text())["test"]["mean_auc"]
             for e in SEPARATION}
    mean = pd.read_csv(world / "compared" / "paired_differences.csv").set_index("class").loc["mean"]
    # the reference is chosen by the SOURCE runs' validation AUC: encoder a, the stronger
    assert mean["reference"] == "nih-encoder-a on chexpert-encoder-a" and "validation" in result.stdout
    assert mean["difference"] == pytest.approx(means["encoder-b"] - means["encoder-a"], abs=1e-6)  # the CSV keeps 6 digits
    planted = np.mean([planted_auc(1.0) - planted_auc(2.0), planted_auc(1.0, ROTATED) - planted_auc(2.0, ROTATED)])
    assert mean["difference"] == pytest.approx(planted, abs=0.05)
    assert mean["ci_high"] < 0
    # the same patients resampled from the same seed: heads.compare's intervals are the evaluation's
    board = pd.read_csv(world / "compared" / "comparison.csv").set_index("run").loc["nih-encoder-a on chexpert-encoder-a"]
    ci = json.loads((world / "external-encoder-a" / "metrics.json").read_text())["test"]["ci95"]["per_class"]
    assert [board["ci_low_Pleural Effusion"], board["ci_high_Cardiomegaly"]] == pytest.approx([ci[0][0], ci[1][1]],
                                                                                            abs=1e-6)


@pytest.mark.parametrize("flags, said", [(["--split", "val"], "invalid choice"),
                                         (["--bootstrap", "0"], "outside [1, 100000]")])
def test_a_bad_flag_is_one_line(flags, said, capsys):
    from heads.evaluate import get_args_parser
    with pytest.raises(SystemExit) as stopped:
        get_args_parser().parse_args(["run", "--cache", "x.h5", *flags])
    message = capsys.readouterr().err
    assert stopped.value.code == 2 and message.count("\n") == 1 and said in message


def test_a_run_joining_two_caches_is_refused_in_one_line(world):
    call_main("heads.train", "--cache", world / "nih-encoder-a.h5", "--cache", world / "nih-encoder-b.h5",
              "--out", world / "joined", *FAST, check_rc=0)
    result = evaluate(world, "joined", "chexpert-encoder-a.h5", "refused", check_rc=2)
    assert "joins 2 caches" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (world / "refused").exists()


def test_another_cache_of_the_runs_dataset_holding_its_train_patients_is_refused(world):
    """The same NIH rows split otherwise: the new test split is the run's train patients. Scoring
    them would be an 'external' AUC on images the head was fitted on."""
    resplit = world / "nih-resplit.h5"
    write_dataset_cache(resplit, dataset="nih", weights="encoder-a", separation=SEPARATION["encoder-a"],
                        rows={"test": 600, "val": 300, "train": 600})
    result = evaluate(world, "run-encoder-a", "nih-resplit.h5", "refused-resplit", check_rc=2)
    assert "were in the train or val split of" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (world / "refused-resplit").exists()
