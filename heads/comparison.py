"""Compare run directories on the same test images: load and check them, score every run on the
same patient resamples, and write the comparison (see `heads.compare`).

    comparison.csv          the leaderboard: one row per run (its label and directory), mean and
                            per-class test AUCs with patient-bootstrap 95% CIs, the features
                            (each cache's encoder), every cache's fingerprint, the head settings
    paired_differences.csv  one row per (run, class or "mean") against the reference: paired
                            difference, its 95% CI and bootstrap p; DeLong p and Holm-adjusted p
    comparison.md           the same as tables a paper would print
    comparison.json         the inputs: run directories, reference and why, resamples, seed, versions
    forest_plot.png         per-class AUCs with CIs (one marker per run) and the paired differences
"""
from __future__ import annotations

import json
from argparse import ArgumentTypeError
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from heads.cli import run_name
from heads.metrics import auc_per_class, confidence_intervals, mean_auc
from heads.paired import delong_test, holm, paired_bootstrap_auc, paired_differences

RUN_FILES = ("config.json", "predictions_test.csv")
DIFFERENCE_COLUMNS = ["run", "reference", "class", "auc", "reference_auc", "difference", "ci_low", "ci_high",
                      "p_bootstrap", "p_delong", "p_delong_holm"]


class CompareError(Exception):
    """Run directories that cannot be compared: not a run of this kit, or not the same test rows."""


@dataclass
class Run:
    name: str  # as given on the command line
    path: Path
    config: dict  # config.json, its fields checked (_check_config)
    metrics: dict  # metrics.json ({} when absent), its fields checked
    test: pd.DataFrame  # predictions_test.csv, sorted by image_id
    classes: list
    val_mean_auc: float | None
    label: str = ""  # the run's short name in every table (label_runs)


def load_run(name: str) -> Run:
    """Read one run directory written by heads.train, search (best_run) or heads.baseline, and
    check every field the comparison reads before it is trusted."""
    path = Path(name)
    if not path.is_dir():
        raise CompareError(f"{name}: no such directory; give run directories written by heads.train, "
                           "search (its best_run) or heads.baseline")
    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing:
        raise CompareError(f"{name} is not a run directory of this kit (no {' or '.join(missing)}); give "
                           "directories written by heads.train, search (its best_run) or heads.baseline")
    config = _check_config(_read_json(path / "config.json", name), path / "config.json")
    metrics = _check_metrics(_read_json(path / "metrics.json", name), path / "metrics.json") \
        if (path / "metrics.json").is_file() else {}
    test, classes = read_predictions(path / "predictions_test.csv")
    val_path = path / "predictions_val.csv"
    if val_path.is_file():
        val, val_classes = read_predictions(val_path)
        if val_classes != classes:
            raise CompareError(f"{val_path} scores other classes than predictions_test.csv beside it; is {name} a "
                               "complete run directory?")
        val_mean = mean_auc(auc_per_class(*labels_and_scores(val, classes)))
    else:
        val_mean = metrics.get("val", {}).get("mean_auc")
    val_mean = None if val_mean is None or np.isnan(val_mean) else float(val_mean)
    return Run(name=name, path=path, config=config, metrics=metrics, test=test, classes=classes,
               val_mean_auc=val_mean)


def _read_json(path: Path, name: str):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CompareError(f"{path}: not readable JSON ({err}); is {name} a complete run directory?") from None


def _check_config(config, path: Path) -> dict:
    """config.json, refused (one line) unless every field the comparison reads has its type."""
    if not isinstance(config, dict) or "settings" not in config or not ({"cache", "caches"} & config.keys()):
        raise CompareError(f"{path} is not a run config of this kit (no settings or cache); "
                           "give directories written by heads.train, search or heads.baseline")
    _expect(config, path, settings=dict, model=str, cache=str, cache_fingerprint=str, cache_attrs=dict, caches=list)
    for i, entry in enumerate(config.get("caches", [])):
        if not isinstance(entry, dict):
            raise CompareError(f"{path}: caches[{i}] is {_type(entry)}; expected an object with name and fingerprint")
        _expect(entry, path, where=f"caches[{i}].", name=str, path=str, fingerprint=str, attrs=dict)
    for where, attrs in [("cache_attrs.", config.get("cache_attrs", {}))] + [
            (f"caches[{i}].attrs.", entry.get("attrs", {})) for i, entry in enumerate(config.get("caches", []))]:
        _expect(attrs, path, where=where, backbone=str, encoder=str, weights=str, image_size=int, feature_dim=int,
                fingerprint=str, preprocessing=(dict, str), layers=(list, str))
        if _preprocessing(attrs) is None:
            raise CompareError(f"{path}: {where}preprocessing is not a JSON object; the file was edited or damaged")
    return config


