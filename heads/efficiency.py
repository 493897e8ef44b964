"""Label efficiency: how a head's test AUC grows with the number of labelled training patients.

    python -m heads.train --train-fraction 0.01,0.1,0.25,1 --repeats 5

Design. Repeat r has one seed, the head's seed + r. It orders the train split's patients at
random once (numpy's default_rng(seed).permutation of the sorted patient ids), and fraction f
keeps the first ceil(f x patients) of that order with all their images: within a repeat every
smaller subset is nested in every larger one, so a step of the curve is more labels, not other
patients. Val and test never change. Each (fraction, repeat) fits the head, or the grid, as
heads.train does (epoch and grid entry chosen on validation) and scores val and, once, test.

The same seed is the head's seed in that repeat: repeats differ in initialisation and minibatch
order as well as in patients, so the spread over repeats is what rerunning the experiment would
show. Fraction 1 holds the same rows in every repeat and is fit once per repeat anyway: its
spread is the training noise alone, the floor under every other fraction's.

Features stay standardized with the whole train split's mean and std: those come from images,
not labels, and the question is how few labels a head needs, not how few images.

The run directory (kind "run"; the folder rules of cache/outdir.py):

    config.json       the settings as given, the caches, `efficiency`: fractions, repeats, seeds,
                      every subset's size
    metrics.json      `fits`: one entry per (fraction, repeat): subset, chosen settings and
                      epoch, val and test mean AUC, classes without a train positive
    efficiency.csv    one row per (fraction, repeat, class): subset size, n_train_positives,
                      val_auc, test_auc (empty where a split cannot score the class)
    efficiency.md     the summary table printed at the end
    efficiency.png    mean test AUC against training images (log x), min-max band over repeats
    predictions/      f<fraction>-r<repeat>_val.csv and _test.csv per fit, in the format of
                      heads/report.py: every number above is recomputed from these

`heads.compare` of two such runs gives, per fraction, the mean over repeats of the test mean
AUC difference with a paired patient-bootstrap CI (`compare_efficiency_runs`).
"""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from cache.outdir import discard_partial, finish_out_dir, prepare_out_dir
from cache.runtime import versions
from heads.data import HeadsError, Split, scoring_warnings
from heads.estimator import Head, HeadGrid
from heads.metrics import auc_per_class, confidence_intervals, mean_auc
from heads.report import write_json, figure_title, write_predictions
from heads.training import run_config

if TYPE_CHECKING:
    from heads.comparison import Run

SEED_MODULUS = 2 ** 63  # a head seed's range (heads/settings.py): seed + repeat wraps inside it
PREDICTIONS = "predictions"
CSV_COLUMNS = ["fraction", "repeat", "seed", "n_train_images", "n_train_patients", "class", "n_train_positives",
               "val_auc", "test_auc"]


class EfficiencyError(HeadsError):
    """A label-efficiency request that cannot be met (a fraction that keeps no patient)."""


def repeat_seed(seed: int, repeat: int) -> int:
    """The seed of repeat `repeat`: its patient order and its head's seed."""
    return (seed + repeat) % SEED_MODULUS


def patient_order(patient_ids, seed: int) -> np.ndarray:
    """The train patients in the random order of one repeat (the cache's row order plays no part)."""
    return np.random.default_rng(seed).permutation(np.unique(np.asarray(patient_ids)))


def patients_kept(fraction: float, n_patients: int) -> int:
    """ceil(fraction x n_patients), forgiving float rounding: 0.07 of 100 keeps 7, not 8."""
    return math.ceil(fraction * n_patients - 1e-9)


def check_fractions(fractions, n_patients: int) -> None:
    """Refuse, in one line, a fraction that asks for less than one of the train patients."""
    for fraction in fractions:
        if fraction * n_patients < 1:
            raise EfficiencyError(
                f"--train-fraction {fraction:g} keeps no patient: the train split has {n_patients} patients, and "
                f"{fraction:g} of them is {fraction * n_patients:.3g}; give fractions of at least "
                f"1/{n_patients} = {1 / n_patients:.3g}")


