"""Successive halving inside a pass (search.passes.Halving): the heads a pass keeps train exactly
as they would alone, a head stopped at a rung is a PRUNED trial that says which rung, linear heads
are never cut, a kill at any rung still ends with exactly N trials, and the best trial retrained
alone gives its value."""
import json
import os
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from conftest import REPO, call_main
from heads import settings as head_settings
from heads.data import load_head_data
from heads.fit import fit_head
from search.passes import Halving, SearchContext, train_pass

QUICK = ["--max-epochs", "12", "--patience", "3", "--bootstrap", "20", "--device", "cpu"]
BASE = {**head_settings.DEFAULTS, "max_epochs": 9, "patience": 9, "precision": "fp32"}
SMALL = {"depth": 2, "width": 8}  # a rung cuts only heads with hidden layers
# Two batch sizes (two minibatch streams that must advance together), two shapes, and learning
# rates far enough apart that the rungs have a clear order to find.
PASS = [
    {**BASE, **SMALL, "batch_size": 128, "lr": 3e-3},
    {**BASE, **SMALL, "batch_size": 128, "lr": 1e-5},
    {**BASE, "batch_size": 128, "lr": 1e-3, "depth": 1, "width": 16},
    {**BASE, "batch_size": 256, "lr": 2e-5, "depth": 1, "width": 16},
    {**BASE, **SMALL, "batch_size": 256, "lr": 1e-2, "weight_decay": 1e-3},
    {**BASE, **SMALL, "batch_size": 256, "lr": 3e-5, "class_weighting": "none"},
    {**BASE, **SMALL, "batch_size": 256, "lr": 3e-4},
    {**BASE, "batch_size": 128, "lr": 5e-5, "depth": 1, "width": 16, "dropout": 0.2},
]
# Linear heads: slow starters that no rung may judge
LINEAR = [{**BASE, "batch_size": 128, "lr": 1e-5}, {**BASE, "batch_size": 256, "lr": 3e-5}]


def _study(out):
    return optuna.load_study(study_name="cxr14-heads", storage=f"sqlite:///{out / 'study.db'}")


def _finished(study):
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def _same(a, b, *, atol=1e-5):
    assert a.best_epoch == b.best_epoch and len(a.history) == len(b.history)
    assert [h["val_mean_auc"] for h in a.history] == pytest.approx([h["val_mean_auc"] for h in b.history], abs=atol)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert (x - y).abs().max() <= atol, name


def _halving_pass(small_cache, halving, heads=PASS):
    """`heads` trained as one pass of a study under `halving`: (data, study, trials, results, stopped_at)."""
    data = load_head_data(small_cache)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    trials = [study.ask() for _ in heads]
    run = SearchContext(study=study, data=data, fixed=BASE, device="cpu", target=len(heads), liveness=None,
                        halving=halving)
    return (data, study, trials, *train_pass(run, trials, heads, n_jobs=1))


def test_a_halving_pass_equals_its_heads_trained_alone_for_the_same_epochs(small_cache):
    data, _, _, results, stopped_at = _halving_pass(small_cache, Halving(first_rung=2, eta=2))
    # rungs at epochs 2 and 4 and 8 (below max_epochs 9): 8 heads -> 4 -> 2 -> 1
    assert sorted(stopped_at.values()) == [(1, 2)] * 4 + [(2, 4)] * 2 + [(3, 8)]
    survivor = [i for i in range(len(PASS)) if i not in stopped_at]
    assert len(survivor) == 1 and results[survivor[0]].status == "complete"
    for index, result in enumerate(results):
        epochs = stopped_at[index][1] if index in stopped_at else BASE["max_epochs"]
        assert result.status == ("pruned" if index in stopped_at else "complete")
        _same(fit_head(train=data.train, val=data.val, settings={**PASS[index], "max_epochs": epochs},
                       device="cpu"), result)
    # each rung kept the heads with the best validation AUC so far, across both batch sizes
    for rung, epoch in ((1, 2), (2, 4), (3, 8)):
        best_at = {i: max(h["val_mean_auc"] for h in results[i].history[:epoch]) for i in range(len(PASS))
                   if len(results[i].history) >= epoch}
        cut = [i for i, where in stopped_at.items() if where == (rung, epoch)]
        went_on = [i for i in best_at if i not in cut and len(results[i].history) > epoch]
        assert cut and went_on and max(best_at[i] for i in cut) < min(best_at[i] for i in went_on)
    assert {PASS[i]["batch_size"] for i in stopped_at} == {128, 256}


