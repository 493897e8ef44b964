"""A search's two figures, drawn with matplotlib in the kit's plain style (that of
roc_curves.png and comparison.png) rather than Optuna's plotting module, so that every trial is
shown as what it is: complete, pruned (stopped early; its last validation AUC is all it has) or
failed (no value at all)."""
from __future__ import annotations

import warnings

import optuna
from optuna.trial import TrialState

# Importances from fewer completed trials than this are a forest fitted to a handful of points.
FEW_TRIALS_FOR_IMPORTANCE = 20
IMPORTANCE_SEED = 0  # fANOVA's random forest: a rerun draws the same chart
DPI = 90


def plot_history(path, study) -> None:
    """Validation mean AUC per trial number: complete trials, pruned ones at their last
    reported AUC, failed ones as ticks on the axis, and the best complete value so far."""
    plt = _pyplot()
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    fig, ax = plt.subplots(figsize=(9, 5))
    ax.plot([t.number for t in complete], [t.value for t in complete], "o", ms=5, color="C0",
            label=f"complete ({len(complete)})")
    ax.plot([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned], "x",
            ms=5, color="0.55", label=f"pruned ({len(pruned)}): last validation AUC before it was stopped")
    if complete:
        best_so_far, numbers = [], []
        for trial in sorted(complete, key=lambda t: t.number):
            best_so_far.append(max(trial.value, best_so_far[-1]) if best_so_far else trial.value)
            numbers.append(trial.number)
        ax.step(numbers, best_so_far, where="post", color="C3", lw=1.2, label="best complete so far")
    if failed:
        ax.plot([t.number for t in failed], [0.03] * len(failed), "|", ms=12, mew=2, color="C1",
                transform=ax.get_xaxis_transform(), label=f"failed ({len(failed)}): no value")
    ax.set_xlabel("trial number")
    from matplotlib.ticker import MaxNLocator  # imported late, as pyplot is: after the Agg backend is set
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation mean AUC")
    ax.set_title(f"search {study.study_name!r}: {len(trials)} trials (test data never seen)", fontsize=11)
    ax.grid(color="0.9", lw=0.6)
    ax.set_axisbelow(True)
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_importances(path, study) -> bool:
    """Which settings mattered (fANOVA over the complete trials), with a caveat on the figure
    when few trials carry it. False, and no file, when it cannot be computed (fewer than two
    complete trials, or no setting varied among them)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna warns on settings present in only some trials
            importances = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=IMPORTANCE_SEED))
    except (ValueError, RuntimeError):  # e.g. every completed trial had the same settings
        return False
    if not importances:
        return False
    plt = _pyplot()
    names = list(importances)[::-1]  # the largest on top
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.8))
    ax.barh(names, [importances[name] for name in names], color="C0", height=0.6)
    for y, name in enumerate(names):
        ax.text(importances[name], y, f" {importances[name]:.2f}", va="center", fontsize=9)
    ax.set_xlim(0, max(1.0, max(importances.values()) * 1.15))
    ax.set_xlabel("share of the variance of validation mean AUC (fANOVA)")
    ax.set_title(f"which settings mattered, over {len(complete)} complete trials (pruned and failed left out)",
                 fontsize=11)
    ax.grid(axis="x", color="0.9", lw=0.6)
    ax.set_axisbelow(True)
    if len(complete) < FEW_TRIALS_FOR_IMPORTANCE:
        fig.text(0.5, 0.01, f"caution: only {len(complete)} complete trials (under {FEW_TRIALS_FOR_IMPORTANCE}); "
                 "importances this few trials carry are rough and may change with more", ha="center",
                 fontsize=9, color="C3")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