def train_subsets(train: Split, *, fractions, seed: int) -> dict:
    """fraction -> the Split of the patients that fraction keeps in the order `seed` draws, with
    all their images, in the train split's row order (nested: a smaller fraction's patients are
    the first of a larger one's)."""
    order = patient_order(train.patient_ids, seed)
    subsets = {}
    for fraction in fractions:
        kept = np.isin(train.patient_ids, order[:patients_kept(fraction, len(order))])
        if kept.all():
            subsets[fraction] = train
            continue
        subsets[fraction] = _rows_of(train, np.flatnonzero(kept))
    return subsets


def _rows_of(split: Split, rows: np.ndarray) -> Split:
    """The split's `rows`, every per-row field taken alike (the unknown-label mask is rebuilt)."""
    index = torch.from_numpy(rows).to(split.features.device)
    metadata = None if split.metadata is None else {key: values[rows] for key, values in split.metadata.items()}
    return replace(split, image_ids=split.image_ids[rows], patient_ids=split.patient_ids[rows],
                   features=split.features[index], labels=split.labels[index], metadata=metadata,
                   source=None if split.source is None else split.source[rows])


@dataclass
class Fit:
    """One head (or grid) fit on one subset: the subset's size, the estimator and its scores (the
    subset's rows are not kept: at scale, a copy of the features per fit)."""
    fraction: float
    repeat: int
    seed: int
    n_train_images: int
    n_train_patients: int
    train_positives: list  # per class, known positives of the subset
    estimator: object
    val_scores: np.ndarray
    test_scores: np.ndarray
    val_aucs: list  # per class; None where the split cannot score the class
    test_aucs: list
    seconds: float

    @property
    def stem(self) -> str:
        return f"f{self.fraction:g}-r{self.repeat}"

    def subset(self) -> dict:
        return {"fraction": self.fraction, "repeat": self.repeat, "seed": self.seed,
                "n_train_images": self.n_train_images, "n_train_patients": self.n_train_patients}


def fit_subset(grid: list, *, fraction, repeat, seed, train: Split, val: Split, test: Split, device) -> Fit:
    """Fit the head (one settings dict) or the grid with the repeat's seed; score val, then test once."""
    settings_list = [{**settings, "seed": seed} for settings in grid]
    estimator = Head(settings_list[0], device=device) if len(grid) == 1 else HeadGrid(settings_list, device=device)
    start = time.perf_counter()
    estimator.fit(train, val)
    val_scores = estimator.predict_proba(val.features)
    test_scores = estimator.predict_proba(test.features)  # the one use of test in this fit
    seconds = time.perf_counter() - start
    return Fit(fraction=fraction, repeat=repeat, seed=seed, n_train_images=len(train),
               n_train_patients=len(np.unique(train.patient_ids)),
               train_positives=[int(n) for n in (train.labels == 1).sum(dim=0).tolist()], estimator=estimator,
               val_scores=val_scores, test_scores=test_scores, seconds=seconds,
               val_aucs=auc_per_class(val.labels.cpu().numpy(), val_scores),
               test_aucs=auc_per_class(test.labels.cpu().numpy(), test_scores))


