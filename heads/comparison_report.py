"""Write a Comparison (heads/comparison.py): the CSVs, the markdown tables, the forest plot and
the terminal table. Every number comes from the Comparison; nothing is scored here."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from heads.comparison import Comparison
from heads.data import is_official_nih_test
from heads.report import recipe_marks, run_recipes
from heads.settings import BY_NAME


def write_comparison(folder: Path, comparison: Comparison, *, versions: dict) -> None:
    """Every output file into `folder` (the caller builds it under .partial and renames it)."""
    comparison.leaderboard.to_csv(folder / "comparison.csv", index=False, float_format="%.6g")
    comparison.differences.to_csv(folder / "paired_differences.csv", index=False, float_format="%.6g")
    (folder / "comparison.md").write_text(markdown(comparison))
    inputs = {"runs": [str(run.path.resolve()) for run in comparison.runs],
              "runs_as_given": [run.name for run in comparison.runs],
              "labels": [run.label for run in comparison.runs],
              "reference": comparison.runs[comparison.reference].label, "reference_reason": comparison.reference_reason,
              "bootstrap": {"resamples": comparison.n_resamples, "unit": "patient", "seed": comparison.seed,
                            "paired": "every run scored on the same resampled patients"},
              "delong": "per class, images taken as independent; Holm-adjusted across the scorable classes",
              "versions": versions}
    (folder / "comparison.json").write_text(json.dumps(inputs, indent=2) + "\n")
    plot_forest(folder / "forest_plot.png", comparison)


def _auc(value) -> str:
    return "-" if value is None or _missing(value) else f"{value:.3f}"


def _signed(value) -> str:
    return "-" if _missing(value) else f"{value:+.4f}"


def _p(value) -> str:
    if _missing(value):
        return "-"
    return "<1e-16" if value < 1e-16 else f"{value:.3g}"  # below that, float rounding, as R prints it


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def head_descriptions(runs) -> dict:
    """Per run label: its model and the settings that differ between the runs of that model (the
    ones they share tell the reader nothing about why they differ; comparison.csv has all),
    numbers to three significant digits, without the hidden-layer settings of a linear head.
    Shared with heads.runs."""
    described = {}
    for run in runs:
        model = run.config.get("model", "?")
        peers = [other.config.get("settings", {}) for other in runs if other.config.get("model", "?") == model]
        settings = run.config.get("settings", {})
        differing = [k for k in sorted(settings) if len({json.dumps(p.get(k)) for p in peers}) > 1
                     and not _meaningless(k, settings)]
        described[run.label] = " ".join([model] + [f"{k}={_setting(settings[k])}" for k in differing])
    return described


def _meaningless(name: str, settings: dict) -> bool:
    """A hidden-layer setting (width, dropout) of a linear head (depth 0): it changed nothing."""
    setting = BY_NAME.get(name)
    return settings.get("depth") == 0 and setting is not None and setting.hidden_only


def _setting(value) -> str:
    """A head setting as a table shows it: a searched learning rate 0.000316 (not 0.00031622776601683794)."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(comparison: Comparison) -> str:
    """The comparison as the tables a paper would print."""
    reference = comparison.runs[comparison.reference]
    test = reference.test
    lines = [f"# {len(comparison.runs)} runs on the same {len(test)} test images "
             f"({test['patient_id'].nunique()} patients)", "",
             f"Reference: `{reference.label}`, {comparison.reference_reason}.",
             f"Intervals: 95% percentile intervals over {comparison.n_resamples} bootstrap resamples of patients "
             f"(seed {comparison.seed}). Differences are paired: both runs are scored on the same resampled "
             "patients. DeLong's test treats images as independent; its p-values are Holm-adjusted across "
             "the classes compared.", ""]
    lines += _runs_markdown(comparison) + [""] + _leaderboard_markdown(comparison) + [""]
    lines += _per_class_markdown(comparison)
    for name in comparison.differences["run"].unique():
        lines += [""] + _differences_markdown(comparison, name)
    if marks(comparison):
        lines += ["", "**" + "; ".join(marks(comparison)) + "**"]
    return "\n".join(lines) + "\n"