def _check_metrics(metrics, path: Path) -> dict:
    """metrics.json, refused unless what the comparison reads (val mean AUC, train time) has its type."""
    if not isinstance(metrics, dict):
        raise CompareError(f"{path} is {_type(metrics)}, not a run's metrics object; is it a complete run directory?")
    _expect(metrics, path, val=dict, train_seconds=(int, float))
    _expect(metrics.get("val", {}), path, where="val.", mean_auc=(int, float, type(None)))
    return metrics


_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
               type(None): "null"}


def _expect(record: dict, source: Path, *, where: str = "", **types) -> None:
    """Raise CompareError naming the first of `types` (field name -> type or types) that `record`
    holds with another type; absent fields are allowed (older runs lack some)."""
    for key, expected in types.items():
        if key not in record:
            continue
        expected = expected if isinstance(expected, tuple) else (expected,)
        value = record[key]
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in expected)
            raise CompareError(f"{source}: {where}{key} is {_type(value)}; expected {names}: the file was edited or "
                               "damaged, rewrite it or rerun the run")


def _type(value) -> str:
    return f"{_TYPE_NAMES.get(type(value), type(value).__name__)} ({json.dumps(value)[:40]})"


def _preprocessing(attrs: dict) -> dict | None:
    """A cache's preprocessing record ({} when absent), from an object or the JSON text of one
    (as HDF5 attributes store it); None when it is neither."""
    recipe = attrs.get("preprocessing") or {}
    if isinstance(recipe, str):
        try:
            recipe = json.loads(recipe)
        except ValueError:
            return None
    return recipe if isinstance(recipe, dict) else None


def read_predictions(path: Path) -> tuple[pd.DataFrame, list]:
    """A predictions CSV sorted by image_id, and its classes (from the prob_<class> columns);
    refuses missing columns, empty files, missing ids, repeated images, and probabilities or
    labels that cannot be scored."""
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, "patient_id": str})
    except (OSError, ValueError) as err:
        raise CompareError(f"{path}: not a readable CSV ({err})") from None
    classes = [c[len("prob_"):] for c in frame.columns if c.startswith("prob_")]
    needed = ["image_id", "patient_id"] + [f"label_{c}" for c in classes]
    missing = [c for c in needed if c not in frame.columns]
    if not classes or missing:
        raise CompareError(f"{path}: not a predictions file of this kit (missing columns "
                           f"{missing or ['prob_<class>']}); expected image_id, patient_id, prob_<class>, label_<class>")
    if frame.empty:
        raise CompareError(f"{path}: no rows; a run scored on no images cannot be compared (was its cache's "
                           f"split empty?)")
    blank = frame[["image_id", "patient_id"]].isna().to_numpy()
    if blank.any():
        row, column = np.argwhere(blank)[0]
        raise CompareError(f"{path}: row {row + 2} has no {('image_id', 'patient_id')[column]}")
    repeated = frame["image_id"][frame["image_id"].duplicated()]
    if len(repeated):
        raise CompareError(f"{path}: image {repeated.iloc[0]} appears more than once")
    _check_values(frame, path=path, columns=[f"prob_{c}" for c in classes], allowed=None)
    _check_values(frame, path=path, columns=[f"label_{c}" for c in classes], allowed=(0, 1), blank_allowed=True)
    return frame.sort_values("image_id", kind="stable").reset_index(drop=True), classes


def _check_values(frame, *, path, columns, allowed, blank_allowed=False) -> None:
    """Every cell of `columns` a finite number (`allowed` None) or one of `allowed` (or empty,
    an unknown label, where `blank_allowed`); the columns are made numeric in place, so what is
    checked is what is scored."""
    written = frame[columns].copy()
    for column in columns:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")  # text becomes NaN, refused below
    values = frame[columns].to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values) if allowed is None else ~np.isin(values, allowed)
    if blank_allowed:
        bad &= ~written.isna().to_numpy()
    if bad.any():
        row, column = np.argwhere(bad)[0]
        expected = "a finite probability" if allowed is None else "0, 1 or empty (unknown)"
        raise CompareError(f"{path}: row {row + 2} ({frame['image_id'].iloc[row]}) has {columns[column]} = "
                           f"{written.iat[row, column]}; expected {expected}")


