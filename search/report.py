"""What a search leaves beside its study: trials.csv, best_params.json, config.json and plots.

    best_run/                 the best trial retrained, a full heads.train run directory
    trials.csv                every trial: number, state, value, params, pass_seconds (the
                              whole pass's time, shared by its K trials), fail reason
    best_params.json          the best trial's settings and its validation AUC, in the study
                              and on retraining (equal on CPU, where training is deterministic)
    config.json               the search's own settings (storage URL with its password masked)
    optimization_history.png  validation mean AUC per trial (pruned ones at their last value),
                              failed trials, and the best so far
    param_importances.png     which settings mattered (fANOVA over complete trials), with a
                              caveat on the figure when under 20 trials carry it
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from optuna.trial import TrialState

from heads.comparison import check_same_test_rows, load_run
from heads.runs import find_runs
from heads.training import print_summary as print_run_summary
from search import plots
from search.storage import mask_url


def write_search_outputs(out, *, study, best, settings, metrics, config) -> None:
    trials_table(study).to_csv(out / "trials.csv", index=False)
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
    plots.plot_history(out / "optimization_history.png", study)
    plots.plot_importances(out / "param_importances.png", study)


def trials_table(study) -> pd.DataFrame:
    """trials.csv: one row per trial. Its time is `pass_seconds`, from asked to told: the K
    trials of a pass train together, so that is the whole pass's time, shared, not the
    trial's own. Integer settings and attributes stay integers (pandas would write 128.0
    wherever another trial lacks the setting, as a linear head lacks a width)."""
    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "duration", "user_attrs"))
    if "duration" in frame:
        frame["duration"] = pd.to_timedelta(frame["duration"]).dt.total_seconds()
        frame = frame.rename(columns={"duration": "pass_seconds"})
    for column in _integer_columns(study):
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    return frame


def _integer_columns(study) -> list:
    """The params_ and user_attrs_ columns whose every value is an integer."""
    all_integers = {}
    for trial in study.get_trials(deepcopy=False):
        for prefix, values in (("params_", trial.params), ("user_attrs_", trial.user_attrs)):
            for name, value in values.items():
                integer = isinstance(value, int) and not isinstance(value, bool)
                all_integers[prefix + name] = all_integers.get(prefix + name, True) and integer
    return [column for column, integer in all_integers.items() if integer]


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


STANDING_DEPTH = 4  # how deep under the output tree run directories are looked for: it may be a home folder


def output_tree(out: Path) -> Path:
    """The tree whose runs the best run is set against: `outputs/` for the default
    `outputs/search/<study>`, else the folder holding the search folder."""
    return out.parent.parent if out.parent.name == "search" else out.parent


STANDING_SHOWN = 5  # other runs listed, and put in the heads.compare command


def print_standing(out: Path, run_dir: Path) -> None:
    """The other runs under the output tree scored on the best run's very test rows, ordered by
    validation mean AUC, and the heads.compare command that tests the differences on test.
    Test AUC neither ranks nor chooses here: a run on other test rows is left out, since no
    paired comparison with it is possible and its test AUC measures another thing."""
    root = output_tree(Path(out))
    try:
        mine = load_run(str(run_dir))
    except Exception:  # a hint must never fail a finished search
        return
    if not _finite(mine.val_mean_auc):
        return
    candidates = find_runs(root, max_depth=STANDING_DEPTH)
    peers = sorted(same_test_rows_runs(mine, candidates=candidates), key=lambda run: -run.val_mean_auc)
    if not peers:
        return
    shown = peers[:STANDING_SHOWN]
    print(f"\n{len(peers)} other run{'s' * (len(peers) > 1)} under {root} scored the same {len(mine.test)} test "
          f"images; by validation mean AUC (this best run: {mine.val_mean_auc:.4f}):")
    for run in shown:
        print(f"  {run.val_mean_auc:.4f}  {run.path}")
    print(f"are the differences on test real? paired tests on the same patients: python -m heads.compare "
          f"{run_dir} {' '.join(str(run.path) for run in shown)}")


def same_test_rows_runs(mine, *, candidates: list) -> list:
    """The runs among `candidates` (folders) that heads.compare would pair with `mine`: the same
    test images, patients, labels and classes, and a validation AUC to order them by."""
    peers = []
    for path in candidates:
        if path.resolve() == mine.path.resolve():
            continue
        try:
            run = load_run(str(path))
            check_same_test_rows([mine, run])
        except Exception:  # another test set, or a folder this version cannot read: left out
            continue
        if _finite(run.val_mean_auc):
            peers.append(run)
    return peers


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
