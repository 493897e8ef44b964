"""AUC-ROC per class, their macro mean, patient-level bootstrap intervals and ROC plots.

Labels are 1, 0 or NaN (unknown: masked, unmentioned or not annotated in the cache). Every
figure of a class is computed over the rows where that class is known; a class without a known
positive or a known negative cannot be scored (None), and is named, never counted as 0.5."""
from __future__ import annotations

import warnings

import numpy as np


def auc_per_class(labels: np.ndarray, scores: np.ndarray) -> list:
    """AUC-ROC of each column over its known rows, equal to scikit-learn's roc_auc_score on them
    to float rounding (tested); None where a class has no known positive or no known negative
    (it cannot be scored, and is left out of the mean). Computed here rather than by
    scikit-learn, whose import alone costs a CLI ~2.7 s."""
    labels = np.asarray(labels, dtype=np.float64)
    ones = np.ones((1, len(labels)), np.float64)
    scorable = scorable_mask(labels)
    return [float(weighted_auc(labels[:, c], scores[:, c], ones)[0]) if scorable[c] else None
            for c in range(labels.shape[1])]


def scorable_mask(labels: np.ndarray) -> np.ndarray:
    """(C,) bool: the classes with at least one known positive and one known negative."""
    labels = np.asarray(labels)
    return (labels == 1).any(axis=0) & (labels == 0).any(axis=0)


def mean_auc(aucs: list) -> float:
    scored = [a for a in aucs if a is not None]
    return float(np.mean(scored)) if scored else float("nan")


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC of one class under each row of `weights` ((B, n) non-negative row weights): the
    Mann-Whitney statistic with ties counted half, as scikit-learn computes it. With all
    weights 1 it equals roc_auc_score; with bootstrap counts it scores B resamples in one
    vectorized pass. Each positive wins against the negative weight below its score plus half
    the tied negative weight: two lookups in the cumulative weight of the sorted negatives.
    Rows whose label is unknown (NaN) are neither."""
    positive = np.asarray(labels) == 1
    negative_rows = np.flatnonzero(np.asarray(labels) == 0)
    order = np.argsort(scores[negative_rows], kind="stable")
    sorted_negative = scores[negative_rows][order]
    positive_scores = scores[positive]
    below = np.searchsorted(sorted_negative, positive_scores, side="left")
    up_to = np.searchsorted(sorted_negative, positive_scores, side="right")
    cumulative = np.zeros((len(weights), len(negative_rows) + 1), weights.dtype)
    np.cumsum(weights[:, negative_rows[order]], axis=1, out=cumulative[:, 1:])
    positive_weights = weights[:, positive]
    wins = (positive_weights * (cumulative[:, below] + cumulative[:, up_to])).sum(axis=1) / 2
    pairs = positive_weights.sum(axis=1) * cumulative[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to
    (1, 1): the points of scikit-learn's roc_curve before it drops collinear ones; rows with an
    unknown label are left out."""
    known = ~np.isnan(np.asarray(labels, dtype=np.float64))
    labels, scores = np.asarray(labels)[known], np.asarray(scores)[known]
    order = np.argsort(-scores, kind="stable")
    sorted_scores, hits = scores[order], np.asarray(labels)[order] == 1
    last_of_threshold = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_positives = np.cumsum(hits)[last_of_threshold]
    false_positives = last_of_threshold + 1 - true_positives
    return (np.r_[0, false_positives / max(false_positives[-1], 1)],
            np.r_[0, true_positives / max(true_positives[-1], 1)])


def bootstrap_auc(labels, scores, patient_ids, *, n_resamples: int = 1000, seed: int = 0,
                  chunk: int = 100) -> np.ndarray:
    """(n_resamples, C) AUCs on resamples of patients (not images: one patient's images are
    correlated, and resampling them alone would make the intervals too narrow)."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    results = np.empty((n_resamples, labels.shape[1]))
    for rows, weights in patient_resamples(patient_ids, n_resamples=n_resamples, seed=seed, chunk=chunk):
        for c in range(labels.shape[1]):
            results[rows, c] = weighted_auc(labels[:, c], scores[:, c], weights)
    return results


def patient_resamples(patient_ids, *, n_resamples: int, seed: int, chunk: int = 100):
    """The patient bootstrap as row weights, `chunk` resamples at a time: yields (slice of the
    resample numbers, (size, n_rows) float32 weights), each row's weight being how often its
    patient was drawn. The one definition of a resample: heads.train's test CIs and
    heads.compare's paired resamples draw the same patients from the same seed."""
    patients, row_patient = np.unique(np.asarray(patient_ids), return_inverse=True)
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        draws = rng.integers(0, len(patients), size=(size, len(patients)))
        offsets = draws + len(patients) * np.arange(size)[:, None]
        counts = np.bincount(offsets.ravel(), minlength=size * len(patients)).reshape(size, len(patients))
        yield slice(start, start + size), counts[:, row_patient].astype(np.float32)