def labels_and_scores(frame: pd.DataFrame, classes) -> tuple[np.ndarray, np.ndarray]:
    """A predictions frame's labels (1, 0, NaN where unknown) and probabilities as (rows x
    classes) arrays."""
    return (frame[[f"label_{c}" for c in classes]].to_numpy(np.float64, na_value=np.nan),
            frame[[f"prob_{c}" for c in classes]].to_numpy(np.float64))


def label_runs(runs: list[Run], *, labels=()) -> list[Run]:
    """Give each run its short name for the tables: the one given as (name, run dir) in `labels`,
    else the name it records (heads.train --name, a search's study), else its folder name, else
    parent/folder (two searches' best_run), else the path as given; a name that another run
    shares or that is already taken passes to the next. Raises CompareError for a run labelled
    twice or a label naming two runs."""
    given = {}
    for name, run_dir in labels:
        if Path(run_dir).resolve() in given:
            raise CompareError(f"--label: {run_dir} is labelled twice; give each run one label")
        given[Path(run_dir).resolve()] = name
    taken = set(given.values())
    for run in runs:
        run.label = given.get(run.path.resolve()) or _default_label(run, runs, taken=taken)
        taken.add(run.label)
    labels_used = [run.label for run in runs]
    repeated = [label for label in labels_used if labels_used.count(label) > 1]
    if repeated:
        raise CompareError(f"--label {repeated[0]} names two runs; give each run its own label")
    return runs


def recorded_name(config: dict) -> str | None:
    """The short name a run records (heads.train --name, a search's study for its best_run), or
    None: unnamed, or a name unfit for a table cell."""
    name = config.get("name")
    if name is None and isinstance(config.get("search"), dict):  # best_runs written before runs had names
        name = config["search"].get("study")
    try:
        return run_name(name) if isinstance(name, str) else None
    except ArgumentTypeError:
        return None


_NAMINGS = (lambda run: recorded_name(run.config), lambda run: run.path.resolve().name,
            lambda run: f"{run.path.resolve().parent.name}/{run.path.resolve().name}")


def _default_label(run: Run, runs: list[Run], *, taken: set) -> str:
    for naming in _NAMINGS:
        name = naming(run)
        if name and name not in taken and [naming(other) for other in runs].count(name) == 1:
            return name
    return run.name


def check_same_test_rows(runs: list[Run]) -> None:
    """Raise CompareError naming the first difference between any run's test rows and the
    first run's: classes, image ids, patients, which labels are known, or labels."""
    first = runs[0]
    for run in runs[1:]:
        where = f"{run.name} and {first.name}"
        if run.classes != first.classes:
            raise CompareError(f"{where} score different classes ({run.classes} vs {first.classes})")
        # sets, not np.setdiff1d: on object arrays of ids it compares every pair (11 s at NIH size)
        run_ids, first_ids = set(run.test["image_id"]), set(first.test["image_id"])
        only_run, only_first = sorted(run_ids - first_ids), sorted(first_ids - run_ids)
        if len(only_run) or len(only_first):
            raise CompareError(
                f"{where} have different test images ({len(run.test)} vs {len(first.test)} rows; "
                f"{len(only_run)} only in {run.name}{_example(only_run)}, {len(only_first)} only in "
                f"{first.name}{_example(only_first)}): compare runs made on the same cache rows")
        for column, what in [("patient_id", "patient ids")] + [(f"label_{c}", f"labels of {c}") for c in run.classes]:
            mine, theirs = run.test[column], first.test[column]
            unknown_differs = (mine.isna() != theirs.isna()).to_numpy()
            if unknown_differs.any():
                raise CompareError(
                    f"{where} differ in which test images have a known label of {column[len('label_'):]} "
                    f"({unknown_differs.sum()} images known in one and unknown in the other, e.g. "
                    f"{run.test['image_id'][unknown_differs].iloc[0]}): their AUCs would be over different images; "
                    f"compare runs made on caches with the same label policies (--uncertain, --views, --raters)")
            differs = ((mine != theirs) & mine.notna()).to_numpy()
            if differs.any():
                raise CompareError(f"{where} have different {what} on {differs.sum()} test images "
                                   f"(e.g. {run.test['image_id'][differs].iloc[0]}): compare runs made on the same cache rows")


