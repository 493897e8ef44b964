"""An estimator, start to finish: fit it, score validation and (once) test, write its run
directory. `heads.train` (a head or a grid), `heads.baseline`, `search` (its best trial) and
the benchmarks all go through `fit_and_report`; `train_and_report` is the one-head case.

The data walks one way: fit (train, val) -> score (val, test once) -> metrics -> write."""
from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import torch

from cache.outdir import discard_partial, finish_out_dir, prepare_out_dir
from cache.runtime import versions
from heads.data import HeadData, classes_without_train_positive, load_head_data, scoring_warnings
from heads.estimator import Head
from heads.fit import predict_proba, resolve_precision
from heads.model import WEIGHTING_FORMULA
from heads.operating import write_operating_report
from heads.report import figure_marks, format_table, per_class_table, score_run, write_run


def train_and_report(*, cache_path, settings: dict, out, device, overwrite=False, n_bootstrap=1000,
                     data: HeadData | None = None, name: str | None = None, extra_config: dict | None = None,
                     quiet=False):
    """Fit one head and write its complete run directory; returns (run dir, metrics)."""
    return fit_and_report(Head(settings, device=device), cache_path=cache_path, out=out, device=device,
                          overwrite=overwrite, n_bootstrap=n_bootstrap, data=data, name=name,
                          extra_config=extra_config, quiet=quiet)


def fit_and_report(estimator, *, cache_path, out, device, overwrite=False, n_bootstrap=1000,
                   data: HeadData | None = None, name: str | None = None, extra_config: dict | None = None,
                   quiet=False, by=(), sensitivity: float | None = None):
    """Fit `estimator` (heads.estimator) on train/val, score val and test once, write the run
    directory under `<out>.partial` and move it into place; returns (run dir, metrics). `name`,
    the run's short name (None: unnamed), is recorded in config.json for heads.compare and heads.runs.
    Thresholds are chosen on validation (Youden's J, or the highest reaching `sensitivity`) and
    test is scored at them; `by` adds the test subgroups (heads/operating.py, heads/subgroups.py)."""
    data = data or load_head_data(cache_path, device=device)
    partial = prepare_out_dir(out, kind="run", overwrite=overwrite)
    if not quiet:
        for line in scoring_warnings(data):
            print(f"warning: {line}", file=sys.stderr)
    try:
        estimator.fit(data.train, data.val)
        val_scores = _predict(estimator, data.val.features)
        test_scores = _predict(estimator, data.test.features)  # the one use of test
        settings = estimator.chosen_settings()
        fit = {**estimator.fit_summary(), "rows": {name: len(split) for name, split in data.splits.items()},
               "rows_not_done": data.excluded}
        metrics = score_run(classes=data.classes, val=data.val, val_scores=val_scores, test=data.test,
                            test_scores=test_scores, fit=fit, n_bootstrap=n_bootstrap, seed=settings["seed"])
        config = run_config(cache_path=cache_path, data=data, settings=settings, device=device,
                            class_weights_used=estimator.class_weights_used(), n_bootstrap=n_bootstrap,
                            extra={"model": estimator.kind, "name": name, **(extra_config or {})})
        metrics["operating"] = write_operating_report(
            partial, classes=data.classes, val=scored_rows(data.val, val_scores),
            test=scored_rows(data.test, test_scores), metadata_test=data.test.metadata, by=by,
            sensitivity=sensitivity, n_resamples=n_bootstrap, seed=settings["seed"],
            marks=figure_marks(config, official_nih=data.official_nih))
        write_run(partial, classes=data.classes, config=config, metrics=metrics, val=data.val,
                  val_scores=val_scores, test=data.test, test_scores=test_scores,
                  checkpoint=estimator.checkpoint(data), official_nih=data.official_nih, tables=estimator.tables())
    except BaseException:
        discard_partial(partial, kind="run")
        raise
    run_dir = finish_out_dir(partial, out, kind="run")
    if not quiet:
        print_summary(run_dir, data=data, metrics=metrics, model=estimator.kind)
    return run_dir, metrics


def scored_rows(split, scores) -> SimpleNamespace:
    """A split's labels, patients and ids beside its scores, as heads.operating reads them."""
    return SimpleNamespace(labels=split.labels.cpu().numpy(), scores=scores, patient_ids=split.patient_ids,
                           image_ids=split.image_ids)


def _predict(estimator, features):
    """A head scores through heads.fit.predict_proba, the one place a head's forward pass runs
    on a split (tests count its calls to prove test is scored once); other estimators
    through their own predict_proba."""
    model = getattr(estimator, "model_", None)
    return predict_proba(model, features) if model is not None else estimator.predict_proba(features)