def run_efficiency(*, grid: list, data, cache_path, out, device, fractions, repeats: int, overwrite=False,
                   name: str | None = None, quiet=False, on_fit=None) -> tuple[Path, pd.DataFrame]:
    """Fit every (fraction, repeat), write the run directory under `<out>.partial` and move it
    into place; returns (run dir, the summary table). Fractions that keep no patient are refused
    before anything is written. `on_fit(fit)` is called after each fit, while its head is held
    (heads/transfer_efficiency.py scores it on other caches)."""
    fractions = sorted(fractions)
    n_patients = len(np.unique(data.train.patient_ids))
    check_fractions(fractions, n_patients)
    partial = prepare_out_dir(out, kind="run", overwrite=overwrite)
    if not quiet:
        for line in scoring_warnings(data):
            print(f"warning: {line}", file=sys.stderr)
    try:
        (partial / PREDICTIONS).mkdir()
        fits = []
        for repeat in range(repeats):
            seed = repeat_seed(grid[0]["seed"], repeat)
            for fraction, train in train_subsets(data.train, fractions=fractions, seed=seed).items():
                fit = fit_subset(grid, fraction=fraction, repeat=repeat, seed=seed, train=train, val=data.val,
                                 test=data.test, device=device)
                write_predictions(partial / PREDICTIONS / f"{fit.stem}_val.csv", data.val, fit.val_scores, data.classes)
                write_predictions(partial / PREDICTIONS / f"{fit.stem}_test.csv", data.test, fit.test_scores,
                                  data.classes)
                fits.append(fit)
                if on_fit is not None:
                    on_fit(fit)
                if not quiet:
                    print(progress_line(fit, data=data), flush=True)
        table, summary = write_efficiency(partial, fits=fits, data=data, grid=grid, cache_path=cache_path,
                                          device=device, fractions=fractions, repeats=repeats, name=name)
    except BaseException:
        discard_partial(partial, kind="run")
        raise
    run_dir = finish_out_dir(partial, out, kind="run")
    if not quiet:
        print(f"\n{format_summary(summary)}\n\nrun directory: {run_dir} (efficiency.csv, efficiency.md, "
              f"efficiency.png, predictions/)")
        capped = [fit for fit in fits if stopped_at_cap(fit)]
        if capped:
            print(f"warning: {len(capped)} of {len(fits)} fits stopped at --max-epochs, not by early stopping "
                  f"({', '.join(sorted({f'{fit.fraction:g}' for fit in capped}))}): they may be undertrained (at a "
                  f"small fraction an epoch is few optimiser steps); raise --max-epochs or lower --batch-size",
                  file=sys.stderr)
    return run_dir, summary


def stopped_at_cap(fit: Fit) -> bool:
    """The chosen head ran every epoch it was allowed, and may still have been improving."""
    summary, settings = fit.estimator.fit_summary(), fit.estimator.chosen_settings()
    return "epochs_run" in summary and summary["epochs_run"] >= settings["max_epochs"]


def progress_line(fit: Fit, *, data) -> str:
    missing = _without_positive(fit, data.classes)
    patients = fit.n_train_patients
    return (f"fraction {fit.fraction:g} repeat {fit.repeat}: {fit.n_train_images} train images of {patients} "
            f"patient{'s' * (patients > 1)}; validation mean AUC {mean_auc(fit.val_aucs):.4f}, test "
            f"{mean_auc(fit.test_aucs):.4f} ({fit.seconds:.1f}s)"
            + (f"; no train positive: {', '.join(missing)}" if missing else ""))


def _without_positive(fit: Fit, classes) -> list:
    return [name for name, n in zip(classes, fit.train_positives) if n == 0]


def efficiency_rows(fits: list, *, data) -> pd.DataFrame:
    """efficiency.csv: one row per (fit, class)."""
    rows = []
    for fit in fits:
        for c, name in enumerate(data.classes):
            rows.append({**fit.subset(), "class": name, "n_train_positives": fit.train_positives[c],
                         "val_auc": fit.val_aucs[c], "test_auc": fit.test_aucs[c]})
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def fit_means(table: pd.DataFrame) -> pd.DataFrame:
    """One row per fit: its subset and its val and test mean AUC over the classes each split scores."""
    keys = ["fraction", "repeat", "seed", "n_train_images", "n_train_patients"]
    return table.groupby(keys, sort=True).agg(val_mean_auc=("val_auc", "mean"),
                                              test_mean_auc=("test_auc", "mean")).reset_index()


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """One row per fraction: subset sizes, mean val and test mean AUC over repeats, the test
    spread (min and max over repeats), and the classes some repeat had no train positive for."""
    per_fit = fit_means(table)
    summary = per_fit.groupby("fraction").agg(
        repeats=("repeat", "count"), train_images=("n_train_images", "mean"),
        train_images_min=("n_train_images", "min"), train_images_max=("n_train_images", "max"),
        train_patients=("n_train_patients", "first"), val_mean_auc=("val_mean_auc", "mean"),
        test_mean_auc=("test_mean_auc", "mean"), test_min=("test_mean_auc", "min"),
        test_max=("test_mean_auc", "max")).reset_index()
    absent = table[table["n_train_positives"] == 0]
    summary["no_train_positive"] = [
        "; ".join(f"{name} ({_repeats(sorted(group['repeat']))})"
                  for name, group in absent[absent["fraction"] == fraction].groupby("class", sort=False))
        for fraction in summary["fraction"]]
    return summary