def confidence_intervals(resampled: np.ndarray, *, level: float = 0.95) -> dict:
    """Percentile intervals per class and for the macro mean (over classes scorable in each
    resample)."""
    tail = 100 * (1 - level) / 2
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class never scorable: its CI is NaN
        per_class = np.nanpercentile(resampled, [tail, 100 - tail], axis=0).T
        macro = np.nanpercentile(np.nanmean(resampled, axis=1), [tail, 100 - tail])
    return {"per_class": per_class.tolist(), "mean": macro.tolist(), "level": level}


def plot_roc_curves(path, *, labels, scores, classes, aucs, ci, title: str, marks=()) -> None:
    """One panel per class test can score: its ROC curve, AUC with its 95% CI (`ci`, per class
    [low, high]) and number of positives, axis labels on every panel (a panel is often cropped
    out alone). Classes test cannot score are listed under the title, not drawn empty; `marks`
    (e.g. random encoder weights) are printed in red so the figure cannot pass for a result."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [c for c in range(len(classes)) if aucs[c] is not None]
    skipped = [classes[c] for c in range(len(classes)) if aucs[c] is None]
    header = [(line, "black") for line in title.splitlines()]
    header.append((f"{len(drawn)} of {len(classes)} classes scored on test (AUC, 95% CI over patients)", "black"))
    if skipped:
        header.append((f"not scorable on test (no known positive or no known negative): {', '.join(skipped)}",
                       "black"))
    header += [(mark, "red") for mark in marks]
    fig, axes = panels_under_header(plt, header, n_panels=len(drawn))
    for c, ax in zip(drawn, axes.flat):
        fpr, tpr = roc_points(labels[:, c], scores[:, c])
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.plot(fpr, tpr, lw=1.5)
        low, high = ci[c]
        interval = f" [{low:.3f}, {high:.3f}]" if np.isfinite([low, high]).all() else ""
        ax.set_title(f"{classes[c]} (n+ = {int((labels[:, c] == 1).sum())})\nAUC {aucs[c]:.3f}{interval}", fontsize=9)
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
        ax.set_aspect("equal")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def panels_under_header(plt, header: list, *, n_panels: int):
    """A figure of square panels (4 to a row) under lines of text, each (line, color): red lines
    are the marks that keep a figure from passing for a result, set in bold. Unused panels are
    hidden. Returns (figure, axes array)."""
    columns = min(4, max(n_panels, 1))
    rows = max(1, -(-n_panels // columns))
    line_inches, panel_inches = 0.24, 3.3
    fig = plt.figure(figsize=(max(panel_inches * columns, 7.5), panel_inches * rows + line_inches * (len(header) + 1)),
                     layout="constrained")
    top, body = fig.subfigures(2, 1, height_ratios=[line_inches * (len(header) + 1), panel_inches * rows])
    for index, (line, color) in enumerate(header):
        top.text(0.5, 1 - (index + 0.8) / (len(header) + 1), line, ha="center", va="center", color=color,
                 fontsize=10, weight="bold" if color == "red" else "normal")
    axes = body.subplots(rows, columns, squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.axis("off")
    return fig, axes


def auc_on_device(labels, scores):
    """AUC per (head, class) from ranks, on whatever device the tensors are on, so validation
    needs no transfer of K x n x C scores: `labels` (n, C) in {0, 1} or NaN (unknown: left out
    of its class's ranks), `scores` (K, n, C); returns (K, C) float64, NaN where a class has no
    known positive or no known negative. Ties get their average rank among the known rows
    (counted half), so the numbers equal roc_auc_score on the known rows to float rounding."""
    import torch

    scores = scores.permute(0, 2, 1)  # (K, C, n): sort each head's class column
    n_rows = scores.shape[-1]
    ordered, order = torch.sort(scores, dim=-1)
    position = torch.arange(n_rows, device=scores.device).expand_as(ordered)
    differs = ordered[..., 1:] != ordered[..., :-1]
    starts_group = torch.cat([torch.ones_like(differs[..., :1]), differs], dim=-1)
    ends_group = torch.cat([differs, torch.ones_like(differs[..., :1])], dim=-1)
    group_start = torch.where(starts_group, position, 0).cummax(dim=-1).values
    group_end = torch.where(ends_group, position, n_rows).flip(-1).cummin(dim=-1).values.flip(-1)
    by_class = labels.T.to(torch.float64).expand(scores.shape[0], -1, -1).gather(-1, order)
    known = (~torch.isnan(by_class)).double()
    positive = (by_class == 1).double()
    # ranks count known rows only: a tie group's mid-rank is the known rows before it plus half
    # of (the known rows in it + 1)
    known_up_to = known.cumsum(dim=-1)
    midrank = ((known_up_to - known).gather(-1, group_start) + known_up_to.gather(-1, group_end) + 1) / 2
    n_pos = positive.sum(dim=-1)
    n_neg = known.sum(dim=-1) - n_pos
    rank_sum = (midrank * positive).sum(dim=-1)
    auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full_like(auc, float("nan")))