def _example(ids) -> str:
    return f", e.g. {ids[0]}" if len(ids) else ""


def choose_reference(runs: list[Run], reference: str | None) -> tuple[int, str]:
    """(index of the reference run, why it is the reference). The default is the best
    VALIDATION mean AUC, so that test never makes the choice it is then used to judge."""
    if reference is not None:
        wanted = Path(reference).resolve()
        matches = [i for i, run in enumerate(runs) if run.path.resolve() == wanted]
        if not matches:
            raise CompareError(f"--reference {reference} is not one of the runs compared; add it to RUN_DIR")
        return matches[0], "given with --reference"
    missing = [run.name for run in runs if run.val_mean_auc is None]
    if missing:
        raise CompareError(f"{missing[0]} has no validation AUC (no predictions_val.csv or metrics.json) to "
                           "choose the reference by; pass --reference RUN_DIR")
    index = int(np.argmax([run.val_mean_auc for run in runs]))  # first of equals
    return index, f"best validation mean AUC ({runs[index].val_mean_auc:.4f}); test played no part in the choice"


@dataclass
class Comparison:
    runs: list
    reference: int
    reference_reason: str
    classes: list
    leaderboard: pd.DataFrame
    differences: pd.DataFrame
    n_resamples: int
    seed: int


def compare_runs(runs: list[Run], *, reference: int, reference_reason: str = "", n_resamples: int = 1000,
                 seed: int = 0) -> Comparison:
    """Score every run on the same patient resamples; the leaderboard and the paired
    differences of each other run against `reference` (runs must share their test rows)."""
    classes = runs[0].classes
    labels, _ = labels_and_scores(runs[0].test, classes)
    scores = [labels_and_scores(run.test, classes)[1] for run in runs]
    resampled = paired_bootstrap_auc(labels, scores, runs[0].test["patient_id"].to_numpy(),
                                     n_resamples=n_resamples, seed=seed)
    aucs = [auc_per_class(labels, run_scores) for run_scores in scores]
    intervals = [confidence_intervals(resampled[:, r]) for r in range(len(runs))]
    rows = []
    for r, run in enumerate(runs):
        if r != reference:
            rows += _difference_rows(labels=labels, scores=scores, aucs=aucs, resampled=resampled, runs=runs,
                                     run=r, reference=reference, classes=classes)
    differences = pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)
    leaderboard = _leaderboard(runs, aucs=aucs, intervals=intervals, differences=differences, reference=reference,
                               classes=classes)
    return Comparison(runs=runs, reference=reference, reference_reason=reference_reason, classes=classes,
                      leaderboard=leaderboard, differences=differences, n_resamples=n_resamples, seed=seed)


def _difference_rows(*, labels, scores, aucs, resampled, runs, run, reference, classes) -> list[dict]:
    paired = paired_differences(resampled, run=run, reference=reference)
    p_delong = [delong_test(labels[:, c], scores[run][:, c], scores[reference][:, c])["p_value"]
                if aucs[run][c] is not None else np.nan for c in range(len(classes))]
    p_holm = holm(p_delong)  # 14 tests at once: the family-wise error, not each test's
    names = {"run": runs[run].label, "reference": runs[reference].label}
    rows = [{**names, "class": "mean", "auc": mean_auc(aucs[run]), "reference_auc": mean_auc(aucs[reference]),
             "difference": mean_auc(aucs[run]) - mean_auc(aucs[reference]), "ci_low": paired["mean_ci"][0],
             "ci_high": paired["mean_ci"][1], "p_bootstrap": paired["mean_p"], "p_delong": np.nan,
             "p_delong_holm": np.nan}]
    for c, name in enumerate(classes):
        if aucs[run][c] is None:
            continue  # not scorable on test: nothing to compare
        rows.append({**names, "class": name, "auc": aucs[run][c], "reference_auc": aucs[reference][c],
                     "difference": aucs[run][c] - aucs[reference][c], "ci_low": paired["per_class_ci"][c][0],
                     "ci_high": paired["per_class_ci"][c][1], "p_bootstrap": paired["per_class_p"][c],
                     "p_delong": p_delong[c], "p_delong_holm": p_holm[c]})
    return rows


