"""Operating points, average precision and calibration: what a head does at a threshold, beside
the AUC that says how well it ranks.

Labels are float arrays (rows x classes): 1, 0, or NaN for unknown; each class is scored on the
rows where it is known. A threshold per class is chosen on validation only (Youden's J, or the
highest threshold that reaches a target sensitivity) and applied unchanged to test: a row is
called positive when its probability is >= the threshold. Intervals are percentile intervals
over a patient bootstrap (heads.metrics.patient_resamples); every statistic is computed from row
weights, so a chunk of resamples is scored in one vectorised pass, as heads.metrics.weighted_auc
scores AUC. A statistic undefined in a resample (PPV when nothing is called positive) is NaN
there and left out of its interval. The report these functions write: `write_operating_report`;
how to read it: docs/operating.md.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from cache.flags import Valid
from heads.metrics import panels_under_header, patient_resamples, roc_points
from heads.report import write_json

OPERATING_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "fnr")
# Ten equal-width bins, scikit-learn's calibration_curve(strategy="uniform"): the usual
# reliability-diagram resolution; more bins leave few rows per bin on rare classes, and the
# ECE of sparse bins measures noise more than miscalibration.
ECE_BINS = 10
SENSITIVITY_VALID = Valid(0, 1, low_open=True)  # a --sensitivity target: (0, 1]
YOUDEN = "youden"


def known_rows(labels: np.ndarray) -> np.ndarray:
    """Where a label column is known (0 or 1), never `~positive`: NaN is neither."""
    return (labels == 0) | (labels == 1)


def is_scorable(labels: np.ndarray) -> bool:
    """A class can be scored when it has at least one known positive and one known negative."""
    return bool((labels == 1).any() and (labels == 0).any())


def as_numpy(values) -> np.ndarray:
    """A tensor (any device) or array-like as a float64 numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Thresholds, chosen on validation


def method_name(sensitivity: float | None) -> str:
    """How thresholds are chosen, as thresholds.json records it."""
    return YOUDEN if sensitivity is None else f"sensitivity>={sensitivity:g}"


def choose_thresholds(val_labels, val_scores, *, sensitivity: float | None = None) -> list:
    """One threshold per class from the validation split: the one maximising Youden's J
    (sensitivity + specificity - 1) over the ROC points, or with `sensitivity` the highest
    threshold whose validation sensitivity reaches it. Ties go to the highest threshold (fewer
    false positives for the same J). A class validation cannot score gets None. Thresholds are
    score values; a row is positive when its score >= the threshold."""
    if sensitivity is not None and not SENSITIVITY_VALID.contains(sensitivity):
        raise ValueError(f"target sensitivity {sensitivity} is outside {SENSITIVITY_VALID.describe()}")
    labels, scores = as_numpy(val_labels), as_numpy(val_scores)
    return [_class_threshold(labels[:, c], scores[:, c], sensitivity) for c in range(labels.shape[1])]


def _class_threshold(labels, scores, sensitivity):
    if not is_scorable(labels):
        return None
    rows = known_rows(labels)
    labels, scores = labels[rows], scores[rows]
    fpr, tpr = roc_points(labels, scores)
    candidates = np.unique(scores)[::-1]  # roc_points' thresholds, after its (0, 0) start
    fpr, tpr = fpr[1:], tpr[1:]
    if sensitivity is None:
        best = int(np.argmax(tpr - fpr))
    else:
        best = int(np.argmax(tpr >= sensitivity - 1e-12))  # tpr reaches 1 at the lowest score
    return float(candidates[best])


# ---------------------------------------------------------------------------------------------
# Statistics of one class under row weights ((B, n) weights -> (B,) values)


def weighted_rates(labels, scores, weights, threshold: float) -> dict:
    """Sensitivity, specificity, PPV, NPV, F1 and FNR at `threshold` under each row of weights;
    NaN where a rate's denominator is 0."""
    called = scores >= threshold
    positive, negative = labels == 1, labels == 0
    cells = np.stack([positive & called, positive & ~called, negative & called, negative & ~called], axis=1)
    # whole-number counts: exact in the weights' float32 up to 2**24 rows
    tp, fn, fp, tn = (weights @ cells.astype(weights.dtype)).astype(np.float64).T
    return {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp), "ppv": _ratio(tp, tp + fp),
            "npv": _ratio(tn, tn + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn), "fnr": _ratio(fn, tp + fn)}