def marks(comparison: Comparison) -> list:
    """What keeps this comparison from passing for a result: any run's random encoder weights
    or synthetic features, a test split other than NIH's official one."""
    found = recipe_marks([recipe for run in comparison.runs for recipe in run_recipes(run.config)])
    if not is_official_nih_test(comparison.runs[comparison.reference].test["image_id"]):
        found.append("not the official NIH test split")
    return found


def _runs_markdown(comparison) -> list[str]:
    """What each run is: its folder, the features it was trained on (a run on several caches
    lists each), every cache's fingerprint (first 12 hex digits; comparison.csv has them whole)
    and its head."""
    heads = head_descriptions(comparison.runs)
    lines = ["## What each run is", "", "| run | directory | features | cache fingerprints | head |", "|---|---|---|---|---|"]
    for row in comparison.leaderboard.itertuples(index=False):
        fingerprints = ", ".join(f[:12] for f in str(row.cache_fingerprints).split(" + "))
        lines.append(f"| `{row.run}` | {row.run_dir} | {row.features} | {fingerprints} | {heads[row.run]} |")
    return lines


def _leaderboard_markdown(comparison) -> list[str]:
    lines = ["## Runs (ordered by validation mean AUC; test is reported, never ranked)", "",
             "| run | val mean AUC | test mean AUC [95% CI] | difference vs reference [95% CI] | p (bootstrap) "
             "| train s |", "|" + "---|" * 6]
    for row in comparison.leaderboard.itertuples(index=False):
        versus = ("reference" if row.reference else
                  f"{_signed(row.difference)} [{_signed(row.difference_ci_low)}, {_signed(row.difference_ci_high)}]")
        seconds = "-" if _missing(row.train_seconds) else f"{row.train_seconds:.1f}"
        lines.append(f"| `{row.run}` | {_auc(row.val_mean_auc)} | {_auc(row.test_mean_auc)} [{_auc(row.ci_low)}, "
                     f"{_auc(row.ci_high)}] | {versus} | {_p(row.p_bootstrap)} | {seconds} |")
    return lines