def run_config(*, cache_path, data, settings, device, class_weights_used: dict, n_bootstrap, extra=None) -> dict:
    """config.json: every resolved setting, every cache used (path, fingerprint, columns), versions."""
    return {
        "model": "head", "settings": settings, "cache": str(Path(_first(cache_path)).resolve()),
        "cache_fingerprint": data.attrs["fingerprint"],
        "caches": [{**{key: entry[key] for key in ("name", "path", "fingerprint", "columns")},
                    "attrs": _recipe_attrs(entry["attrs"])} for entry in data.caches],
        "cache_attrs": _recipe_attrs(data.attrs),
        "official_nih_test_split": data.official_nih,
        **({"pooled": {"datasets": data.pooled, "classes": "the union under the shared vocabulary; a class a "
                                                              "dataset lacks is unknown on its rows"}}
           if data.pooled else {}),
        "classes_without_train_positive": classes_without_train_positive(data),
        "device": str(device), "precision": resolve_precision(settings.get("precision", "auto"), torch.device(device)),
        "class_weights": {**class_weights_used, "formula": WEIGHTING_FORMULA},
        "standardization": ("features minus train mean, divided by train std (stored in head.pt), "
                            "held as float16"),
        "selection": ("epoch (and grid entry) with the best validation mean AUC, over the classes validation can "
                      "score; a tie goes to the earliest epoch and the first grid entry; test is scored once, "
                      "after training"),
        "bootstrap": {"resamples": n_bootstrap, "unit": "patient", "seed": settings["seed"]},
        "versions": versions(**{"scikit-learn": version("scikit-learn")}),
        **(extra or {}),
    }


def operating_line(operating: dict) -> str:
    """One line on the thresholds and where their figures are."""
    method = operating["thresholds"].get("method", "")
    line = (f"thresholds chosen on validation ({method}); test sensitivity, specificity, PPV, NPV, F1, PR-AUC, "
            f"calibration: operating_points.csv, reliability.png")
    if "subgroups" in operating:
        line += "; subgroups: subgroups.md"
    return line


def _scored(classes, split_metrics: dict) -> int:
    return len(classes) - len(split_metrics["not_scorable"])


def _recipe_attrs(attrs: dict) -> dict:
    """A cache's attributes without when and with what it was written (what made the features)."""
    return {k: v for k, v in attrs.items() if k not in ("versions", "created")}


def _first(cache_paths):
    return cache_paths if isinstance(cache_paths, (str, Path)) else list(cache_paths)[0]


def print_summary(run_dir, *, data: HeadData, metrics: dict, model: str = "head") -> None:
    print(format_table(per_class_table(data.classes, metrics, official_nih=data.official_nih)))
    for entry in data.caches:  # e.g. torchxrayvision weights that saw NIH test images: not a clean test AUC
        if entry["attrs"].get("encoder_warning"):
            print(f"\nWARNING ({entry['name']}): {entry['attrs']['encoder_warning']}")
    rows = ", ".join(f"{n} {metrics['rows'][n]}" for n in ("train", "val", "test"))
    skipped = {k: v for k, v in data.excluded.items() if v}
    print(f"\nrows: {rows}" + (f" (not done, excluded: {skipped})" if skipped else ""))
    if metrics["test"]["not_scorable"]:
        print(f"not scorable on test (no known positive or no known negative), left out of the mean: "
              f"{metrics['test']['not_scorable']}")
    for dataset, figures in metrics.get("by_dataset", {}).items():
        test = figures["test"]
        low, high = test["ci95"]["mean"]
        print(f"pooled, {dataset} rows only: test mean AUC {test['mean_auc']:.4f} [{low:.4f}, {high:.4f}] over "
              f"{len(test['mean_over'])} classes ({test['rows']} images); validation {figures['val']['mean_auc']:.4f}")
    val_mean = f"validation mean AUC {metrics['val']['mean_auc']:.4f} over {_scored(data.classes, metrics['val'])} classes"
    if "grid" in metrics:
        grid = metrics["grid"]
        tied = (f"; {grid['tied']} heads tie at the best validation mean AUC, the first in grid order is scored"
                if grid.get("tied", 1) > 1 else "; the best on validation is scored")
        print(f"grid: {grid['heads']} heads trained in {grid['pass_seconds']:.1f}s{tied} (all of them: grid.csv)")
    if "best_epoch" in metrics:
        tied = (f"; {metrics['epochs_tied']} epochs tie at it, the earliest is kept"
                if metrics.get("epochs_tied", 1) > 1 else "")
        print(f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']} ({val_mean}{tied}); trained in "
              f"{metrics['train_seconds']:.1f}s")
    else:
        print(f"{model} trained in {metrics['train_seconds']:.1f}s; {val_mean}")
    print(operating_line(metrics["operating"]))
    print(f"run directory: {run_dir}")
