"""What a search leaves beside its study: trials.csv, best_params.json, config.json and plots.

    best_run/                 the best trial retrained, a full heads.train run directory
    trials.csv                every trial: number, state, value, params, duration, fail reason
    best_params.json          the best trial's settings and its validation AUC, in the study
                              and on retraining (equal on CPU, where training is deterministic)
    config.json               the search's own settings (storage URL with its password masked)
    optimization_history.png  validation mean AUC per trial and the best so far
    param_importances.png     which settings mattered (fANOVA), once enough trials completed
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from cache.outdir import is_kit_dir
from heads.run import print_summary as print_run_summary
from search.storage import mask_url


def write_search_outputs(out, *, study, best, settings, metrics, config) -> None:
    trials = study.trials_dataframe(attrs=("number", "state", "value", "params", "duration", "user_attrs"))
    trials.to_csv(out / "trials.csv", index=False)
    retrained = metrics["val"]["mean_auc"]
    (out / "best_params.json").write_text(json.dumps({
        "trial": best.number, "params": best.params, "settings": settings,
        "study_val_mean_auc": best.value, "retrained_val_mean_auc": retrained,
        "retrained_test_mean_auc": metrics["test"]["mean_auc"],
    }, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if abs(retrained - best.value) > 1e-6:
        print(f"note: retraining trial #{best.number} gave validation mean AUC {retrained:.6f}, the study "
              f"holds {best.value:.6f} (expected on GPUs, whose kernels are not deterministic)")
    plot_search(out, study)


def plot_search(out, study) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        axes = optuna.visualization.matplotlib.plot_optimization_history(study, target_name="validation mean AUC")
        axes.figure.set_size_inches(9, 5)
        axes.figure.savefig(out / "optimization_history.png", dpi=90, bbox_inches="tight")
        plt.close(axes.figure)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(complete) < 2:
            return
        try:
            axes = optuna.visualization.matplotlib.plot_param_importances(study)
        except (ValueError, RuntimeError):  # e.g. every completed trial had the same settings
            return
        axes.figure.set_size_inches(9, 5)
        axes.figure.savefig(out / "param_importances.png", dpi=90, bbox_inches="tight")
        plt.close(axes.figure)


def print_summary(study, *, out, url, ran, seconds, best, metrics, run_dir, data) -> None:
    """The study's counts (and how many trials this process finished), the best trial, its run."""
    states = {state: len(study.get_trials(deepcopy=False, states=(state,)))
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    print(f"\nstudy {study.study_name!r}: {states[TrialState.COMPLETE]} complete, {states[TrialState.PRUNED]} pruned, "
          f"{states[TrialState.FAIL]} failed; this process finished {ran} of them in {seconds:.1f}s")
    print(f"best trial #{best.number}: validation mean AUC {best.value:.4f} with {best.params}")
    print("retrained and scored once on test:\n")
    print_run_summary(run_dir, data=data, metrics=metrics)
    print(f"search folder: {out} (trials.csv, best_params.json, optimization_history.png, param_importances.png)")
    print(f"study storage: {mask_url(url)}   browse it: optuna-dashboard {mask_url(url)}")


STANDING_DEPTH = 4  # how deep under the output tree run directories are looked for


def output_tree(out: Path) -> Path:
    """The tree whose runs the best run is set against: `outputs/` for the default
    `outputs/search/<study>`, else the folder holding the search folder."""
    return out.parent.parent if out.parent.name == "search" else out.parent


def find_runs(root: Path) -> list:
    """Run directories the kit wrote under `root` (a marker and a metrics.json), nearest first."""
    runs = []
    for depth in range(1, STANDING_DEPTH + 1):
        for metrics in sorted(root.glob("/".join(["*"] * depth) + "/metrics.json")):
            if is_kit_dir(metrics.parent):
                runs.append(metrics.parent)
    return runs


def print_standing(out: Path, run_dir: Path) -> None:
    """Where the best run stands, by test mean AUC, among the other runs in the same output tree."""
    root = output_tree(Path(out))
    scores = {}
    for run in find_runs(root):
        try:
            scores[run.resolve()] = json.loads((run / "metrics.json").read_text())["test"]["mean_auc"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a run this version can read: left out of the standing
    mine = scores.pop(Path(run_dir).resolve(), None)
    if mine is None or not scores:
        return
    rank = 1 + sum(score > mine for score in scores.values())
    leader = max(scores, key=scores.get)
    print(f"\namong {len(scores) + 1} runs under {root}: this best run is #{rank} by test mean AUC ({mine:.4f}; "
          f"best of the others {scores[leader]:.4f}, {leader})")
    print(f"is the difference real? paired test on the same patients: python -m heads.compare {run_dir} {leader}")