def test_a_rung_inside_an_epoch_cuts_there_and_the_survivors_still_train_as_alone(small_cache):
    from heads.fit import Training

    data, study, trials, results, stopped_at = _halving_pass(small_cache, Halving(first_rung=0.5, eta=2))
    # rungs at 0.5, 1, 2, 4 and 8 epochs: 8 heads -> 4 -> 2 -> 1 (the last two cut nothing)
    assert sorted(stopped_at.values()) == [(1, 0.5)] * 4 + [(2, 1)] * 2 + [(3, 2)]
    for index, result in enumerate(results):
        if stopped_at.get(index) == (1, 0.5):  # cut before any epoch ended: its half-epoch AUC, at step 0
            assert result.status == "pruned" and result.history == [] and result.model is None
            alone = Training([index], PASS, train=data.train, val=data.val, device="cpu")
            alone.run_until(0.5)
            assert study.trials[trials[index].number].intermediate_values == {
                0: pytest.approx(alone.current_val_aucs()[index], abs=1e-6)}
            continue
        epochs = stopped_at[index][1] if index in stopped_at else BASE["max_epochs"]
        _same(fit_head(train=data.train, val=data.val, settings={**PASS[index], "max_epochs": epochs},
                       device="cpu"), result)


def test_linear_heads_are_never_cut_and_train_as_alone(small_cache):
    heads = LINEAR[:1] + PASS + LINEAR[1:]
    data, _, _, results, stopped_at = _halving_pass(small_cache, Halving(first_rung=2, eta=2), heads)
    # the rungs cut the 8 hidden-layer heads as in a pass of those alone: 4 -> 2 -> 1
    assert sorted(stopped_at.values()) == [(1, 2)] * 4 + [(2, 4)] * 2 + [(3, 8)]
    for index in (0, len(heads) - 1):
        assert index not in stopped_at and results[index].status == "complete"
        _same(fit_head(train=data.train, val=data.val, settings=heads[index], device="cpu"), results[index])
    # below the first rung the slowest linear head is worse than a head the rungs kept going
    kept_going = [i for i in range(1, len(heads) - 1) if stopped_at.get(i, (9, 9))[1] > 2]
    assert results[0].history[1]["val_mean_auc"] < max(results[i].history[1]["val_mean_auc"] for i in kept_going)


def test_the_pruner_stops_any_head_but_a_linear_one_under_halving():
    from search.passes import _pruner_callback
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trials = [study.ask() for _ in range(2)]  # every value is below 2: the pruner would stop both
    settings = [{"depth": 0}, {"depth": 1}]
    on_epoch = _pruner_callback(trials, uncut=Halving(first_rung=1, eta=3).uncut(settings))
    assert on_epoch(0, 1, 0.6) is True and on_epoch(1, 1, 0.6) is False
    assert Halving.off().uncut(settings) == frozenset()  # without halving the pruner judges every head


def test_the_default_first_rung_is_set_in_rows_seen():
    assert Halving.for_rows(20_000, train_rows=19_536, eta=3).rungs(30) == [1, 3, 9, 27]  # one epoch, at most
    assert Halving.for_rows(20_000, train_rows=78_146, eta=3).rungs(30) == [0.256, 0.768, 2.304, 6.912, 20.736]
    assert Halving.for_rows(20_000, train_rows=600, eta=3).rungs(30) == [1, 3, 9, 27]