def _repeats(numbers) -> str:
    return f"repeat{'s' * (len(numbers) > 1)} {', '.join(map(str, numbers))}"


def format_summary(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table (efficiency.md and the terminal), then the classes a
    fraction left without a train positive."""
    lines = ["| fraction | train images | train patients | repeats | val mean AUC | test mean AUC | "
             "test min-max over repeats |", "|---|---|---|---|---|---|---|"]
    for row in summary.itertuples():
        images = f"{row.train_images:.0f}" + (f" ({row.train_images_min}-{row.train_images_max})"
                                               if row.train_images_min != row.train_images_max else "")
        lines.append(f"| {row.fraction:g} | {images} | {row.train_patients} | {row.repeats} | "
                     f"{row.val_mean_auc:.4f} | {row.test_mean_auc:.4f} | {row.test_min:.4f}-{row.test_max:.4f} |")
    lines.append("\nImages: mean over repeats (range). AUCs: macro mean over the classes each split can score, "
                 "then the mean over repeats; every choice was made on validation.")
    for row in summary.itertuples():
        if row.no_train_positive:
            lines.append(f"fraction {row.fraction:g}: no train positive for {row.no_train_positive}; those heads "
                         f"cannot learn the class, and its AUC stays in the mean as what so few labels give")
    return "\n".join(lines)


def write_efficiency(partial: Path, *, fits: list, data, grid: list, cache_path, device, fractions, repeats,
                     name) -> tuple[pd.DataFrame, pd.DataFrame]:
    """config.json, metrics.json, efficiency.csv, .md and .png from the fits (their predictions
    are already written)."""
    table = efficiency_rows(fits, data=data)
    summary = summarize(table)
    config = run_config(cache_path=cache_path, data=data, settings=given_settings(grid), device=device,
                        class_weights_used={"scheme": grid[0]["class_weighting"],
                                            "from": "each fit's train subset (metrics.json fits)"},
                        n_bootstrap=0, extra={"model": "head" if len(grid) == 1 else "head grid", "name": name,
                                              "efficiency": efficiency_record(fits, data=data, seed=grid[0]["seed"],
                                                                              fractions=fractions, repeats=repeats)})
    config["bootstrap"] = {"resamples": 0, "note": "no per-fit CI: the spread over repeats is shown; heads.compare "
                                                   "of two efficiency runs gives paired patient-bootstrap CIs"}
    metrics = {"fits": [fit_record(fit, data=data) for fit in fits],
               "summary": json.loads(summary.to_json(orient="records"))}
    write_json(partial / "config.json", config)  # the run writer's JSON rules (numpy, tensors, paths)
    write_json(partial / "metrics.json", metrics)
    table.to_csv(partial / "efficiency.csv", index=False, float_format="%.6g")
    (partial / "efficiency.md").write_text(f"# Label efficiency\n\n{format_summary(summary)}\n")
    plot_efficiency(partial / "efficiency.png", summary, config=config, official_nih=data.official_nih)
    return table, summary


def efficiency_record(fits: list, *, data, seed: int, fractions, repeats: int) -> dict:
    """config.json's `efficiency`: how the subsets were drawn, and every subset's size."""
    return {"fractions": list(fractions), "repeats": repeats,
            "seeds": [repeat_seed(seed, r) for r in range(repeats)],
            "train_patients": len(np.unique(data.train.patient_ids)), "train_images": len(data.train),
            "subsets": [fit.subset() for fit in fits],
            "rule": ("repeat r: seed = head seed + r; patients in numpy default_rng(seed).permutation of the "
                     "sorted train patient ids; fraction f keeps the first ceil(f x patients) with all their "
                     "images; the head's seed is the repeat's seed")}


def given_settings(grid: list) -> dict:
    """The head settings as given: a value, or the list of values a grid tried."""
    return {key: (grid[0][key] if len({repr(s[key]) for s in grid}) == 1 else [s[key] for s in grid])
            for key in grid[0]}


def fit_record(fit: Fit, *, data) -> dict:
    """metrics.json's entry for one fit: what was chosen on validation and what it scored."""
    summary = fit.estimator.fit_summary()
    summary.pop("history", None)
    return {**fit.subset(), "classes_without_train_positive": _without_positive(fit, data.classes),
            "settings": fit.estimator.chosen_settings(), **summary,
            "class_weights": fit.estimator.class_weights_used(),
            "val_mean_auc": mean_auc(fit.val_aucs), "test_mean_auc": mean_auc(fit.test_aucs),
            "predictions": {split: f"{PREDICTIONS}/{fit.stem}_{split}.csv" for split in ("val", "test")}}


def plot_efficiency(path, summary: pd.DataFrame, *, config: dict, official_nih: bool) -> None:
    """Mean test AUC over repeats against the mean number of training images (log x), the
    min-max band over repeats, each point labelled with its fraction; the validation mean dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placeholder = {"test": {"mean_auc": float("nan"), "ci95": {"mean": [float("nan")] * 2}}}
    title, marks = figure_title(config, placeholder, official_nih=official_nih)
    repeats = int(summary["repeats"].max())
    fig, ax = plt.subplots(figsize=(8, 5.5))
    x = summary["train_images"].to_numpy(float)
    ax.fill_between(x, summary["test_min"], summary["test_max"], color="C0", alpha=0.2,
                    label=f"test: min-max over {repeats} repeat{'s' * (repeats > 1)}")
    ax.plot(x, summary["test_mean_auc"], "o-", color="C0", label="test mean AUC, mean over repeats")
    ax.plot(x, summary["val_mean_auc"], "--", color="0.5", lw=1, label="validation mean AUC, mean over repeats")
    for row in summary.itertuples():
        ax.annotate(f"{row.fraction:g}", (row.train_images, row.test_mean_auc), textcoords="offset points",
                    xytext=(0, 7), ha="center", fontsize=8)
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator  # after Agg is set
    # one tick per fraction, at its image count: log-scale minor labels overlap on a short axis
    ax.xaxis.set_major_locator(FixedLocator(summary["train_images"].to_numpy()))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="x", labelsize=8)
    ax.margins(x=0.08, y=0.12)
    ax.set_xlabel("training images (mean over repeats; log scale); points labelled with the fraction of patients")
    ax.set_ylabel("mean AUC over the classes test scores")
    ax.set_title(title.splitlines()[0] + "\nlabel efficiency (every choice on validation)", fontsize=10)
    for index, mark in enumerate(marks):
        # top left: a curve that rises with more labels leaves that corner empty
        ax.text(0.01, 0.97 - 0.05 * index, mark, transform=ax.transAxes, color="red", fontsize=9, weight="bold",
                va="top")
    ax.grid(color="0.9", lw=0.6)
    ax.set_axisbelow(True)
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# heads.compare of efficiency runs --------------------------------------------------------------
# heads.comparison and heads.paired are imported inside these functions: they bring scipy, whose
# import would slow every heads.train start for a path only heads.compare takes.

COMPARISON_COLUMNS = ["run", "reference", "fraction", "repeats", "reference_repeats", "n_train_images",
                      "reference_n_train_images", "test_mean_auc", "reference_test_mean_auc", "difference",
                      "ci_low", "ci_high", "p_bootstrap"]


@dataclass
class EfficiencyRun:
    run: Run  # heads.comparison.Run: label, config, val_mean_auc (set by compare_efficiency_runs)
    fits: dict  # (fraction, repeat) -> Run holding that fit's test predictions
    n_train_images: dict  # (fraction, repeat) -> training images of that fit
    val_mean_aucs: dict  # (fraction, repeat) -> validation mean AUC, recomputed from its predictions

    @property
    def fractions(self) -> set:
        return {fraction for fraction, _ in self.fits}


def is_efficiency_run(name) -> bool:
    return (Path(name) / "efficiency.csv").is_file() and (Path(name) / "config.json").is_file()


def efficiency_comparison(names) -> bool:
    """True when every run is a label-efficiency run, False when none is; CompareError when some are."""
    from heads.comparison import CompareError

    kinds = [is_efficiency_run(name) for name in names]
    if any(kinds) and not all(kinds):
        raise CompareError(f"{names[kinds.index(True)]} is a label-efficiency run and {names[kinds.index(False)]} "
                           "is not; compare efficiency runs with efficiency runs")
    return all(kinds)


def load_efficiency_run(name: str) -> EfficiencyRun:
    """An efficiency run's config and every fit's predictions, checked as heads.compare checks a run."""
    from heads.comparison import CompareError, Run, labels_and_scores, read_predictions

    path = Path(name)
    try:
        config = json.loads((path / "config.json").read_text())
        subsets = [(float(s["fraction"]), int(s["repeat"]), int(s["n_train_images"]))
                   for s in config["efficiency"]["subsets"]]
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CompareError(f"{path / 'config.json'}: not a label-efficiency run's config ({err!r}); rerun "
                           "heads.train --train-fraction") from None
    fits, images, val_means = {}, {}, {}
    for fraction, repeat, n_images in subsets:
        stem = path / PREDICTIONS / f"f{fraction:g}-r{repeat}"
        test, classes = read_predictions(Path(f"{stem}_test.csv"))
        val, val_classes = read_predictions(Path(f"{stem}_val.csv"))
        if val_classes != classes:
            raise CompareError(f"{stem}_val.csv scores other classes than {stem.name}_test.csv beside it")
        val_means[fraction, repeat] = mean_auc(auc_per_class(*labels_and_scores(val, classes)))
        fits[fraction, repeat] = Run(name=f"{name} ({stem.name})", path=path, config=config, metrics={}, test=test,
                                     classes=classes, val_mean_auc=None)
        images[fraction, repeat] = n_images
    if not fits:
        raise CompareError(f"{path / 'config.json'} lists no fits; rerun heads.train --train-fraction")
    run = Run(name=name, path=path, config=config, metrics={}, test=None, classes=classes, val_mean_auc=None)
    return EfficiencyRun(run=run, fits=fits, n_train_images=images, val_mean_aucs=val_means)


def compare_efficiency_runs(names, *, args, out: Path) -> int:
    """heads.compare's path for label-efficiency runs: per fraction every run has, each run
    minus the reference (chosen on validation over those fractions, as heads.compare chooses;
    or --reference): the mean over repeats of
    the test mean AUC, its difference, and a paired patient-bootstrap CI in which every
    resample weighs the test rows of every repeat of both runs alike. Returns the exit status."""
    from heads.comparison import CompareError, check_same_test_rows, choose_reference, label_runs

    runs = [load_efficiency_run(name) for name in names]
    label_runs([e.run for e in runs], labels=args.label)
    check_same_test_rows([fit for e in runs for fit in e.fits.values()])
    shared = sorted(set.intersection(*(e.fractions for e in runs)))
    if not shared:
        raise CompareError("the efficiency runs share no --train-fraction; compare runs made with common fractions")
    for e in runs:  # validation over the same fractions in every run, so the choice compares like with like
        e.run.val_mean_auc = float(np.nanmean([v for (f, _), v in e.val_mean_aucs.items() if f in shared]))
    reference, reason = choose_reference([e.run for e in runs], args.reference)
    partial = prepare_out_dir(out, kind="comparison", overwrite=args.overwrite)
    try:
        table = efficiency_differences(runs, fractions=shared, reference=reference, n_resamples=args.bootstrap,
                                       seed=args.seed)
        text = format_comparison(table, runs=runs, reference=reference, reason=reason)
        table.to_csv(partial / "efficiency_comparison.csv", index=False, float_format="%.6g")
        (partial / "efficiency_comparison.md").write_text(f"# Label efficiency, paired\n\n{text}\n")
        inputs = {"runs": [str(e.run.path.resolve()) for e in runs], "labels": [e.run.label for e in runs],
                  "reference": runs[reference].run.label, "reference_reason": reason,
                  "bootstrap": {"resamples": args.bootstrap, "unit": "patient", "seed": args.seed,
                                "paired": "each resample of test patients weighs every repeat of every run"},
                  "versions": versions(pandas=pd.__version__)}
        (partial / "comparison.json").write_text(json.dumps(inputs, indent=2) + "\n")
        finish_out_dir(partial, out, kind="comparison")
    except BaseException:
        discard_partial(partial, kind="comparison")
        raise
    print(text)
    print(f"comparison: {out} (efficiency_comparison.md, efficiency_comparison.csv, comparison.json)")
    return 0


def efficiency_differences(runs: list, *, fractions, reference: int, n_resamples: int, seed: int) -> pd.DataFrame:
    """One row per (run other than the reference, fraction of `fractions`): mean over repeats of
    the test mean AUC of each, their difference, its 95% percentile CI and bootstrap p."""
    from heads.comparison import labels_and_scores
    from heads.paired import bootstrap_p_value, paired_bootstrap_auc

    order = [(r, key) for r, e in enumerate(runs) for key in sorted(e.fits)]
    first = runs[0].fits[order[0][1]]
    labels, _ = labels_and_scores(first.test, first.classes)
    scores = [labels_and_scores(runs[r].fits[key].test, first.classes)[1] for r, key in order]
    resampled = paired_bootstrap_auc(labels, scores, first.test["patient_id"].to_numpy(), n_resamples=n_resamples,
                                     seed=seed)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no class can be scored: NaN
        resampled_means = np.nanmean(resampled, axis=2)  # (resamples, fits): each fit's test mean AUC
    point = [mean_auc(auc_per_class(labels, s)) for s in scores]
    rows = []
    for r, e in enumerate(runs):
        if r == reference:
            continue
        for fraction in fractions:
            mine = [i for i, (run, key) in enumerate(order) if run == r and key[0] == fraction]
            theirs = [i for i, (run, key) in enumerate(order) if run == reference and key[0] == fraction]
            difference = resampled_means[:, mine].mean(axis=1) - resampled_means[:, theirs].mean(axis=1)
            low, high = confidence_intervals(difference[:, None])["per_class"][0]
            auc, reference_auc = np.mean([point[i] for i in mine]), np.mean([point[i] for i in theirs])
            rows.append({"run": e.run.label, "reference": runs[reference].run.label, "fraction": fraction,
                         "repeats": len(mine), "reference_repeats": len(theirs),
                         "n_train_images": _mean_images(e, fraction),
                         "reference_n_train_images": _mean_images(runs[reference], fraction),
                         "test_mean_auc": auc, "reference_test_mean_auc": reference_auc,
                         "difference": auc - reference_auc, "ci_low": low, "ci_high": high,
                         "p_bootstrap": bootstrap_p_value(difference)})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def _mean_images(run: EfficiencyRun, fraction: float) -> float:
    return float(np.mean([n for (f, _), n in run.n_train_images.items() if f == fraction]))


def format_comparison(table: pd.DataFrame, *, runs: list, reference: int, reason: str) -> str:
    """The paired differences as a Markdown table, with the fractions not compared named."""
    lines = [f"Reference: {runs[reference].run.label} ({reason}).", "",
             "| run | fraction | train images | repeats | test mean AUC | reference | difference | 95% CI | p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| {row.run} | {row.fraction:g} | {row.n_train_images:.0f} | {row.repeats} vs "
                     f"{row.reference_repeats} | {row.test_mean_auc:.4f} | {row.reference_test_mean_auc:.4f} | "
                     f"{row.difference:+.4f} | [{row.ci_low:+.4f}, {row.ci_high:+.4f}] | {row.p_bootstrap:.3g} |")
    lines.append("\nPer fraction: the mean over repeats of each run's test mean AUC, and their difference; the "
                 "95% CI and p come from a patient bootstrap in which each resample of the test patients weighs "
                 "every repeat of both runs alike.")
    everywhere = set(table["fraction"])
    for e in runs:
        alone = sorted(e.fractions - everywhere)
        if alone:
            lines.append(f"not compared (not in every run): {e.run.label} fraction {', '.join(f'{f:g}' for f in alone)}")
    return "\n".join(lines)
