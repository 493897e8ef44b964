"""Paired statistics for two or more sets of scores on the same test images: DeLong's test for
correlated ROC curves, a paired bootstrap that resamples patients, and Holm's adjustment.

Paired means both runs are scored on the same resample of the same patients, so what the two
share (the easy and the hard patients) cancels in their difference; two unpaired intervals
carry that shared variation twice and overlap even when one run is reliably better.
"""
from __future__ import annotations

import numpy as np
from scipy.special import ndtr
from scipy.stats import rankdata

from heads.metrics import confidence_intervals, patient_resamples, weighted_auc


def delong_covariance(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs (k,), DeLong covariance matrix (k, k)) of k score vectors (k, n) for one binary
    label vector (n,), by the fast midrank algorithm of Sun and Xu (2014): O(k n log n) instead
    of DeLong's O(k m n) pair counts. Ties count half, as in pROC and scikit-learn. Images
    whose label is unknown (NaN) are left out."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    positives, negatives = scores[:, labels == 1], scores[:, labels == 0]
    m, n = positives.shape[1], negatives.shape[1]
    if m == 0 or n == 0:
        raise ValueError("DeLong needs at least one positive and one negative image")
    rank_all = rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    rank_pos, rank_neg = rankdata(positives, axis=1), rankdata(negatives, axis=1)
    # placement values: the share of negatives each positive beats (and vice versa), ties half
    pos_placement = (rank_all[:, :m] - rank_pos) / n
    neg_placement = 1.0 - (rank_all[:, m:] - rank_neg) / m
    aucs = pos_placement.mean(axis=1)
    covariance = _covariance(pos_placement) / m + _covariance(neg_placement) / n
    return aucs, covariance


def _covariance(placements: np.ndarray) -> np.ndarray:
    # np.cov with one observation is undefined; a single positive carries no variance estimate
    if placements.shape[1] < 2:
        return np.zeros((len(placements), len(placements)))
    return np.atleast_2d(np.cov(placements))


def delong_test(labels, scores_a, scores_b) -> dict:
    """DeLong's paired test of AUC(a) = AUC(b) on the same images, two-sided, the numbers R's
    pROC gives (`var`, `cov` and `roc.test(..., method = "delong", paired = TRUE)`). Identical
    scores give z = 0 and p = 1. Images are taken as independent: for several images per
    patient the patient bootstrap below is the honest interval."""
    aucs, covariance = delong_covariance(labels, np.stack([scores_a, scores_b]))
    difference = aucs[0] - aucs[1]
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    # rounding leaves ~1e-19 where two score vectors rank every image alike
    if variance <= 1e-12 * max(covariance[0, 0] + covariance[1, 1], np.finfo(float).tiny):
        z = 0.0 if difference == 0 else np.copysign(np.inf, difference)
    else:
        z = difference / np.sqrt(variance)
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "var_a": float(covariance[0, 0]),
            "var_b": float(covariance[1, 1]), "cov_ab": float(covariance[0, 1]), "z": float(z),
            "p_value": float(2 * ndtr(-abs(z)))}


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment (controls the family-wise error over all the tests made);
    NaN p-values (tests not made) stay NaN and do not count."""
    p_values = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p_values, np.nan)
    made = np.flatnonzero(~np.isnan(p_values))
    order = made[np.argsort(p_values[made], kind="stable")]
    factors = len(order) - np.arange(len(order))
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(factors * p_values[order]))
    return adjusted


def paired_bootstrap_auc(labels, scores_by_run, patient_ids, *, n_resamples: int = 1000, seed: int = 0,
                         chunk: int = 100) -> np.ndarray:
    """(n_resamples, runs, C) test AUCs of every run on the SAME resamples of patients; a
    resample where a class has no known positive or negative gives NaN for it in every run alike."""
    labels = np.asarray(labels)
    scores_by_run = [np.asarray(scores) for scores in scores_by_run]
    results = np.empty((n_resamples, len(scores_by_run), labels.shape[1]))
    # one set of weights per chunk, shared by every run: this is what makes it paired
    for rows, weights in patient_resamples(patient_ids, n_resamples=n_resamples, seed=seed, chunk=chunk):
        for run, scores in enumerate(scores_by_run):
            for c in range(labels.shape[1]):
                results[rows, run, c] = weighted_auc(labels[:, c], scores[:, c], weights)
    return results


def bootstrap_p_value(differences) -> float:
    """Two-sided percentile-bootstrap p-value of a zero difference: twice the smaller share
    of resampled differences on either side of 0 (the largest level whose percentile interval
    still reaches 0), counted with +1 so that it is never exactly 0; 1 where all are 0."""
    differences = np.asarray(differences, dtype=np.float64)
    differences = differences[~np.isnan(differences)]
    total = len(differences) + 1
    below, above = (differences <= 0).sum() + 1, (differences >= 0).sum() + 1
    return float(min(1.0, 2 * min(below, above) / total))


def paired_differences(resampled: np.ndarray, *, run: int, reference: int, level: float = 0.95) -> dict:
    """Percentile CIs and bootstrap p-values of AUC(run) - AUC(reference), per class and for
    the mean over classes, from paired_bootstrap_auc's output."""
    per_class = resampled[:, run] - resampled[:, reference]
    # both runs have NaN in the same (resample, class) cells, so both means use the same classes
    with np.errstate(all="ignore"):
        mean = np.nanmean(resampled[:, run], axis=1) - np.nanmean(resampled[:, reference], axis=1)
    return {"per_class_ci": confidence_intervals(per_class, level=level)["per_class"],
            "mean_ci": confidence_intervals(mean[:, None], level=level)["per_class"][0],
            "per_class_p": [bootstrap_p_value(per_class[:, c]) for c in range(per_class.shape[1])],
            "mean_p": bootstrap_p_value(mean)}
