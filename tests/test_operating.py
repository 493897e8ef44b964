"""heads.operating: thresholds chosen on validation, operating points with patient-bootstrap CIs,
average precision and calibration equal to scikit-learn's, unknown labels left out per class, and
a report recomputable from the saved predictions."""
import json
import types

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, confusion_matrix, roc_curve

from heads.operating import (average_precision, calibration, choose_thresholds, operating_points,
                             reliability_curve, write_operating_report)

CLASSES = ["Effusion", "Nodule", "Hernia"]


def planted(n_rows, *, seed, n_classes=3, unknown=0.1, images_per_patient=2):
    """Labels (NaN = unknown), float32-valued probabilities that rank positives higher, patients."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n_rows, n_classes)) < 0.3).astype(float)
    logits = 1.5 * labels + rng.standard_normal((n_rows, n_classes))
    scores = (1 / (1 + np.exp(-logits))).astype(np.float32).astype(np.float64)
    scores[: n_rows // 10, 0] = np.round(scores[: n_rows // 10, 0], 1)  # ties, and scores on bin edges
    labels[rng.random((n_rows, n_classes)) < unknown] = np.nan
    return labels, scores, np.arange(n_rows) // images_per_patient


def split(labels, scores, patients):
    return types.SimpleNamespace(labels=labels, scores=scores, patient_ids=patients,
                                 image_ids=np.array([f"{i:08d}.png" for i in range(len(labels))]))


def known(labels, c):
    return ~np.isnan(labels[:, c])


def test_average_precision_equals_sklearn_on_the_known_rows_of_each_class():
    labels, scores, patients = planted(600, seed=1)
    result = average_precision(labels, scores, patients, n_resamples=50)
    for c in range(labels.shape[1]):
        rows = known(labels, c)
        expected = average_precision_score(labels[rows, c], scores[rows, c])
        assert result[c]["average_precision"] == pytest.approx(expected, abs=1e-12)
        low, high = result[c]["average_precision_ci"]
        assert low < expected < high


def test_reliability_points_equal_sklearn_calibration_curve_including_scores_on_bin_edges():
    labels, scores, _ = planted(800, seed=2)
    scores[:40, 1] = np.repeat([0.0, 0.1, 0.5, 0.9, 1.0], 8)
    for c in range(labels.shape[1]):
        rows = known(labels, c)
        fraction_positive, mean_predicted = calibration_curve(labels[rows, c], scores[rows, c], n_bins=10,
                                                              strategy="uniform")
        curve = reliability_curve(labels[:, c], scores[:, c])
        np.testing.assert_allclose(curve["fraction_positive"], fraction_positive, atol=1e-12)
        np.testing.assert_allclose(curve["mean_predicted"], mean_predicted, atol=1e-12)
        assert curve["count"].sum() == rows.sum()


def test_ece_is_near_zero_for_calibrated_scores_and_large_for_overconfident_ones():
    rng = np.random.default_rng(3)
    probability = rng.random(40_000)
    outcome = (rng.random(40_000) < probability).astype(float)[:, None]
    patients = np.arange(40_000)
    calibrated = calibration(outcome, probability[:, None], patients, n_resamples=20)[0]
    overconfident = calibration(outcome, np.round(probability)[:, None], patients, n_resamples=20)[0]
    assert calibrated["ece"] < 0.02
    assert overconfident["ece"] > 0.2  # called 0 or 1, right only three times in four
    curve = calibrated["curve"]  # the ECE is the row-weighted gap of the reliability points
    expected = np.sum(curve["count"] * np.abs(curve["mean_predicted"] - curve["fraction_positive"])) / 40_000
    assert calibrated["ece"] == pytest.approx(expected, abs=1e-12)


def test_thresholds_are_youdens_j_and_the_highest_reaching_the_target_sensitivity_on_sklearns_roc():
    labels, scores, _ = planted(700, seed=4)
    youden = choose_thresholds(labels, scores)
    sensitive = choose_thresholds(labels, scores, sensitivity=0.9)
    for c in range(labels.shape[1]):
        rows = known(labels, c)
        fpr, tpr, thresholds = roc_curve(labels[rows, c], scores[rows, c], drop_intermediate=False)
        assert youden[c] == thresholds[np.argmax(tpr - fpr)]
        reaching = thresholds[tpr >= 0.9]
        assert sensitive[c] == reaching.max()
        called = scores[rows, c] >= sensitive[c]
        assert called[labels[rows, c] == 1].mean() >= 0.9


def test_operating_points_equal_sklearn_confusion_counts_and_ignore_unknown_rows():
    labels, scores, patients = planted(900, seed=5)
    thresholds = choose_thresholds(labels, scores)
    points = operating_points(labels, scores, thresholds, patients, n_resamples=100)
    # the unknown rows' scores are moved to the extremes: nothing may change
    moved = scores.copy()
    moved[np.isnan(labels)] = np.where(np.random.default_rng(0).random(np.isnan(labels).sum()) < 0.5, 0.0, 1.0)
    assert operating_points(labels, moved, thresholds, patients, n_resamples=100) == points
    for c, point in enumerate(points):
        rows = known(labels, c)
        tn, fp, fn, tp = confusion_matrix(labels[rows, c], scores[rows, c] >= thresholds[c]).ravel()
        expected = {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp), "ppv": tp / (tp + fp),
                    "npv": tn / (tn + fn), "f1": 2 * tp / (2 * tp + fp + fn), "fnr": fn / (tp + fn)}
        assert (point["n_pos"], point["n_neg"]) == (tp + fn, tn + fp)
        for name, value in expected.items():
            assert point[name] == pytest.approx(value, abs=1e-12)
            low, high = point[f"{name}_ci"]
            assert low <= value <= high and high - low < 0.2


def test_intervals_resample_patients_not_images():
    labels, scores, _ = planted(400, seed=6, unknown=0)
    copies = 4  # each patient's image seen four times: as many rows, no more information
    repeated_labels, repeated_scores = np.repeat(labels, copies, axis=0), np.repeat(scores, copies, axis=0)
    thresholds = choose_thresholds(labels, scores)
    width = {}
    for name, patients in (("by patient", np.repeat(np.arange(400), copies)), ("by image", np.arange(400 * copies))):
        point = operating_points(repeated_labels, repeated_scores, thresholds, patients, n_resamples=400)[0]
        width[name] = np.diff(point["sensitivity_ci"])[0]
    assert width["by patient"] > 1.6 * width["by image"]  # sqrt(4) = 2 in expectation


def test_ppv_is_undefined_when_nothing_is_called_positive_and_its_interval_is_nan():
    labels, scores, patients = planted(300, seed=7)
    point = operating_points(labels, scores, [1.5, 0.5, 0.5], patients, n_resamples=50)[0]
    assert point["ppv"] is None and np.isnan(point["ppv_ci"]).all()
    assert point["sensitivity"] == 0 and point["fnr"] == 1 and point["specificity"] == 1


def test_a_class_without_positives_is_not_scorable_anywhere():
    labels, scores, patients = planted(500, seed=8)
    labels[:, 2] = np.where(np.isnan(labels[:, 2]), np.nan, 0)
    thresholds = choose_thresholds(labels, scores)
    assert thresholds[2] is None and thresholds[0] is not None
    point = operating_points(labels, scores, thresholds, patients, n_resamples=20)[2]
    assert point["scorable"] is False and "sensitivity" not in point and point["n_pos"] == 0
    assert average_precision(labels, scores, patients, n_resamples=20)[2]["average_precision"] is None


def write_predictions(path, classes, data):
    """A predictions CSV as heads.report writes one: probabilities to 9 digits, unknown = empty."""
    frame = pd.DataFrame({"image_id": data.image_ids, "patient_id": data.patient_ids})
    for c, name in enumerate(classes):
        frame[f"prob_{name}"] = data.scores[:, c].astype(np.float32)
    for c, name in enumerate(classes):
        frame[f"label_{name}"] = pd.array([None if np.isnan(v) else int(v) for v in data.labels[:, c]], dtype="Int64")
    frame.to_csv(path, index=False, float_format="%.9g")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    val, test = split(*planted(800, seed=10)), split(*planted(1200, seed=11))
    test.labels[:, 2] = np.where(np.isnan(test.labels[:, 2]), np.nan, 0)  # Hernia: no positive on test
    write_predictions(out / "predictions_val.csv", CLASSES, val)
    write_predictions(out / "predictions_test.csv", CLASSES, test)
    summary = write_operating_report(out, classes=CLASSES, val=val, test=test, n_resamples=200, seed=3)
    return out, summary, val, test


def reload(path):
    """A predictions CSV's labels (NaN = empty cell), probabilities read as the float32 they are,
    and patients."""
    frame = pd.read_csv(path, dtype={f"prob_{c}": np.float32 for c in CLASSES})
    return (frame[[f"label_{c}" for c in CLASSES]].to_numpy(np.float64),
            frame[[f"prob_{c}" for c in CLASSES]].to_numpy(np.float64), frame["patient_id"].to_numpy())


def test_every_figure_is_recomputable_from_the_saved_predictions_and_thresholds(report):
    out, summary, _, _ = report
    record = json.loads((out / "thresholds.json").read_text())
    assert record["chosen_on"] == "validation" and record["method"] == "youden"
    val_labels, val_scores, _ = reload(out / "predictions_val.csv")
    assert choose_thresholds(val_labels, val_scores) == [record["thresholds"][c] for c in CLASSES]
    labels, scores, _ = reload(out / "predictions_test.csv")
    table = pd.read_csv(out / "operating_points.csv").set_index("class")
    curves = pd.read_csv(out / "calibration.csv")
    for c, name in enumerate(CLASSES[:2]):
        rows = known(labels, c)
        assert table.loc[name, "threshold"] == record["thresholds"][name]
        tn, fp, fn, tp = confusion_matrix(labels[rows, c], scores[rows, c] >= record["thresholds"][name]).ravel()
        assert table.loc[name, "sensitivity"] == pytest.approx(tp / (tp + fn), rel=1e-5)
        assert table.loc[name, "ppv"] == pytest.approx(tp / (tp + fp), rel=1e-5)
        assert table.loc[name, "npv"] == pytest.approx(tn / (tn + fn), rel=1e-5)
        assert table.loc[name, "average_precision"] == pytest.approx(
            average_precision_score(labels[rows, c], scores[rows, c]), rel=1e-5)
        fraction_positive, mean_predicted = calibration_curve(labels[rows, c], scores[rows, c], n_bins=10)
        curve = curves[curves["class"] == name]
        np.testing.assert_allclose(curve["fraction_positive"], fraction_positive, rtol=1e-5)
        np.testing.assert_allclose(curve["mean_predicted"], mean_predicted, rtol=1e-5)
        assert summary["test"][name]["sensitivity"] == pytest.approx(tp / (tp + fn), abs=1e-12)


def test_the_intervals_are_recomputable_from_the_saved_predictions_and_the_seed(report):
    out, summary, _, _ = report
    labels, scores, patients = reload(out / "predictions_test.csv")
    thresholds = list(json.loads((out / "thresholds.json").read_text())["thresholds"].values())
    seed, resamples = summary["bootstrap"]["seed"], summary["bootstrap"]["resamples"]
    points = operating_points(labels, scores, thresholds, patients, n_resamples=resamples, seed=seed)
    table = pd.read_csv(out / "operating_points.csv").set_index("class")
    for c, name in enumerate(CLASSES[:2]):
        np.testing.assert_allclose(table.loc[name, ["fnr_ci_low", "fnr_ci_high"]].to_numpy(float), points[c]["fnr_ci"],
                                   rtol=1e-5)


def test_the_report_marks_what_it_cannot_score_and_draws_the_reliability_diagram(report):
    out, summary, _, _ = report
    table = pd.read_csv(out / "operating_points.csv").set_index("class")
    assert not table.loc["Hernia", "scorable"] and np.isnan(table.loc["Hernia", "sensitivity"])
    assert table.loc["Hernia", "n_pos"] == 0 and summary["test"]["Hernia"]["average_precision"] is None
    assert json.loads(json.dumps(summary)) == summary  # JSON-ready: no NaN, no numpy types
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_thresholds_are_chosen_on_validation_only(report, tmp_path):
    out, _, val, test = report
    rng = np.random.default_rng(99)
    poisoned = split(1 - np.nan_to_num(test.labels), rng.random(test.scores.shape), test.patient_ids)
    write_operating_report(tmp_path, classes=CLASSES, val=val, test=poisoned, n_resamples=20)
    assert (tmp_path / "thresholds.json").read_text() == (out / "thresholds.json").read_text()
    before = pd.read_csv(out / "operating_points.csv")["threshold"]
    after = pd.read_csv(tmp_path / "operating_points.csv")["threshold"]
    pd.testing.assert_series_equal(before, after)
    assert not pd.read_csv(tmp_path / "operating_points.csv")["sensitivity"].equals(
        pd.read_csv(out / "operating_points.csv")["sensitivity"])  # the poison did reach test


def test_a_target_sensitivity_is_recorded_and_met_on_validation(tmp_path):
    val, test = split(*planted(800, seed=12)), split(*planted(800, seed=13))
    write_operating_report(tmp_path, classes=CLASSES, val=val, test=test, sensitivity=0.8, n_resamples=20)
    record = json.loads((tmp_path / "thresholds.json").read_text())
    assert record["method"] == "sensitivity>=0.8"
    for c, name in enumerate(CLASSES):
        positives = val.labels[:, c] == 1
        assert (val.scores[positives, c] >= record["thresholds"][name]).mean() >= 0.8