def _per_class_markdown(comparison) -> list[str]:
    board = comparison.leaderboard
    lines = ["## Test AUC per class [95% CI]", "", "| class | " + " | ".join(f"`{r}`" for r in board["run"]) + " |",
             "|---|" + "---|" * len(board)]
    for name in comparison.classes:
        cells = [f"{_auc(row[f'auc_{name}'])} [{_auc(row[f'ci_low_{name}'])}, {_auc(row[f'ci_high_{name}'])}]"
                 for _, row in board.iterrows()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _differences_markdown(comparison, name) -> list[str]:
    rows = comparison.differences[comparison.differences["run"] == name]
    lines = [f"## `{name}` minus `{rows['reference'].iloc[0]}`, paired", "",
             "| class | AUC | reference AUC | difference [95% CI] | p (bootstrap) | p (DeLong) | p (DeLong, Holm) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows.itertuples(index=False):
        lines.append(f"| {row[2]} | {_auc(row.auc)} | {_auc(row.reference_auc)} | {_signed(row.difference)} "
                     f"[{_signed(row.ci_low)}, {_signed(row.ci_high)}] | {_p(row.p_bootstrap)} "
                     f"| {_p(row.p_delong)} | {_p(row.p_delong_holm)} |")
    return lines


def format_terminal(comparison: Comparison) -> str:
    """The leaderboard and each run's paired differences, as fixed-width text."""
    width = max(len(run.label) for run in comparison.runs)
    lines = [f"{'run':<{width}}  {'val AUC':>7}  {'test AUC  [95% CI]':<24}  {'difference vs reference [95% CI]':<33}  p boot"]
    for row in comparison.leaderboard.itertuples(index=False):
        versus = ("reference" if row.reference else
                  f"{_signed(row.difference)} [{_signed(row.difference_ci_low)}, {_signed(row.difference_ci_high)}]")
        lines.append(f"{row.run:<{width}}  {_auc(row.val_mean_auc):>7}  {_auc(row.test_mean_auc)}  "
                     f"[{_auc(row.ci_low)}, {_auc(row.ci_high)}]{'':<8}  {versus:<33}  {_p(row.p_bootstrap)}")
    for name in comparison.differences["run"].unique():
        rows = comparison.differences[comparison.differences["run"] == name]
        lines += ["", f"{name} minus {rows['reference'].iloc[0]} (paired over patients; DeLong per class, Holm-adjusted)",
                  f"{'class':<20} {'AUC':>6} {'ref':>6}  {'difference [95% CI]':<29} {'p boot':>7} {'DeLong':>8} {'Holm':>8}"]
        for row in rows.itertuples(index=False):
            lines.append(f"{row[2]:<20} {_auc(row.auc):>6} {_auc(row.reference_auc):>6}  "
                         f"{_signed(row.difference)} [{_signed(row.ci_low)}, {_signed(row.ci_high)}]  "
                         f"{_p(row.p_bootstrap):>7} {_p(row.p_delong):>8} {_p(row.p_delong_holm):>8}")
    lines.append(f"\nreference: {comparison.runs[comparison.reference].label} ({comparison.reference_reason})")
    return "\n".join(lines)


def plot_forest(path, comparison: Comparison) -> None:
    """Left: each run's test AUC with its own 95% CI, classes as rows, one marker per run.
    Right: each run minus the reference with the paired 95% CI; a CI clear of 0 is a difference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["mean"] + list(comparison.classes)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.42 * len(rows) + 1.6), sharey=True)
    offsets = np.linspace(-0.25, 0.25, len(comparison.runs)) if len(comparison.runs) > 1 else [0.0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, run in enumerate(comparison.runs):
        points, low, high = _auc_rows(comparison, r)
        y = np.arange(len(rows)) + offsets[r]
        style = {"color": colors[r % len(colors)], "fmt": "s" if r == comparison.reference else "o", "ms": 4, "lw": 1}
        label = run.label + (" (reference)" if r == comparison.reference else "")
        left.errorbar(points, y, xerr=[points - low, high - points], label=label, **style)
        differences = comparison.differences[comparison.differences["run"] == run.label].set_index("class")
        if len(differences):
            d = differences.reindex(rows)
            right.errorbar(d["difference"], y, xerr=[d["difference"] - d["ci_low"], d["ci_high"] - d["difference"]],
                           label=f"{run.label} minus reference", **style)
    right.axvline(0, color="0.5", lw=0.8, ls="--")
    for axis in (left, right):
        axis.axhline(0.5, color="0.8", lw=0.8)  # the mean above, the classes below
    left.set_yticks(np.arange(len(rows)), rows)
    left.invert_yaxis()
    left.set_xlabel("test AUC, 95% CI (each run alone)")
    right.set_xlabel("run minus reference, paired 95% CI (same patients)")
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=min(4, len(comparison.runs)), fontsize=8)
    fig.suptitle(f"{comparison.n_resamples} patient resamples; reference: {comparison.runs[comparison.reference].label}",
                 fontsize=10)
    red = marks(comparison)
    if red:
        fig.text(0.5, 0.955, "; ".join(red), ha="center", va="top", color="red", fontsize=9, weight="bold")
    top = 1 - (0.22 / fig.get_figheight() if red else 0)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * ((len(comparison.runs) - 1) // 4), 1, top))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _auc_rows(comparison, r) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row = comparison.leaderboard.set_index("run").loc[comparison.runs[r].label]
    names = list(comparison.classes)
    points = np.array([row["test_mean_auc"]] + [row[f"auc_{c}"] for c in names], dtype=float)
    low = np.array([row["ci_low"]] + [row[f"ci_low_{c}"] for c in names], dtype=float)
    high = np.array([row["ci_high"]] + [row[f"ci_high_{c}"] for c in names], dtype=float)
    return points, low, high