def test_pruned_trials_carry_their_rung_and_the_best_retrained_alone_gives_its_value(small_cache, tmp_path):
    out = tmp_path / "s"
    call_main("search", "--cache", small_cache, "--out", out, "--trials", "16", "--trials-per-pass", "8",
              "--halving-first-rung", "2", "--halving-eta", "2", "--pruner", "none", *QUICK, check_rc=0)
    study = _study(out)
    assert len(study.trials) == 16 and len(_finished(study)) == 16
    at_rungs = [t for t in study.trials if "halving_rung" in t.user_attrs]
    # two passes of 8, each cut at epochs 2 (to half its hidden-layer heads), 4 and 8; patience 3
    # cannot stop a head before epoch 4, so the first rung stops exactly that many of each pass
    for first in (0, 8):
        hidden = [t for t in study.trials[first:first + 8] if t.params["depth"] > 0]
        kept = min(len(hidden), max(1, len(hidden) // 2))
        assert sum(t.user_attrs.get("halving_rung") == 1 for t in hidden) == len(hidden) - kept
    assert at_rungs and all(t.params["depth"] > 0 for t in at_rungs)  # linear heads are never cut
    for trial in at_rungs:
        rung, epoch = trial.user_attrs["halving_rung"], trial.user_attrs["halving_rung_epoch"]
        assert trial.state == TrialState.PRUNED and epoch == 2 * 2 ** (rung - 1)
        assert max(trial.intermediate_values) == epoch and len(trial.intermediate_values) == epoch
    assert all(t.state == TrialState.COMPLETE for t in study.trials if t not in at_rungs)
    assert "user_attrs_halving_rung" in (out / "trials.csv").read_text()
    best = json.loads((out / "best_params.json").read_text())
    assert best["retrained_val_mean_auc"] == pytest.approx(study.best_value, abs=1e-9)
    config = json.loads((out / "config.json").read_text())
    assert config["halving"] == {"first_rung": 2, "eta": 2}


# Kills this process (SIGKILL, nothing cleaned up) when a trial of the second pass reports `step`.
KILL_AT_STEP = """
import os, signal, sys
import optuna
real_report = optuna.trial.Trial.report
def report(self, value, step):
    if self.number >= {first_pass} and step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_report(self, value, step)
optuna.trial.Trial.report = report
from search.__main__ import get_args_parser, main
sys.exit(main(get_args_parser().parse_args(sys.argv[1:])))
"""


@pytest.mark.parametrize("step", [1, 3, 6, 10], ids=["before-rung-1", "rung-1-to-2", "rung-2-to-3", "after-rung-3"])
def test_a_kill_at_any_rung_resumes_to_exactly_n(small_cache, tmp_path, step):
    out = tmp_path / "s"
    flags = ["--cache", str(small_cache), "--out", str(out), "--trials", "12", "--pruner", "none",
             "--halving-first-rung", "2", "--halving-eta", "2", *QUICK, "--patience", "20"]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_STEP.format(first_pass=8, step=step),
                             *flags, "--trials-per-pass", "8"],
                            cwd=REPO, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    study = _study(out)
    assert len(_finished(study)) == 8  # the first pass was told; the second was cut off mid-rung
    running = [t for t in study.trials if t.state == TrialState.RUNNING]
    assert len(running) == 4 and max(max(t.intermediate_values, default=0) for t in running) == step - 1
    call_main("search", *flags, "--trials-per-pass", "8", check_rc=0)
    study = _study(out)
    assert len(_finished(study)) == 12 and all(t.state != TrialState.RUNNING for t in study.trials)
    interrupted = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 4 and all(t.user_attrs["fail_reason"].startswith("interrupted") for t in interrupted)
    numbers = [t.number for t in study.trials]
    assert len(study.trials) == 16 and numbers == list(range(16))


def test_a_trial_another_worker_failed_as_stale_is_neither_told_nor_fatal():
    """A worker that was stopped (SIGSTOP, swap) finds its trial failed by a live worker: telling
    it, or reporting an epoch on it, must not crash the pass or fail the other heads."""
    from heads.fit import FitResult
    from search.passes import _pruner_callback, tell
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    study.tell(trial, state=TrialState.FAIL)  # as the live worker's stale check does
    result = FitResult(model=None, best_epoch=3, best_val_auc=0.7, seconds=1.0, history=[{}] * 4)
    assert tell(study, trial, result, attrs={"halving_rung": 1, "halving_rung_epoch": 3}) == 0
    assert _pruner_callback([trial])(0, 1, 0.6) is False
    assert study.trials[0].state == TrialState.FAIL
