"""Test figures per subgroup of the cache's per-row metadata (sex, age band, view), and the gaps
between subgroups.

A group is the test rows sharing one value; a row whose value is missing ("" or NaN) is in no
group of that attribute and is counted as missing. Per group and class: AUC with a patient-
bootstrap CI, n_pos, n_neg, and sensitivity and false negative rate at the class's operating
threshold. That threshold is the one chosen on the WHOLE validation split (one per class, the
same for every group, as a deployed model has one): a group's FNR says whom that model misses,
not what a threshold tuned to the group would do. A group with fewer than MIN_CASES known
positives or negatives of a class reports it not scorable.

Two groups of one run hold disjoint rows, so their difference is not a paired comparison: each
group is resampled on its own (an unpaired patient bootstrap), and a gap is flagged when the 95%
interval of the difference excludes 0. How to read the files: docs/operating.md.
"""
from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from heads.metrics import weighted_auc
from heads.operating import (as_numpy, interval, resample_per_class, saved_precision, weighted_rates,
                             with_exact_thresholds)

ATTRIBUTES = ("sex", "age", "view")
# Age bands in years, [low, high): children apart (pediatric films, anatomy and protocols
# differ, and adult datasets hold few of them), then 20-year bands as chest X-ray fairness
# audits report, with the oldest open-ended.
AGE_BANDS = ((0, 18, "0-17"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"), (80, math.inf, "80+"))
GROUP_METRICS = ("auc", "sensitivity", "fnr")
# A group scores a class only with at least this many known positives and as many negatives:
# below that a percentile bootstrap of AUC is degenerate (a handful of rows give resamples of
# AUC 1 or 0 and an interval of no width), and a gap would be flagged on nothing.
MIN_CASES = 10
TEST_NAME = "unpaired patient bootstrap (each group's patients resampled independently)"


def parse_by(text: str) -> tuple:
    """--by as argparse `type=`: a comma-separated subset of ATTRIBUTES, e.g. "sex,age,view"."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in ATTRIBUTES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: --by takes a comma-separated list of {', '.join(ATTRIBUTES)}")
    return names


def age_bands(ages) -> np.ndarray:
    """The AGE_BANDS label of each age in years; "" where missing (NaN or negative)."""
    ages = np.asarray(ages, dtype=np.float64)
    lows = np.array([low for low, _, _ in AGE_BANDS])
    labels = np.array([label for _, _, label in AGE_BANDS] + [""], dtype=object)
    band = np.searchsorted(lows, ages, side="right") - 1  # the last band whose low end is <= the age
    return labels[np.where(np.isfinite(ages) & (ages >= 0), band, -1)]


def group_values(metadata: dict, attribute: str) -> np.ndarray:
    """Each row's group for `attribute` ("" = missing), in the row order of `metadata`."""
    if attribute == "age":
        return age_bands(metadata["age"])
    return np.array([str(value).strip() for value in metadata[attribute]], dtype=object)


def subgroups(metadata: dict, by) -> dict:
    """{attribute: {"groups": {name: row mask}, "missing": rows with no value}}; age groups in
    AGE_BANDS order, the others by name."""
    result = {}
    for attribute in by:
        values = group_values(metadata, attribute)
        order = [label for _, _, label in AGE_BANDS] if attribute == "age" else sorted(set(values) - {""})
        result[attribute] = {"groups": {name: values == name for name in order if (values == name).any()},
                             "missing": int((values == "").sum())}
    return result


def _group_statistic(thresholds):
    def statistic(c, labels, scores, weights):
        figures = {"auc": weighted_auc(labels, scores, weights)}
        if thresholds is not None and thresholds[c] is not None:
            rates = weighted_rates(labels, scores, weights, thresholds[c])
            figures.update(sensitivity=rates["sensitivity"], fnr=rates["fnr"])
        return figures
    return statistic


def enough_cases(labels) -> bool:
    """Whether a group can score a class: MIN_CASES known positives and negatives."""
    return bool((labels == 1).sum() >= MIN_CASES and (labels == 0).sum() >= MIN_CASES)


def group_figures(labels, scores, patient_ids, *, thresholds=None, n_resamples: int = 1000, seed=0) -> dict:
    """One group's figures: {c: {name: (value, resampled)}} for AUC (and, given `thresholds`,
    sensitivity and FNR) of every class the group can score (`enough_cases`)."""
    labels, scores = as_numpy(labels), as_numpy(scores)
    columns = [c for c in range(labels.shape[1]) if enough_cases(labels[:, c])]
    return resample_per_class(_group_statistic(thresholds), labels, scores, np.asarray(patient_ids),
                              columns=columns, n_resamples=n_resamples, seed=seed)


def _resampled_aucs(figures: dict, n_classes: int, n_resamples: int) -> np.ndarray:
    resampled = np.full((n_resamples, n_classes), np.nan)
    for c, entry in figures.items():
        resampled[:, c] = entry["auc"][1]
    return resampled


def difference(figures_a: dict, figures_b: dict, *, n_classes: int, n_resamples: int, level: float = 0.95) -> list:
    """AUC of group a minus group b per class both groups can score, then the difference of
    their means over those classes (the last entry, class None, with `classes` = how many),
    each with the interval of the resampled differences and `gap` (the interval excludes 0).
    The two groups' resamples must be independent draws."""
    a, b = _resampled_aucs(figures_a, n_classes, n_resamples), _resampled_aucs(figures_b, n_classes, n_resamples)
    both = [c for c in range(n_classes) if c in figures_a and c in figures_b]
    entries = [_difference_entry(c, figures_a[c]["auc"][0], figures_b[c]["auc"][0], a[:, c] - b[:, c], level)
               for c in both]
    if both:
        mean_a = np.mean([figures_a[c]["auc"][0] for c in both])
        mean_b = np.mean([figures_b[c]["auc"][0] for c in both])
        resampled = _nanmean(a[:, both]) - _nanmean(b[:, both])
        entries.append(_difference_entry(None, mean_a, mean_b, resampled, level) | {"classes": len(both)})
    return entries


def _nanmean(resampled: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no class is scorable
        return np.nanmean(resampled, axis=1)


def _difference_entry(c, auc_a, auc_b, resampled, level) -> dict:
    low, high = interval(resampled, level=level)
    return {"class": c, "auc_a": float(auc_a), "auc_b": float(auc_b), "difference": float(auc_a - auc_b),
            "ci": [low, high], "gap": bool(low > 0 or high < 0)}


def subgroup_difference(labels, scores, patient_ids, in_a, in_b, *, n_resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> list:
    """AUC of the rows in `in_a` minus the rows in `in_b` (boolean masks of one run's rows), per
    class and for the mean over the classes both can score, with 95% intervals and `gap` flags.

    NOT a paired test: the two groups hold different rows, so there is no per-row pairing to
    exploit (heads.compare's paired bootstrap and DeLong need the same rows scored twice). Each
    group's patients are resampled independently (an unpaired patient bootstrap, from two
    independent streams of `seed`). A patient with images in both groups (age bands, views) is
    drawn independently in each, which ignores their positive correlation and makes the
    interval wider, never narrower, than it should be."""
    labels, scores, patient_ids = as_numpy(labels), as_numpy(scores), np.asarray(patient_ids)
    stream_a, stream_b = np.random.SeedSequence(seed).spawn(2)
    figures = [group_figures(labels[rows], scores[rows], patient_ids[rows], n_resamples=n_resamples, seed=stream)
               for rows, stream in ((np.asarray(in_a), stream_a), (np.asarray(in_b), stream_b))]
    return difference(*figures, n_classes=labels.shape[1], n_resamples=n_resamples, level=level)


# ---------------------------------------------------------------------------------------------
# The report


def check_request(metadata, by, *, n_rows: int) -> None:
    """ValueError unless `by` names known attributes and `metadata` holds them for `n_rows` rows
    (a version-2 cache's read_metadata, cut to the scored rows; a version-1 cache has none)."""
    unknown = [name for name in by if name not in ATTRIBUTES]
    if metadata is None or unknown:
        raise ValueError(f"subgroups need the cache's per-row metadata (a version-2 cache) and attributes among "
                         f"{', '.join(ATTRIBUTES)}; got {'no metadata' if metadata is None else unknown}")
    lengths = {name: len(metadata[name]) for name in by if name in metadata}
    if len(lengths) < len(by) or set(lengths.values()) != {n_rows}:
        raise ValueError(f"the metadata given for subgroups has {lengths} rows per attribute; the scored split has "
                         f"{n_rows} (pass read_metadata's arrays cut to the split's rows, in its order)")


def write_subgroup_report(out_dir, *, classes, test, metadata, by, thresholds, n_resamples: int = 1000,
                          seed: int = 0) -> dict:
    """subgroups.csv (per attribute, group and class; a `mean` row per group), subgroup_gaps.csv
    (each group against its attribute's largest group), subgroup_rows.csv (each test row's
    groups, to recompute everything from predictions_test.csv) and subgroups.md; returns the
    summary for metrics.json. Group k of attribute i (in the CSV's order) is resampled from
    numpy SeedSequence((seed, i)).spawn(number of groups)[k]."""
    check_request(metadata, by, n_rows=len(test.patient_ids))
    out_dir = Path(out_dir)
    labels, scores, patient_ids = as_numpy(test.labels), saved_precision(test.scores), np.asarray(test.patient_ids)
    groups = subgroups(metadata, by)
    rows, gaps = [], []
    for index, attribute in enumerate(by):
        members = groups[attribute]["groups"]
        streams = np.random.SeedSequence((seed, index)).spawn(max(len(members), 1))
        figures = {name: group_figures(labels[mask], scores[mask], patient_ids[mask], thresholds=thresholds,
                                       n_resamples=n_resamples, seed=stream)
                   for (name, mask), stream in zip(members.items(), streams)}
        for name, mask in members.items():
            rows += _group_rows(attribute, name, figures[name], labels[mask], patient_ids[mask], classes=classes,
                                thresholds=thresholds)
        gaps += _gap_rows(attribute, members, figures, classes=classes, n_resamples=n_resamples)
    table, gap_table = pd.DataFrame(rows), pd.DataFrame(gaps, columns=GAP_COLUMNS)
    with_exact_thresholds(table).to_csv(out_dir / "subgroups.csv", index=False, float_format="%.6g")
    gap_table.to_csv(out_dir / "subgroup_gaps.csv", index=False, float_format="%.6g")
    _row_groups(test, metadata, by).to_csv(out_dir / "subgroup_rows.csv", index=False)
    missing = {attribute: groups[attribute]["missing"] for attribute in by}
    markdown = subgroups_markdown(table, gap_table, missing=missing, n_resamples=n_resamples)
    (out_dir / "subgroups.md").write_text(markdown)
    flagged = gap_table[gap_table["gap"]]
    return {"by": list(by), "missing": missing, "threshold_from": "the whole validation split, one per class",
            "test": TEST_NAME, "comparisons": len(gap_table), "age_bands": [label for _, _, label in AGE_BANDS],
            "gaps": [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
                     for row in flagged.to_dict(orient="records")]}


GAP_COLUMNS = ["attribute", "group", "reference", "class", "auc_group", "auc_reference", "difference", "ci_low",
               "ci_high", "gap", "test"]


def _group_rows(attribute, name, figures, labels, patient_ids, *, classes, thresholds) -> list:
    base = {"attribute": attribute, "group": name, "n_rows": len(labels), "n_patients": len(np.unique(patient_ids))}
    rows = []
    for c, class_name in enumerate(classes):
        row = {**base, "class": class_name, "n_pos": int((labels[:, c] == 1).sum()),
               "n_neg": int((labels[:, c] == 0).sum()), "scorable": c in figures, "threshold": thresholds[c]}
        for metric in GROUP_METRICS:
            value, resampled = figures[c][metric] if c in figures and metric in figures[c] else (np.nan, [np.nan])
            row[metric] = value
            row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = interval(np.asarray(resampled))
        rows.append(row)
    scored = sorted(figures)
    mean = {**base, "class": "mean", "scorable": bool(scored)}
    if scored:
        mean["auc"] = float(np.mean([figures[c]["auc"][0] for c in scored]))
        resampled = _nanmean(np.stack([figures[c]["auc"][1] for c in scored], axis=1))
        mean["auc_ci_low"], mean["auc_ci_high"] = interval(resampled)
    left_out = [classes[c] for c in range(len(classes)) if c not in figures]
    mean["note"] = (f"mean AUC over the {len(scored)} of {len(classes)} classes this group can score"
                    + (f"; not scorable (under {MIN_CASES} known positives or negatives): {', '.join(left_out)}"
                       if left_out else ""))
    return rows + [mean]


def _gap_rows(attribute, members, figures, *, classes, n_resamples) -> list:
    if len(members) < 2:
        return []
    reference = max(members, key=lambda name: int(members[name].sum()))
    rows = []
    for name in members:
        if name == reference:
            continue
        for entry in difference(figures[name], figures[reference], n_classes=len(classes), n_resamples=n_resamples):
            rows.append({"attribute": attribute, "group": name, "reference": reference,
                         "class": "mean" if entry["class"] is None else classes[entry["class"]],
                         "auc_group": entry["auc_a"], "auc_reference": entry["auc_b"],
                         "difference": entry["difference"], "ci_low": entry["ci"][0], "ci_high": entry["ci"][1],
                         "gap": entry["gap"], "test": "unpaired patient bootstrap"})
    return rows


def _row_groups(test, metadata, by) -> pd.DataFrame:
    frame = pd.DataFrame({"patient_id": np.asarray(test.patient_ids)})
    if getattr(test, "image_ids", None) is not None:
        frame.insert(0, "image_id", np.asarray(test.image_ids))
    for attribute in by:
        frame[attribute] = group_values(metadata, attribute)
    return frame


def subgroups_markdown(table: pd.DataFrame, gaps: pd.DataFrame, *, missing: dict, n_resamples: int) -> str:
    """subgroups.md: per attribute a table of groups (mean AUC, its difference from the largest
    group) and one of AUC / FNR per class and group; then the flagged gaps."""
    lines = ["# Test figures by subgroup", "",
             "Operating thresholds: one per class, chosen on the whole validation split (thresholds.json), the same "
             "for every group. AUC, sensitivity and FNR per group; intervals 95%, patient bootstrap, "
             f"{n_resamples} resamples. Differences: each group against its attribute's largest group, "
             f"{TEST_NAME}; a gap is flagged when the interval excludes 0, with no correction for the "
             f"{len(gaps)} comparisons (at 95%, about 1 in 20 is flagged by chance where there is no gap).", ""]
    for attribute, block in table.groupby("attribute", sort=False):
        lines += [f"## {attribute} (missing: {missing[attribute]} rows, in no group)", "",
                  "| group | rows | patients | mean AUC [95% CI] | classes in mean "
                  "| mean AUC - largest group [95% CI] |",
                  "|---|---|---|---|---|---|"]
        for name, group in block.groupby("group", sort=False):
            mean = group[group["class"] == "mean"].iloc[0]
            per_class = group[group["class"] != "mean"]
            gap = gaps[(gaps["attribute"] == attribute) & (gaps["group"] == name) & (gaps["class"] == "mean")]
            is_reference = (gaps[gaps["attribute"] == attribute]["reference"] == name).any()
            versus = (f"{gap['difference'].iloc[0]:+.3f} [{gap['ci_low'].iloc[0]:+.3f}, {gap['ci_high'].iloc[0]:+.3f}]"
                      if len(gap) else "reference" if is_reference else "")
            lines.append(f"| {name} | {mean['n_rows']} | {mean['n_patients']} | {_with_ci(mean, 'auc')} | "
                         f"{int(per_class['scorable'].sum())} of {len(per_class)} | {versus} |")
        names = list(dict.fromkeys(block["group"]))
        lines += ["", "AUC / FNR at the validation threshold (n+), per class:", "",
                  "| class | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        cells = {(row["class"], row["group"]): _auc_fnr(row) for row in block.to_dict(orient="records")
                 if row["class"] != "mean"}
        for class_name in dict.fromkeys(block.loc[block["class"] != "mean", "class"]):
            lines.append(f"| {class_name} | " + " | ".join(cells[class_name, name] for name in names) + " |")
        lines.append("")
    flagged = gaps[gaps["gap"]]
    lines += ["## Gaps flagged (interval of the AUC difference excludes 0)", ""]
    lines += [f"- {row['attribute']} {row['group']} vs {row['reference']}, {row['class']}: {row['difference']:+.3f} "
              f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]" for _, row in flagged.iterrows()] or ["- none"]
    return "\n".join(lines) + "\n"


def _with_ci(row, name) -> str:
    value = row.get(name)
    if value is None or not np.isfinite(value):
        return "not scorable"
    return f"{value:.3f} [{row[f'{name}_ci_low']:.3f}, {row[f'{name}_ci_high']:.3f}]"


def _auc_fnr(row) -> str:
    if not row["scorable"]:
        return f"not scorable (n+ {int(row['n_pos'])})"
    fnr = f"{row['fnr']:.2f}" if np.isfinite(row["fnr"]) else "-"
    return f"{row['auc']:.3f} / {fnr} ({int(row['n_pos'])})"