def _ratio(numerator, denominator):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def weighted_average_precision(labels, scores, weights) -> np.ndarray:
    """Average precision under each row of weights, scikit-learn's average_precision_score
    (equal to it to float rounding with all weights 1: tested): the sum over distinct thresholds
    of the recall gained times the precision there, i.e. the mean over positives (weighted) of
    the precision at the positive's own score. Each precision is two lookups in the cumulative
    weights of the sorted positives and negatives, as in heads.metrics.weighted_auc; computed
    here because importing scikit-learn costs a command seconds. NaN where no positive has weight."""
    positive_rows, negative_rows = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    positive_rows = positive_rows[np.argsort(scores[positive_rows], kind="stable")]
    negative_rows = negative_rows[np.argsort(scores[negative_rows], kind="stable")]
    positive_scores = scores[positive_rows]
    positive_weights = weights[:, positive_rows]
    true_positives = _weight_at_or_above(positive_weights, positive_scores, positive_scores)
    false_positives = _weight_at_or_above(weights[:, negative_rows], scores[negative_rows], positive_scores)
    precision = np.nan_to_num(_ratio(true_positives, true_positives + false_positives))  # weight 0 there anyway
    positives = positive_weights.sum(axis=1, dtype=np.float64)
    return _ratio((positive_weights * precision).sum(axis=1, dtype=np.float64), positives)


def _weight_at_or_above(sorted_weights, sorted_scores, at) -> np.ndarray:
    """(B, len(at)): the weight of the rows scoring >= each of `at` (rows sorted by score)."""
    cumulative = np.zeros((len(sorted_weights), sorted_weights.shape[1] + 1), np.float64)
    np.cumsum(sorted_weights, axis=1, out=cumulative[:, 1:])
    return cumulative[:, -1:] - cumulative[:, np.searchsorted(sorted_scores, at, side="left")]


def calibration_bins(scores, *, n_bins: int = ECE_BINS) -> np.ndarray:
    """The uniform bin of each score, as scikit-learn's calibration_curve assigns it (the upper
    edge of a bin belongs to it; 1.0 to the last)."""
    return np.searchsorted(np.linspace(0, 1, n_bins + 1)[1:-1], scores)


def reliability_curve(labels, scores, *, n_bins: int = ECE_BINS) -> dict:
    """One class's reliability points on its known rows: per non-empty uniform bin its edges,
    row count, mean predicted probability and observed fraction of positives; the last two equal
    calibration_curve(strategy="uniform")'s prob_pred and prob_true (tested)."""
    rows = known_rows(labels)
    labels, scores = labels[rows], scores[rows]
    bins = calibration_bins(scores, n_bins=n_bins)
    count = np.bincount(bins, minlength=n_bins)
    filled = count > 0
    edges = np.linspace(0, 1, n_bins + 1)
    return {"bin": np.flatnonzero(filled), "low": edges[:-1][filled], "high": edges[1:][filled],
            "count": count[filled],
            "mean_predicted": np.bincount(bins, weights=scores, minlength=n_bins)[filled] / count[filled],
            "fraction_positive": np.bincount(bins, weights=labels, minlength=n_bins)[filled] / count[filled]}


