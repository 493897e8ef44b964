"""One head, start to finish: fit it, score validation and (once) test, write its run
directory. `heads.train`, `search` (its best trial) and the benchmarks call `train_and_report`."""
from __future__ import annotations

from pathlib import Path

import sklearn

from cache.runtime import versions
from heads.data import HeadData, load_head_data
from heads.fit import fit_head, head_checkpoint, predict_proba
from heads.model import WEIGHTING_FORMULA
from heads.report import discard_partial, finish_out_dir, format_table, per_class_table, prepare_out_dir, write_run


def train_and_report(*, cache_path, settings: dict, out, device, overwrite=False, n_bootstrap=1000,
                     data: HeadData | None = None, extra_config: dict | None = None, quiet=False):
    """Fit one head and write its complete run directory; returns (run dir, metrics)."""
    data = data or load_head_data(cache_path, device=device)
    partial = prepare_out_dir(out, overwrite=overwrite)
    try:
        fit = fit_head(train=data.train, val=data.val, settings=settings, device=device)
        val_scores = predict_proba(fit.model, data.val.features)
        test_scores = predict_proba(fit.model, data.test.features)  # the one use of test
        config = run_config(cache_path=cache_path, data=data, settings=settings, device=device,
                            class_weights_used=fit.class_weights,
                            n_bootstrap=n_bootstrap, extra=extra_config)
        metrics = write_run(
            partial, classes=data.classes, config=config, val=data.val, val_scores=val_scores, test=data.test,
            test_scores=test_scores, checkpoint=head_checkpoint(fit.model, data=data, settings=settings),
            n_bootstrap=n_bootstrap, seed=settings["seed"],
            fit={"best_epoch": fit.best_epoch, "epochs_run": len(fit.history), "train_seconds": round(fit.seconds, 3),
                 "rows": {name: len(split) for name, split in data.splits.items()},
                 "rows_not_done": data.excluded, "history": fit.history},
        )
    except BaseException:
        discard_partial(partial)
        raise
    run_dir = finish_out_dir(partial, out)
    if not quiet:
        print_summary(run_dir, data=data, metrics=metrics)
    return run_dir, metrics


def run_config(*, cache_path, data, settings, device, class_weights_used: dict, n_bootstrap, extra=None) -> dict:
    return {
        "model": "head", "settings": settings, "cache": str(Path(_first(cache_path)).resolve()),
        "cache_fingerprint": data.attrs["fingerprint"],
        "caches": [{key: entry[key] for key in ("name", "path", "fingerprint", "columns")} for entry in data.caches],
        "cache_attrs": {k: v for k, v in data.attrs.items() if k not in ("versions", "created")},
        "device": str(device), "class_weights": {**class_weights_used, "formula": WEIGHTING_FORMULA},
        "standardization": "features minus train mean, divided by train std (stored in head.pt)",
        "selection": "epoch with the best validation mean AUC; test is scored once, after training",
        "bootstrap": {"resamples": n_bootstrap, "unit": "patient", "seed": settings["seed"]},
        "versions": versions(**{"scikit-learn": sklearn.__version__}),
        **(extra or {}),
    }


def _first(cache_paths):
    return cache_paths if isinstance(cache_paths, (str, Path)) else list(cache_paths)[0]


def print_summary(run_dir, *, data: HeadData, metrics: dict) -> None:
    print(format_table(per_class_table(data.classes, metrics)))
    rows = ", ".join(f"{n} {metrics['rows'][n]}" for n in ("train", "val", "test"))
    skipped = {k: v for k, v in data.excluded.items() if v}
    print(f"\nrows: {rows}" + (f" (not done, excluded: {skipped})" if skipped else ""))
    if metrics["test"]["not_scorable"]:
        print(f"not scorable on test (one label value only), left out of the mean: {metrics['test']['not_scorable']}")
    print(f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']} (validation mean AUC "
          f"{metrics['val']['mean_auc']:.4f}); trained in {metrics['train_seconds']:.1f}s")
    print(f"run directory: {run_dir}")
