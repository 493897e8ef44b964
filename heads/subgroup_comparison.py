"""`heads.compare --by sex,age,view`: the runs' paired comparison repeated inside each subgroup.

Within one group every run is scored on the same rows, so the comparison stays paired: the
group's patients are resampled once for all runs (patient bootstrap) and DeLong's test runs on
the group's images, Holm-adjusted over the classes the group can score. A class scores in a
group only with at least heads.subgroups.MIN_CASES known positives and as many negatives (its
labels are left out there otherwise, as heads.subgroups does). Two groups are never compared
with each other here: their rows are disjoint, and the gap between groups of one run is the
unpaired test of heads/subgroups.py (a run's subgroup_gaps.csv).

The groups come from the per-row metadata of the cache the runs were scored on (the first
run's config.json names it; --metadata-cache gives another), matched to the test rows by
image id: every test image must be in that cache.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

import cache
from heads.comparison import DIFFERENCE_COLUMNS, CompareError, compare_runs
from heads.subgroups import MIN_CASES, TEST_NAME, enough_cases, subgroups

GROUP_COLUMNS = ["attribute", "group", "n_images", "n_patients"]
PAIRED_TEST = ("paired within each group: the group's patients resampled once for every run, DeLong on its "
               "images, Holm over its classes")


def test_metadata(runs: list, by, *, metadata_cache=None) -> dict:
    """The `by` attributes of the runs' test rows (in runs[0].test order), read from
    `metadata_cache` or the cache the first run records; CompareError in one line when the
    cache is missing, holds no metadata, or lacks a test image."""
    path = Path(metadata_cache or runs[0].config.get("cache", ""))
    where = "--metadata-cache" if metadata_cache else f"the cache {runs[0].name} records"
    if not path.is_file():
        raise CompareError(f"--by needs the per-row metadata of the runs' cache: {where} ({path}) is not there; "
                           "pass --metadata-cache PATH")
    try:
        cache.check_readable(path)
        metadata, table = cache.read_metadata(path), cache.read_table(path)
    except cache.CacheError as err:
        raise CompareError(f"{where}: {err}") from None
    if metadata is None:
        raise CompareError(cache.no_metadata_reason(path))
    position = pd.Series(np.arange(len(table["image_id"])), index=pd.Index(table["image_id"]))
    position = position[~position.index.duplicated()]
    ids = runs[0].test["image_id"]
    absent = ids[~ids.isin(position.index)]
    if len(absent):
        raise CompareError(f"{path} does not hold {len(absent)} of the runs' test images (e.g. {absent.iloc[0]}): "
                           "pass --metadata-cache with the cache the runs were scored on")
    rows = position[ids].to_numpy()
    return {attribute: metadata[attribute][rows] for attribute in by}


def compare_by(runs: list, *, metadata: dict, by, reference: int, n_resamples: int, seed: int) -> pd.DataFrame:
    """One block of paired differences (heads.comparison's columns) per (attribute, group),
    each run against `reference`, with the group's image and patient counts and each class's
    known positives and negatives in the group."""
    blocks = []
    for attribute, groups in subgroups(metadata, by).items():
        for group, rows in groups["groups"].items():
            group_runs = [replace(run, test=run.test[rows].reset_index(drop=True)) for run in runs]
            scorable = _with_enough_cases(group_runs, runs[0].classes)
            if scorable is None:
                continue  # no class has enough cases in this group
            comparison = compare_runs(scorable, reference=reference, n_resamples=n_resamples, seed=seed)
            test = group_runs[0].test
            counts = {name: _counts(test[f"label_{name}"]) for name in runs[0].classes}
            block = comparison.differences.assign(
                attribute=attribute, group=group, n_images=len(test), n_patients=test["patient_id"].nunique(),
                n_pos=[counts.get(name, (np.nan, np.nan))[0] for name in comparison.differences["class"]],
                n_neg=[counts.get(name, (np.nan, np.nan))[1] for name in comparison.differences["class"]])
            blocks.append(block)
    columns = GROUP_COLUMNS + DIFFERENCE_COLUMNS + ["n_pos", "n_neg"]
    return pd.concat(blocks, ignore_index=True)[columns] if blocks else pd.DataFrame(columns=columns)


def _counts(labels: pd.Series) -> tuple[int, int]:
    return int((labels == 1).sum()), int((labels == 0).sum())


def _with_enough_cases(group_runs: list, classes) -> list | None:
    """The runs with the labels of classes lacking MIN_CASES known positives or negatives in the
    group blanked (unknown: left out of every figure); None when no class is left."""
    test = group_runs[0].test
    thin = [name for name in classes if not enough_cases(test[f"label_{name}"].to_numpy(np.float64))]
    if len(thin) == len(classes):
        return None
    blank = {f"label_{name}": np.nan for name in thin}
    return [replace(run, test=run.test.assign(**blank)) for run in group_runs]


def markdown(table: pd.DataFrame, *, by, n_resamples: int) -> str:
    """The mean-AUC rows of every group as a table, with the test used and what is not compared."""
    lines = [f"## Within subgroups ({', '.join(by)})", "",
             f"Test: {PAIRED_TEST}; {n_resamples} resamples. A class scores in a group with at least {MIN_CASES} "
             f"known positives and {MIN_CASES} negatives. Groups are not compared with each other here (disjoint "
             f"rows: a run's subgroup_gaps.csv, {TEST_NAME}).", "",
             "| attribute | group | images | patients | run | reference | mean AUC | reference | difference "
             "(95% CI) | p (bootstrap) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in table[table["class"] == "mean"].itertuples():
        lines.append(f"| {row.attribute} | {row.group} | {row.n_images} | {row.n_patients} | {row.run} | "
                     f"{row.reference} | {row.auc:.3f} | {row.reference_auc:.3f} | {row.difference:+.3f} "
                     f"[{row.ci_low:+.3f}, {row.ci_high:+.3f}] | {row.p_bootstrap:.3g} |")
    if table.empty:
        lines.append("| (no group has a class with enough cases) |||||||||")
    return "\n".join(lines) + "\n"


def format_terminal(table: pd.DataFrame) -> str:
    """One line per (group, run): the mean difference against the reference with its CI."""
    lines = ["within subgroups (paired; mean AUC difference against the reference, 95% CI):"]
    for row in table[table["class"] == "mean"].itertuples():
        lines.append(f"  {row.attribute}={row.group:<8} {row.run} - {row.reference}: {row.difference:+.4f} "
                     f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}]  ({row.n_images} images, {row.n_patients} patients)")
    return "\n".join(lines)