def weighted_ece(labels, scores, weights, *, n_bins: int = ECE_BINS) -> np.ndarray:
    """Expected calibration error under each row of weights: over the uniform bins, the share of
    rows in the bin times |mean predicted probability - fraction positive| there."""
    one_hot = np.eye(n_bins)[calibration_bins(scores, n_bins=n_bins)]
    gap = weights @ (one_hot * (scores - labels)[:, None]).astype(weights.dtype)
    return _ratio(np.abs(gap).sum(axis=1, dtype=np.float64), weights.sum(axis=1, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# Per class, with patient-bootstrap intervals


def resample_per_class(statistic, labels, scores, patient_ids, *, columns, n_resamples: int, seed) -> dict:
    """For each class index in `columns`, `statistic(c, labels, scores, weights)` (a dict of (B,)
    arrays) on that class's known rows: {c: {name: (value on all rows, (n_resamples,) array)}}.
    All classes see the same patient resamples (`seed` an int or numpy SeedSequence)."""
    if not columns:
        return {}
    rows = {c: np.flatnonzero(known_rows(labels[:, c])) for c in columns}
    point = {c: statistic(c, labels[rows[c], c], scores[rows[c], c], np.ones((1, len(rows[c])))) for c in columns}
    resampled = {c: {name: np.empty(n_resamples) for name in point[c]} for c in columns}
    for batch, weights in patient_resamples(patient_ids, n_resamples=n_resamples, seed=seed):
        for c in columns:
            class_weights = weights if len(rows[c]) == len(labels) else weights[:, rows[c]]
            for name, values in statistic(c, labels[rows[c], c], scores[rows[c], c], class_weights).items():
                resampled[c][name][batch] = values
    return {c: {name: (float(point[c][name][0]), resampled[c][name]) for name in point[c]} for c in columns}


def interval(resampled: np.ndarray, *, level: float = 0.95) -> list:
    """[low, high] percentile interval of the defined resamples; NaN, NaN when none is."""
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # every resample undefined
        return np.nanpercentile(resampled, [tail, 100 - tail]).tolist()


def _figures(per_class: dict, c: int, names, *, level: float) -> dict:
    figures = {}
    for name in names:
        value, resampled = per_class[c][name]
        figures[name] = None if np.isnan(value) else value
        figures[f"{name}_ci"] = interval(resampled, level=level)
    return figures


def _counts(labels, c) -> dict:
    return {"n_pos": int((labels[:, c] == 1).sum()), "n_neg": int((labels[:, c] == 0).sum())}


def operating_points(labels, scores, thresholds, patient_ids, *, n_resamples: int = 1000, seed=0,
                     level: float = 0.95) -> list[dict]:
    """Per class: the threshold, n_pos, n_neg, `scorable`, and each of OPERATING_METRICS at the
    threshold with its `<name>_ci` ([low, high], patient bootstrap). A class without a threshold
    (validation could not score it) or that these rows cannot score has scorable False and no
    figures."""
    labels, scores = as_numpy(labels), as_numpy(scores)
    columns = [c for c in range(labels.shape[1]) if thresholds[c] is not None and is_scorable(labels[:, c])]

    def rates(c, class_labels, class_scores, weights):
        return weighted_rates(class_labels, class_scores, weights, thresholds[c])

    per_class = resample_per_class(rates, labels, scores, patient_ids, columns=columns,
                                   n_resamples=n_resamples, seed=seed)
    return [{"threshold": thresholds[c], **_counts(labels, c), "scorable": c in per_class,
             **(_figures(per_class, c, OPERATING_METRICS, level=level) if c in per_class else {})}
            for c in range(labels.shape[1])]


def average_precision(labels, scores, patient_ids, *, n_resamples: int = 1000, seed=0, level: float = 0.95) -> list:
    """Per class: {"average_precision", "average_precision_ci", n_pos, n_neg, scorable} on the
    known rows; a class with no known positive or negative is not scorable (None)."""
    labels, scores = as_numpy(labels), as_numpy(scores)
    columns = [c for c in range(labels.shape[1]) if is_scorable(labels[:, c])]
    per_class = resample_per_class(
        lambda c, y, s, w: {"average_precision": weighted_average_precision(y, s, w)},
        labels, scores, patient_ids, columns=columns, n_resamples=n_resamples, seed=seed)
    return [{**_counts(labels, c), "scorable": c in per_class,
             **(_figures(per_class, c, ["average_precision"], level=level) if c in per_class
                else {"average_precision": None, "average_precision_ci": [np.nan, np.nan]})}
            for c in range(labels.shape[1])]


def calibration(labels, scores, patient_ids, *, n_bins: int = ECE_BINS, n_resamples: int = 1000, seed=0,
                level: float = 0.95) -> list:
    """Per class: {"ece", "ece_ci", "curve": reliability_curve(...), "n_rows"} on the known rows.
    Calibration needs no negative or positive, only known rows; a class with none gets None."""
    labels, scores = as_numpy(labels), as_numpy(scores)
    columns = [c for c in range(labels.shape[1]) if known_rows(labels[:, c]).any()]
    per_class = resample_per_class(
        lambda c, y, s, w: {"ece": weighted_ece(y, s, w, n_bins=n_bins)},
        labels, scores, patient_ids, columns=columns, n_resamples=n_resamples, seed=seed)
    return [{"n_rows": int(known_rows(labels[:, c]).sum()),
             **(_figures(per_class, c, ["ece"], level=level) if c in per_class
                else {"ece": None, "ece_ci": [np.nan, np.nan]}),
             "curve": reliability_curve(labels[:, c], scores[:, c], n_bins=n_bins) if c in per_class else None}
            for c in range(labels.shape[1])]


# ---------------------------------------------------------------------------------------------
# The report


def write_operating_report(out_dir, *, classes, val, test, metadata_test=None, by=(), sensitivity: float | None = None,
                           n_resamples: int = 1000, seed: int = 0, n_bins: int = ECE_BINS, marks=()) -> dict:
    """Write the operating-point files of a run into `out_dir` and return their summary for
    metrics.json. `val` and `test` have .labels (n, C; 1, 0, NaN unknown), .scores (n, C) and
    .patient_ids; `metadata_test` is the test rows' cache metadata (cache.read_metadata, in test
    row order), needed when `by` names attributes (heads.subgroups.ATTRIBUTES); `marks` go on
    reliability.png in red (heads.report.figure_marks).

        thresholds.json       per class threshold, how chosen (on validation only), val counts
        operating_points.csv  per class: threshold, n_pos, n_neg, sensitivity ... fnr, average
                              precision, ECE, each with its 95% CI (patient bootstrap)
        calibration.csv       reliability points per class and bin; reliability.png draws them
        subgroups.csv, subgroups.md, subgroup_gaps.csv, subgroup_rows.csv   (when `by` is given)

    Every figure is recomputable from predictions_val/test.csv and thresholds.json (tested)."""
    from heads.subgroups import check_request, write_subgroup_report  # it builds on this module

    if by:
        check_request(metadata_test, by, n_rows=len(test.patient_ids))  # before anything is written
    out_dir = Path(out_dir)
    val_labels = as_numpy(val.labels)
    thresholds = choose_thresholds(val_labels, saved_precision(val.scores), sensitivity=sensitivity)
    record = thresholds_record(classes, thresholds, val_labels, sensitivity=sensitivity)
    write_json(out_dir / "thresholds.json", record)
    labels, scores = as_numpy(test.labels), saved_precision(test.scores)
    common = dict(n_resamples=n_resamples, seed=seed)
    points = operating_points(labels, scores, thresholds, test.patient_ids, **common)
    precision = average_precision(labels, scores, test.patient_ids, **common)
    calibrated = calibration(labels, scores, test.patient_ids, n_bins=n_bins, **common)
    table = operating_table(classes, points, precision, calibrated)
    with_exact_thresholds(table).to_csv(out_dir / "operating_points.csv", index=False, float_format="%.6g")
    calibration_table(classes, calibrated).to_csv(out_dir / "calibration.csv", index=False, float_format="%.6g")
    plot_reliability(out_dir / "reliability.png", classes=classes, calibrated=calibrated, labels=labels, n_bins=n_bins,
                     marks=marks)
    summary = {"thresholds": record, "bootstrap": {"resamples": n_resamples, "unit": "patient", "seed": seed},
               "test": _json_ready(table.set_index("class").to_dict(orient="index")),
               "calibration_bins": n_bins}
    if by:
        summary["subgroups"] = write_subgroup_report(out_dir, classes=classes, test=test, metadata=metadata_test,
                                                     by=by, thresholds=thresholds, **common)
    return summary


def saved_precision(scores) -> np.ndarray:
    """Scores as the predictions CSVs hold them (float32, heads.report.write_predictions): a
    threshold is one of these values, and a row at the threshold must be called the same way
    when the file is read back as float32."""
    return as_numpy(scores).astype(np.float32).astype(np.float64)


def thresholds_record(classes, thresholds, val_labels, *, sensitivity) -> dict:
    return {"method": method_name(sensitivity), "chosen_on": "validation",
            "rule": "a row is positive for a class when its probability >= the class's threshold (probabilities "
                    "read as float32, as predictions_*.csv hold them)",
            "thresholds": dict(zip(classes, thresholds)),
            "not_scorable_on_val": [name for name, t in zip(classes, thresholds) if t is None],
            "val_counts": {name: _counts(val_labels, c) for c, name in enumerate(classes)}}


def operating_table(classes, points, precision, calibrated) -> pd.DataFrame:
    """operating_points.csv: one row per class; empty cells where a class is not scorable."""
    rows = []
    for c, name in enumerate(classes):
        row = {"class": name, "threshold": points[c]["threshold"], "n_pos": points[c]["n_pos"],
               "n_neg": points[c]["n_neg"], "scorable": points[c]["scorable"]}
        for metric in OPERATING_METRICS:
            _put(row, metric, points[c].get(metric), points[c].get(f"{metric}_ci", [np.nan] * 2))
        _put(row, "average_precision", precision[c]["average_precision"], precision[c]["average_precision_ci"])
        _put(row, "ece", calibrated[c]["ece"], calibrated[c]["ece_ci"])
        rows.append(row)
    return pd.DataFrame(rows)


def with_exact_thresholds(table: pd.DataFrame) -> pd.DataFrame:
    """The table with its threshold column written with every digit (the other figures get 6):
    a CSV's threshold must call the same rows as thresholds.json's."""
    return table.assign(threshold=["" if t is None or np.isnan(t) else repr(float(t)) for t in table["threshold"]])


def _put(row: dict, name: str, value, ci) -> None:
    row[name] = np.nan if value is None else value
    row[f"{name}_ci_low"], row[f"{name}_ci_high"] = ci


def calibration_table(classes, calibrated) -> pd.DataFrame:
    frames = [pd.DataFrame({"class": name, **{k: v for k, v in entry["curve"].items()}})
              for name, entry in zip(classes, calibrated) if entry["curve"] is not None]
    columns = ["class", "bin", "low", "high", "count", "mean_predicted", "fraction_positive"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _json_ready(value):
    """NaN as None (JSON has no NaN), numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and np.isnan(value) else value


def plot_reliability(path, *, classes, calibrated, labels, n_bins: int = ECE_BINS, marks=()) -> None:
    """One panel per class with known test rows: observed fraction positive against mean
    predicted probability per bin (on the diagonal = calibrated), the share of rows in each bin
    as grey bars (the ECE weighs bins by it), and the ECE with its 95% CI in the title. `marks`
    (random encoder weights, synthetic features) are printed in red, as on roc_curves.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [c for c in range(len(classes)) if calibrated[c]["curve"] is not None]
    skipped = [classes[c] for c in range(len(classes)) if c not in drawn]
    header = [(f"Reliability on test ({n_bins} equal-width bins; ECE with 95% CI over patients)", "black")]
    if skipped:
        header.append((f"no known test labels: {', '.join(skipped)}", "black"))
    header += [(mark, "red") for mark in marks]
    fig, axes = panels_under_header(plt, header, n_panels=len(drawn))
    width = 1 / n_bins
    for c, ax in zip(drawn, axes.flat):
        curve, entry = calibrated[c]["curve"], calibrated[c]
        ax.bar(curve["low"] + width / 2, curve["count"] / curve["count"].sum(), width=width * 0.9, color="0.85",
               label="share of rows")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        ax.plot(curve["mean_predicted"], curve["fraction_positive"], marker="o", ms=3, lw=1.3, label="observed")
        low, high = entry["ece_ci"]
        ci = f" [{low:.3f}, {high:.3f}]" if np.isfinite([low, high]).all() else ""
        ax.set_title(f"{classes[c]} (n+ = {int((labels[:, c] == 1).sum())})\nECE {entry['ece']:.3f}{ci}", fontsize=9)
        ax.set_xlabel("mean predicted probability", fontsize=8)
        ax.set_ylabel("fraction positive", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.set_aspect("equal")
    if drawn:
        axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=90)
    plt.close(fig)