def _leaderboard(runs, *, aucs, intervals, differences, reference, classes) -> pd.DataFrame:
    rows = []
    for r, run in enumerate(runs):
        mean_row = differences[(differences["run"] == run.label) & (differences["class"] == "mean")]
        versus = mean_row.iloc[0] if len(mean_row) else None
        rows.append({
            "run": run.label, "run_dir": run.name, "reference": r == reference, "val_mean_auc": run.val_mean_auc,
            "test_mean_auc": mean_auc(aucs[r]), "ci_low": intervals[r]["mean"][0], "ci_high": intervals[r]["mean"][1],
            "difference": 0.0 if versus is None else versus["difference"],
            "difference_ci_low": np.nan if versus is None else versus["ci_low"],
            "difference_ci_high": np.nan if versus is None else versus["ci_high"],
            "p_bootstrap": np.nan if versus is None else versus["p_bootstrap"],
            **describe_features(run.config), "model": run.config.get("model", ""),
            "settings": json.dumps(run.config.get("settings", {}), sort_keys=True),
            "train_seconds": run.metrics.get("train_seconds", np.nan),
            **{f"auc_{name}": aucs[r][c] for c, name in enumerate(classes)},
            **{f"ci_low_{name}": intervals[r]["per_class"][c][0] for c, name in enumerate(classes)},
            **{f"ci_high_{name}": intervals[r]["per_class"][c][1] for c, name in enumerate(classes)},
        })
    # ordered by validation, as the reference was chosen: a table sorted by test AUC would rank on test
    return pd.DataFrame(rows).sort_values("val_mean_auc", ascending=False, kind="stable").reset_index(drop=True)


def describe_features(config: dict) -> dict:
    """The features a run used, as two table cells: `features`, one entry per cache joined with
    ' + ' (encoder, then weights, image size, layers and width where recorded), and
    `cache_fingerprints`, every cache's fingerprint in the same order."""
    caches = [describe_cache(entry, config) for entry in config.get("caches") or [_single_cache(config)]]
    return {"features": " + ".join(_cache_text(cache) for cache in caches),
            "cache_fingerprints": " + ".join(cache["fingerprint"] or "?" for cache in caches)}


def _single_cache(config: dict) -> dict:
    """A run's one cache as recorded before runs listed their caches."""
    return {"name": config.get("cache", ""), "fingerprint": config.get("cache_fingerprint", ""),
            "attrs": config.get("cache_attrs", {})}


def describe_cache(entry: dict, config: dict) -> dict:
    """One cache of a run: its encoder, weights, image size, layers, width and fingerprint; ""
    for what the run did not record (runs that joined caches before each cache's attributes
    were recorded kept them for the first cache only)."""
    fingerprint = entry.get("fingerprint", "")
    attrs = entry.get("attrs")
    if attrs is None and fingerprint == config.get("cache_fingerprint"):
        attrs = config.get("cache_attrs")
    attrs = attrs or {}
    layers = attrs.get("layers") or (_preprocessing(attrs) or {}).get("layers") or ""
    return {"encoder": attrs.get("encoder") or attrs.get("backbone") or Path(entry.get("name", "")).stem,
            "weights": attrs.get("weights", ""), "image_size": attrs.get("image_size", ""),
            "layers": ",".join(map(str, layers)) if isinstance(layers, list) else layers,
            "feature_dim": attrs.get("feature_dim", ""), "fingerprint": fingerprint or attrs.get("fingerprint", "")}


def _cache_text(cache: dict) -> str:
    """e.g. `resnet50 (IMAGENET1K_V2, 224 px, layer3,layer4, 3072-d)`: what made the features."""
    details = [str(cache["weights"]), f"{cache['image_size']} px" if cache["image_size"] != "" else "",
               str(cache["layers"]), f"{cache['feature_dim']}-d" if cache["feature_dim"] != "" else ""]
    details = [detail for detail in details if detail]
    return cache["encoder"] + (f" ({', '.join(details)})" if details else "")
