"""Trials run in passes: K trials asked from Optuna at once (TPE with the constant-liar strategy,
so that a pass spreads out instead of proposing K near-copies), their heads trained together by
`heads.fit.fit_heads` on one stream of minibatches, each head reported and pruned on its own,
then all K told to the study in trial-number order.

Why this order makes threaded searches reproducible: trials are asked by one thread, before any
of them trains, from a study whose content depends only on earlier passes; the median pruner
compares only completed trials, which change only between passes. Threads (`--n-jobs`) share the
training of a pass, and each head's result does not depend on its neighbours.

Exactly N: a pass asks only for the room left (N minus finished and running trials), and every
trial asked is admitted only if fewer than N not-failed trials (finished, or asked and still
running, in any process) were created before it; a surplus trial from a race between workers is
failed at once with the reason "the study already held N trials". While a worker waits for
others' last trials it fails the stale ones of dead workers, so that they are replaced.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from heads import settings as head_settings
from heads.data import HeadsError
from heads.fit import FitResult, fit_heads
from search.study import FINISHED, admitted, count, fail_trial

POLL_S = 2.0  # how often a worker waiting for others' last trials looks again
TRAINING_ERRORS = (HeadsError, RuntimeError, MemoryError, ValueError)  # NaN loss, out of memory
SURPLUS_REASON = "surplus: the study already held {target} finished or running trials when this one was created"


@dataclass
class SearchContext:
    """What every pass of one search shares: the study, the data, the fixed settings, the target N."""
    study: optuna.Study
    data: object  # heads.data.HeadData
    fixed: dict
    device: object
    target: int
    liveness: object  # search.liveness.Liveness
    feature_sets: dict | None = None  # name -> block names, when several caches are searched


def run_passes(run: SearchContext, *, per_pass: int, n_jobs: int, deadline: float | None, on_pass=None) -> int:
    """Run passes until the study holds `run.target` finished trials (or the deadline passes);
    returns how many trials this process finished (complete or pruned)."""
    finished_here = 0
    while deadline is None or time.time() < deadline:
        run.liveness.fail_stale(run.study)
        finished, running = count(run.study, FINISHED), count(run.study, (TrialState.RUNNING,))
        if finished >= run.target:
            break
        room = run.target - finished - running
        if room <= 0:
            time.sleep(POLL_S)  # another worker's trial may still fail and need replacing
            continue
        trials = ask_admitted(run, n_trials=min(room, per_pass * n_jobs))
        finished_here += run_one_pass(run, trials, n_jobs=n_jobs)
        if on_pass is not None:
            on_pass()
    return finished_here


def ask_admitted(run: SearchContext, *, n_trials: int) -> list:
    """Up to `n_trials` new trials, each claimed for this worker and admitted under the exact-N rule."""
    trials = []
    for _ in range(n_trials):
        trial = run.study.ask()
        run.liveness.claim(run.study, trial)
        if not admitted(run.study, trial, run.target):
            fail_trial(run.study, trial, SURPLUS_REASON.format(target=run.target))
            break  # every later trial would be surplus too
        trials.append(trial)
    return trials


def run_one_pass(run: SearchContext, trials: list, *, n_jobs: int) -> int:
    """Train the heads of `trials` and tell each to the study; returns how many finished."""
    if not trials:
        return 0
    told = set()
    try:
        settings = [suggest(run, trial) for trial in trials]
        with run.liveness.beating(run.study, trials):
            results = train_pass(run, trials, settings, n_jobs=n_jobs)
        finished = 0
        for index in sorted(range(len(trials)), key=lambda i: trials[i].number):
            finished += tell(run.study, trials[index], results[index])
            told.add(index)
        return finished
    finally:  # interrupted (Ctrl-C) or crashed: leave no trial RUNNING for others to wait on
        for index, trial in enumerate(trials):
            if index not in told:
                fail_trial(run.study, trial, "interrupted before it finished")


def suggest(run: SearchContext, trial) -> dict:
    settings = head_settings.suggest(trial, base=run.fixed)
    if run.feature_sets:
        settings["features"] = trial.suggest_categorical("features", list(run.feature_sets))
    return settings


def train_pass(run: SearchContext, trials: list, settings: list, *, n_jobs: int) -> list:
    """Heads that can share minibatches (one batch size, one feature set) train together; the
    groups, split into `n_jobs` shares, run in threads. Returns one FitResult per trial."""
    groups = {}
    for index, chosen in enumerate(settings):
        groups.setdefault((chosen["batch_size"], chosen.get("features", "")), []).append(index)
    units = [share for members in groups.values() for share in _split(members, n_jobs)]
    results = [None] * len(trials)
    with ThreadPoolExecutor(max_workers=max(1, min(n_jobs, len(units)))) as pool:
        for unit_results in pool.map(lambda unit: train_group(run, trials, settings, unit), units):
            for index, result in unit_results:
                results[index] = result
    return results


def _split(members: list, shares: int) -> list:
    size = -(-len(members) // shares)
    return [members[start:start + size] for start in range(0, len(members), size)]


def train_group(run: SearchContext, trials: list, settings: list, members: list) -> list:
    """fit_heads on one group; a failure of the whole group (out of memory) fails each of its trials."""
    def on_epoch(position, epoch, val_auc):
        trial = trials[members[position]]
        trial.report(val_auc, epoch)
        return not trial.should_prune()

    train, val = feature_view(run, settings[members[0]])
    try:
        results = fit_heads(train=train, val=val, settings_list=[settings[i] for i in members], device=run.device,
                            on_epoch=on_epoch)
    except TRAINING_ERRORS as err:
        reason = f"{type(err).__name__}: {err}"
        results = [_failed(reason) for _ in members]
    return list(zip(members, results))


def _failed(reason: str) -> FitResult:
    return FitResult(model=None, best_epoch=0, best_val_auc=float("nan"), seconds=0.0, status="failed",
                     fail_reason=reason)


def feature_view(run: SearchContext, settings: dict):
    """The train and val splits a trial sees: never test, and only its feature set's columns."""
    if not run.feature_sets:
        return run.data.train, run.data.val
    view = run.data.select(run.feature_sets[settings["features"]])
    return view.train, view.val


def tell(study, trial, result) -> int:
    """Tell one trial's outcome; 1 if it counts as finished by this process."""
    trial.set_user_attr("best_epoch", int(result.best_epoch))
    trial.set_user_attr("epochs_run", len(result.history))
    try:
        if result.status == "complete":
            study.tell(trial, result.best_val_auc)
        elif result.status == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr("fail_reason", str(result.fail_reason)[:500])
            study.tell(trial, state=TrialState.FAIL)
            return 0
    except optuna.exceptions.UpdateFinishedTrialError:
        return 0  # failed as stale by another worker while this one was stopped: not ours to count
    return 1

