"""Trials run in passes: K trials asked from Optuna at once (TPE with the constant-liar strategy,
so that a pass spreads out instead of proposing K near-copies), their heads trained side by side
(`heads.fit.Training`: heads of one batch size share one stream of minibatches), each head
reported and pruned on its own, then all K told to the study in trial-number order.

Successive halving inside a pass (`Halving`): most of a search's epochs would go to heads that
lose, so at each rung the pass keeps only its best heads by validation AUC. The groups of a pass
advance one epoch at a time together, so that a rung compares all K heads at the same epoch.

Why this order makes threaded searches reproducible: trials are asked by one thread, before any
of them trains, from a study whose content depends only on earlier passes; the median pruner
compares only completed trials, which change only between passes; a rung is decided after every
group has finished the epoch. Threads (`--n-jobs`) share the training of a pass, and each head's
result does not depend on its neighbours.

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
from heads.fit import FitResult, Training
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
    halving: "Halving | None" = None  # successive halving inside each pass; None: none


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
            results, stopped_at = train_pass(run, trials, settings, n_jobs=n_jobs)
        finished = 0
        for index in sorted(range(len(trials)), key=lambda i: trials[i].number):
            rung = dict(zip(("halving_rung", "halving_rung_epoch"), stopped_at[index])) if index in stopped_at else {}
            finished += tell(run.study, trials[index], results[index], attrs=rung)
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


def train_pass(run: SearchContext, trials: list, settings: list, *, n_jobs: int) -> tuple[list, dict]:
    """Heads that can share minibatches (one batch size, one feature set) train together; the
    groups, split into `n_jobs` shares, train side by side one epoch at a time in threads, and
    at each rung of `run.halving` the pass keeps its best heads. Returns one FitResult per trial
    and {trial index: (rung, epoch)} for the heads a rung stopped."""
    groups = {}
    for index, chosen in enumerate(settings):
        groups.setdefault((chosen["batch_size"], chosen.get("features", "")), []).append(index)
    units = [share for members in groups.values() for share in _split(members, n_jobs)]
    trainings = [start_training(run, settings, members) for members in units]
    halving = run.halving or Halving.off()
    uncut = halving.uncut(settings)
    on_epoch = _pruner_callback(trials, uncut=uncut)
    rungs = halving.rungs(run.fixed["max_epochs"])
    stopped_at = {}
    with ThreadPoolExecutor(max_workers=max(1, min(n_jobs, len(units)))) as pool:
        epoch = 0
        while any(training.live() for training in trainings):
            epoch += 1
            for point in [rung for rung in rungs if epoch - 1 < rung < epoch] + [epoch]:
                live = [t for t in trainings if t.live()]
                list(pool.map(lambda training: _run_until(training, point, on_epoch), live))
                if point in rungs:
                    rung = rungs.index(point) + 1
                    cut = halving.cut(trainings, rung=rung, started=len(trials) - len(uncut), trials=trials,
                                      inside_epoch=point != epoch, uncut=uncut)
                    for index, val_auc in cut.items():
                        stopped_at[index] = (rung, point)
                        if point < 1:  # cut inside its first epoch: the rung's figure is its only one
                            _report_first(trials[index], val_auc)
    results = [None] * len(trials)
    for training in trainings:
        for index, result in training.results.items():
            results[index] = result
    return results, stopped_at


def _split(members: list, shares: int) -> list:
    size = -(-len(members) // shares)
    return [members[start:start + size] for start in range(0, len(members), size)]


def start_training(run: SearchContext, settings: list, members: list):
    """The heads of `members` on one minibatch stream (heads.fit.Training); a group whose
    stacks cannot be built (out of memory) comes back already failed."""
    train, val = feature_view(run, settings[members[0]])
    try:
        return Training(members, settings, train=train, val=val, device=run.device)
    except TRAINING_ERRORS as err:
        return _FailedTraining({index: _failed(f"{type(err).__name__}: {err}") for index in members})


def _pruner_callback(trials: list, *, uncut=frozenset()):
    """Report each epoch; the pruner may stop any head but those of `uncut` (Halving.uncut)."""
    def on_epoch(index, epoch, val_auc):
        try:
            trials[index].report(val_auc, epoch)
        except optuna.exceptions.UpdateFinishedTrialError:
            return False  # failed as stale by another worker: stop this head, not its whole group
        return index in uncut or not trials[index].should_prune()
    return on_epoch


def _report_first(trial, val_auc: float) -> None:
    """Report a head cut before its first epoch ended at step 0, so that the sampler can tell
    it from the others cut there (a pruned trial without values ranks last)."""
    try:
        trial.report(val_auc, 0)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass  # failed as stale by another worker


def _run_until(training, point: float, on_epoch) -> None:
    """Train to `point` epochs; a failure of the whole group (out of memory) fails each of its live heads."""
    try:
        training.run_until(point, on_epoch=on_epoch)
    except TRAINING_ERRORS as err:
        training.abandon(f"{type(err).__name__}: {err}")


@dataclass
class _FailedTraining:
    results: dict

    def live(self) -> list:
        return []


@dataclass(frozen=True)
class Halving:
    """Synchronous successive halving inside a pass (Jamieson and Talwalkar 2016, the inner loop
    of Hyperband): every head of the pass trains `first_rung` epochs, then the best 1/eta by
    validation AUC (on the full val split) go on to `first_rung * eta` epochs, and so on; after
    the last rung below max_epochs the survivors train until early stopping, as a trial alone
    would. A rung stops only other heads, so a surviving head trains exactly as it would alone.
    eta 1 is no halving.

    A rung may fall inside an epoch (`first_rung` below 1, or not a whole number): the pass stops
    after that share of the epoch's minibatches, ranks the heads by the larger of their best
    epoch so far and their validation AUC at that point, and the survivors go on with the same
    minibatches. What a rung measures is how much data a head has seen, so `for_rows` sets the
    first rung in rows: a cache with more train rows cuts at the same amount of training.

    Linear heads are never cut (`uncut`): neither a rung nor the pruner stops them, and they
    train to early stopping. An epoch of one costs a small fraction of a hidden-layer head's, so
    cutting it saves next to nothing, while an early judgment is most wrong about it: a linear
    head starts slowest and often ends best on frozen features (docs/performance.md)."""
    first_rung: float
    eta: int

    @classmethod
    def off(cls) -> "Halving":
        return cls(first_rung=1, eta=1)

    @classmethod
    def for_rows(cls, rows_seen: int, *, train_rows: int, eta: int) -> "Halving":
        """A first rung after `rows_seen` train rows (at most one epoch: a small cache cuts after
        its first epoch), rounded to 1/1000 of an epoch."""
        share = max(0.001, round(rows_seen / max(train_rows, 1), 3))
        return cls(first_rung=1 if share >= 1 else share, eta=eta)

    def rungs(self, max_epochs: int) -> list:
        """The points, in epochs, after which a pass is cut."""
        if self.eta < 2:
            return []
        points, rung = [], 0
        while round(self.first_rung * self.eta ** rung, 6) < max_epochs:
            point = round(self.first_rung * self.eta ** rung, 6)
            points.append(int(point) if point == int(point) else point)
            rung += 1
        return points

    def uncut(self, settings: list) -> frozenset:
        """The indices of `settings` that no rung and no pruner stops: the linear heads, when halving is on."""
        if self.eta < 2:
            return frozenset()
        return frozenset(index for index, chosen in enumerate(settings) if chosen["depth"] == 0)

    def cut(self, trainings: list, *, rung: int, started: int, trials: list, inside_epoch: bool = False,
            uncut=frozenset()) -> dict:
        """Stop all but the best max(1, started // eta^rung) live heads outside `uncut` (ties:
        the earlier trial); returns {trial index stopped: the validation AUC it was ranked by}.
        `started` counts the heads a rung may cut. The count follows the schedule, not the heads
        still live, so heads the pruner or early stopping ended do not shrink the later rungs.
        Inside an epoch a head is ranked by the larger of its best epoch so far and its
        validation AUC now."""
        keep = max(1, started // self.eta ** rung)
        now = {}
        if inside_epoch:
            for training in trainings:
                if training.live():
                    now.update(training.current_val_aucs())
        live = [(training, index) for training in trainings for index in training.live() if index not in uncut]

        def score(training, index):
            return max(training.best_val_auc(index), now.get(index, float("-inf")))
        ranked = sorted(live, key=lambda item: (-score(*item), trials[item[1]].number))
        losers, ranked_by = {}, {}
        for training, index in ranked[keep:]:
            losers.setdefault(id(training), (training, []))[1].append(index)
            ranked_by[index] = score(training, index)
        for training, indices in losers.values():
            training.stop(indices, status="pruned")
        return dict(sorted(ranked_by.items()))


def _failed(reason: str) -> FitResult:
    return FitResult(model=None, best_epoch=0, best_val_auc=float("nan"), seconds=0.0, status="failed",
                     fail_reason=reason)


def feature_view(run: SearchContext, settings: dict):
    """The train and val splits a trial sees: never test, and only its feature set's columns."""
    if not run.feature_sets:
        return run.data.train, run.data.val
    view = run.data.select(run.feature_sets[settings["features"]])
    return view.train, view.val


def tell(study, trial, result, *, attrs: dict | None = None) -> int:
    """Tell one trial's outcome (with `attrs` as user attributes); 1 if it counts as finished by
    this process."""
    try:  # the attributes too: Optuna refuses them on a trial another worker failed as stale
        for key, value in {**(attrs or {}), "best_epoch": int(result.best_epoch),
                           "epochs_run": len(result.history)}.items():
            trial.set_user_attr(key, value)
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

