import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

import heads.training
import search.passes
import search.plots
import search.run
from heads.stack import HeadStack
from cache.synthetic import write_synthetic_cache
from conftest import REPO, call_main

QUICK = ["--max-epochs", "12", "--patience", "3", "--bootstrap", "20", "--device", "cpu"]


def _study(out, name="cxr14-heads"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def _finished(study):
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def _outcomes(study):
    """What a trial chose and scored: equal lists mean the same study."""
    return [(t.number, t.state.name, t.params, t.value, dict(t.intermediate_values)) for t in study.trials]


def test_small_study_end_to_end(small_cache, tmp_path, monkeypatch):
    test_calls = []
    real_predict = heads.training.predict_proba  # where every run directory scores a head

    def recording_predict(model, features):
        test_calls.append(features.shape[0])
        return real_predict(model, features)
    monkeypatch.setattr(heads.training, "predict_proba", recording_predict)
    out = tmp_path / "s"
    result = call_main("search", "--cache", small_cache, "--out", out, "--trials", "14", "--trials-per-pass", "4",
                       *QUICK, check_rc=0)
    study = _study(out)
    assert len(_finished(study)) == 14 and len(study.trials) == 14
    assert any(t.state == TrialState.PRUNED for t in study.trials), "the median pruner never pruned"
    best = json.loads((out / "best_params.json").read_text())
    assert best["study_val_mean_auc"] == study.best_value
    # the best trial, trained in a pass of 4 heads, retrained alone: the same value on CPU
    assert best["retrained_val_mean_auc"] == pytest.approx(study.best_value, abs=1e-9)
    metrics = json.loads((out / "best_run" / "metrics.json").read_text())
    assert metrics["val"]["mean_auc"] == pytest.approx(study.best_value, abs=1e-9)
    assert test_calls.count(500) == 1  # the 500 test rows: scored once, by the best run
    assert "test" not in " ".join(pd.read_csv(out / "trials.csv").columns)
    trials = pd.read_csv(out / "trials.csv", dtype=str)
    assert "pass_seconds" in trials and "duration" not in trials  # the pass's time, named as such
    assert trials["params_depth"].eq("0").any()  # a linear head has no width: the column has gaps
    for column in ("params_width", "params_batch_size", "params_depth", "user_attrs_best_epoch"):
        assert trials[column].dropna().str.fullmatch(r"\d+").all(), f"{column} written as floats"
    for name in ("trials.csv", "optimization_history.png", "param_importances.png", "config.json",
                 "best_run/predictions_test.csv", "best_run/head.pt", "best_run/roc_curves.png"):
        assert (out / name).exists(), name
    assert "best trial #" in result.stdout and "optuna-dashboard sqlite:///" in result.stdout
    assert "this process finished 14 of them" in result.stdout
    # a finished study is not extended by a rerun asking for the same count, and says so truthfully
    again = call_main("search", "--cache", small_cache, "--out", out, "--trials", "14", *QUICK, check_rc=0)
    assert len(_study(out).trials) == 14 and "this process finished 0 of them" in again.stdout


def test_trials_never_see_test_rows(small_cache, tmp_path, monkeypatch):
    """Poisoning the test split (noise features, flipped labels) changes no trial: if a trial were
    scored or trained on test, its values would move."""
    clean = tmp_path / "clean"
    call_main("search", "--cache", small_cache, "--out", clean, "--trials", "6", "--trials-per-pass", "3", *QUICK,
              check_rc=0)
    real_load = search.run.load_head_data

    def poisoned_load(*args, **kwargs):
        data = real_load(*args, **kwargs)
        data.test.features.copy_(torch_noise(data.test.features.shape))
        data.test.labels.copy_(1 - data.test.labels)
        return data
    monkeypatch.setattr(search.run, "load_head_data", poisoned_load)
    poisoned = tmp_path / "poisoned"
    call_main("search", "--cache", small_cache, "--out", poisoned, "--trials", "6", "--trials-per-pass", "3", *QUICK,
              check_rc=0)
    assert _outcomes(_study(poisoned)) == _outcomes(_study(clean))
    # ...while the test score of the retrained best run does see the poison
    test_auc = [json.loads((out / "best_run" / "metrics.json").read_text())["test"]["mean_auc"]
                for out in (clean, poisoned)]
    assert abs(test_auc[0] - test_auc[1]) > 0.05


def torch_noise(shape):
    import torch
    return torch.from_numpy(np.random.default_rng(1).standard_normal(shape).astype(np.float32))


def test_a_failing_head_fails_only_its_trial(small_cache, tmp_path, monkeypatch):
    real_losses = HeadStack.take_epoch_losses
    group = {}

    def second_head_goes_nan_at_epoch_3(stack, n_rows):
        losses = real_losses(stack, n_rows)
        if not group and len(stack) >= 2:  # the first stack of two heads or more trained together
            group.update(stack=stack, epochs=0, lrs=[settings["lr"] for settings in stack.settings])
        if group.get("stack") is stack:
            group["epochs"] += 1
            if group["epochs"] == 3:
                losses[1] = float("nan")
        return losses
    monkeypatch.setattr(HeadStack, "take_epoch_losses", second_head_goes_nan_at_epoch_3)
    out = tmp_path / "s"
    call_main("search", "--cache", small_cache, "--out", out, "--trials", "8", "--trials-per-pass", "8",
              "--pruner", "none", "--halving-eta", "1", *QUICK, check_rc=0)
    study = _study(out)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "nan" in failed[0].user_attrs["fail_reason"]
    assert failed[0].params["lr"] == group["lrs"][1]
    neighbours = [t for t in study.trials if t.params["lr"] in group["lrs"] and t.number != failed[0].number]
    assert neighbours and all(t.state == TrialState.COMPLETE for t in neighbours)
    assert len(_finished(study)) == 8
    assert "training loss became nan" in pd.read_csv(out / "trials.csv").to_string()


def test_resume_after_a_kill_reaches_exactly_n(small_cache, tmp_path):
    out = tmp_path / "s"
    command = [sys.executable, "-m", "search", "--cache", str(small_cache), "--out", str(out), "--trials", "12",
               "--trials-per-pass", "3", *QUICK]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.time() + 180
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            if len(_finished(_study(out))) >= 3:
                break
        except Exception:  # the study may not exist yet
            pass
    assert process.poll() is None, "the search finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(_finished(_study(out))) < 12
    call_main("search", "--cache", small_cache, "--out", out, "--trials", "12", *QUICK, check_rc=0)
    study = _study(out)
    assert len(_finished(study)) == 12
    assert all(t.state != TrialState.RUNNING for t in study.trials)
    interrupted = [t for t in study.trials if t.state == TrialState.FAIL]
    assert all(t.user_attrs["fail_reason"].startswith("interrupted") for t in interrupted)
    assert len(interrupted) <= 3 and len(study.trials) == 12 + len(interrupted)


def test_a_study_of_another_cache_or_other_rows_is_refused(small_cache, tmp_path):
    out = tmp_path / "s"
    call_main("search", "--cache", small_cache, "--out", out, "--trials", "2", *QUICK, check_rc=0)
    other = tmp_path / "other.h5"
    write_synthetic_cache(other, rows={"train": 800, "val": 400, "test": 500}, dim=24, separation=1.0)
    result = call_main("search", "--cache", other, "--out", out, "--trials", "4", *QUICK)
    assert result.returncode == 2 and "another cache_fingerprint" in result.stderr
    result = call_main("search", "--cache", small_cache, "--out", out, "--trials", "4", *QUICK[:-4],
                       "--patience", "4", "--device", "cpu")
    assert result.returncode == 2 and "another fixed_settings" in result.stderr
    # the same cache (same fingerprint) with fewer val rows done: other rows, another study
    fewer = tmp_path / "fewer.h5"
    fewer.write_bytes(small_cache.read_bytes())
    with h5py.File(fewer, "r+") as f:
        done = f["done"][:]
        done[850:900] = False  # 50 of the 400 val rows (train rows come first, then val)
        f["done"][:] = done
    result = call_main("search", "--cache", fewer, "--out", out, "--trials", "4", *QUICK)
    assert result.returncode == 2 and "another rows" in result.stderr
    assert len(_study(out).trials) == 2


def test_a_val_split_with_no_scorable_class_is_refused_before_any_trial(tmp_path):
    path = tmp_path / "features.h5"
    write_synthetic_cache(path, rows={"train": 300, "val": 60, "test": 90}, dim=8)
    with h5py.File(path, "r+") as f:
        labels = f["labels"][:]
        labels[300:360] = 0  # no val positives: no class can be scored
        f["labels"][:] = labels
    out = tmp_path / "s"
    result = call_main("search", "--cache", path, "--out", out, "--trials", "3", *QUICK)
    assert result.returncode == 2 and "val" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (out / "study.db").exists() or len(_study(out).trials) == 0


@pytest.mark.parametrize("flag, value", [
    ("--trials", "0"), ("--trials", "-3"), ("--trials", "x"), ("--n-jobs", "0"), ("--timeout", "0"),
    ("--timeout", "nan"), ("--timeout", "-1"), ("--trials-per-pass", "0"), ("--sampler-seed", "-1"),
    ("--sampler-seed", str(2**32)), ("--worker-index", "-1"), ("--worker-index", "1.5"),
    ("--stale-after", "1"), ("--stale-after", "inf"), ("--pruner", "sometimes"), ("--study-name", " "),
    ("--storage", "not a url :Pw@"),
])
def test_a_bad_flag_is_one_line_and_exit_2_before_any_work(flag, value, tmp_path):
    out = tmp_path / "s"
    result = subprocess.run([sys.executable, "-m", "search", "--out", str(out), "--cache", str(tmp_path / "none.h5"),
                             flag, value], cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], result.stderr
    assert not out.exists() and "Pw" not in result.stderr


def test_a_seed_beyond_the_samplers_range_is_one_line_before_any_work(tmp_path):
    """--sampler-seed plus --worker-index is the seed; above 2**32 - 1 numpy raised deep in Optuna."""
    out = tmp_path / "s"
    result = call_main("search", "--out", out, "--cache", tmp_path / "none.h5", "--sampler-seed", 2**32 - 1,
                       "--worker-index", 1)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--worker-index" in result.stderr and str(2**32 - 1) in result.stderr and not out.exists()


def test_out_that_is_a_file_or_a_foreign_folder_is_refused(small_cache, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    result = call_main("search", "--cache", small_cache, "--out", a_file, "--trials", "2", *QUICK)
    assert result.returncode == 2 and "is a file" in result.stderr and a_file.read_text() == "mine"
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    result = call_main("search", "--cache", small_cache, "--out", thesis, "--trials", "2", *QUICK)
    assert result.returncode == 2 and "did not write" in result.stderr
    assert [p.name for p in thesis.iterdir()] == ["chapter1.tex"]


def test_pruner_none_never_prunes_and_hyperband_prunes_at_its_rungs(small_cache, tmp_path):
    out = tmp_path / "none"
    call_main("search", "--cache", small_cache, "--out", out, "--trials", "10", "--pruner", "none",
              "--halving-eta", "1", *QUICK, check_rc=0)
    study = _study(out)
    assert len(study.trials) == 10 and all(t.state == TrialState.COMPLETE for t in study.trials)
    out = tmp_path / "hyperband"
    call_main("search", "--cache", small_cache, "--out", out, "--trials", "14", "--pruner", "hyperband",
              "--halving-eta", "1", *QUICK, check_rc=0)
    pruned = [t for t in _study(out).trials if t.state == TrialState.PRUNED]
    # rungs at min_resource 2 times powers of the reduction factor 3; the median pruner would
    # stop trials at any epoch after its 2 warm-up epochs
    assert pruned and all(max(t.intermediate_values) in (2, 6) for t in pruned)
    assert json.loads((out / "config.json").read_text())["pruner"] == "hyperband"


def test_timeout_starts_no_pass_after_the_deadline(small_cache, tmp_path):
    out = tmp_path / "s"
    result = call_main("search", "--cache", small_cache, "--out", out, "--trials", "500", "--timeout", "0.5",
                       "--trials-per-pass", "2", *QUICK, check_rc=0)
    finished = len(_finished(_study(out)))
    assert finished == 2  # the one pass started before the deadline, nothing after it
    assert f"this process finished {finished} of them" in result.stdout


def _check_exact(study, trials):
    assert len(_finished(study)) == trials
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) == max(numbers) + 1  # none lost, none duplicated
    for trial in study.trials:
        if trial.state == TrialState.FAIL:  # only a surplus trial created in a race may fail here
            assert trial.user_attrs["fail_reason"].startswith(f"surplus: the study already held {trials} ")


def test_threads_in_one_process_finish_exactly_n_and_are_reproducible(small_cache, tmp_path):
    studies = []
    for run in ("a", "b"):
        out = tmp_path / run
        call_main("search", "--cache", small_cache, "--out", out, "--trials", "7", "--n-jobs", "2",
                  "--trials-per-pass", "2", *QUICK, check_rc=0)
        studies.append(_study(out))
        _check_exact(studies[-1], 7)
    assert _outcomes(studies[0]) == _outcomes(studies[1])


def _poison_test_split(run, *, perfect: bool):
    """Rewrite a run's test predictions (and their mean AUC) to score 1.0 or 0.0 on test."""
    path = run / "predictions_test.csv"
    frame = pd.read_csv(path)
    for column in [c for c in frame.columns if c.startswith("label_")]:
        frame[column.replace("label_", "prob_", 1)] = frame[column] if perfect else 1 - frame[column]
    frame.to_csv(path, index=False)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["test"]["mean_auc"] = 1.0 if perfect else 0.0
    (run / "metrics.json").write_text(json.dumps(metrics))


def test_the_standing_lists_runs_on_the_same_test_rows_by_validation_never_by_test(small_cache, tmp_path):
    """Test AUC neither ranks nor chooses, not even in the closing hint: with the test split
    poisoned so that the order on test inverts the order on validation, and a run on other
    test rows scoring best of all, the hint lists the same-rows runs by validation, leaves the
    other out, and the command it proposes is one heads.compare accepts."""
    tree = tmp_path / "outputs"
    runs = tree / "runs"
    call_main("heads.train", "--cache", small_cache, "--out", runs / "weak", "--depth", "0", "--lr", "1e-5",
              "--max-epochs", "2", "--bootstrap", "10", "--device", "cpu", check_rc=0)
    call_main("heads.train", "--cache", small_cache, "--out", runs / "strong", "--depth", "0", *QUICK, check_rc=0)
    other_rows = tmp_path / "other_rows.h5"
    write_synthetic_cache(other_rows, rows={"train": 800, "val": 400, "test": 300}, dim=24, separation=1.19)
    call_main("heads.train", "--cache", other_rows, "--out", runs / "other_rows", "--depth", "0", *QUICK, check_rc=0)
    val = {name: json.loads((runs / name / "metrics.json").read_text())["val"]["mean_auc"] for name in ("weak", "strong")}
    assert val["strong"] > val["weak"]
    for name, perfect in (("weak", True), ("strong", False), ("other_rows", True)):
        _poison_test_split(runs / name, perfect=perfect)
    result = call_main("search", "--cache", small_cache, "--out", tree / "search" / "s", "--trials", "2", *QUICK,
                       check_rc=0)
    standing = result.stdout[result.stdout.index("other runs under"):]
    assert "same 500 test images" in standing and "other_rows" not in standing and "test mean AUC" not in standing
    assert standing.index(str(runs / "strong")) < standing.index(str(runs / "weak"))
    command = next(line for line in standing.splitlines() if "python -m heads.compare " in line)
    run_dirs = command.split("python -m heads.compare ", 1)[1].split()
    assert run_dirs[1:] == [str(runs / "strong"), str(runs / "weak")]
    call_main("heads.compare", *run_dirs, "--out", tmp_path / "compared", "--bootstrap", "20", check_rc=0)


def _plotted(monkeypatch):
    """The figures the search plots draw, caught instead of saved."""
    import matplotlib.figure
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, *args, **kwargs: figures.append(figure))
    return figures


def _toy_study(*, complete: int, pruned: int):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for number in range(complete + pruned):
        trial = study.ask()
        lr, depth = trial.suggest_float("lr", 1e-4, 1e-1, log=True), trial.suggest_int("depth", 0, 3)
        if number < pruned:
            trial.report(0.5, 1)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, 0.6 + lr - 0.01 * depth)
    return study


def test_search_plots_show_pruned_trials_and_caution_on_few_trials(tmp_path, monkeypatch):
    figures = _plotted(monkeypatch)
    few = _toy_study(complete=6, pruned=3)
    search.plots.plot_history(tmp_path / "history.png", few)
    labels = [text.get_text() for text in figures[-1].axes[0].get_legend().get_texts()]
    assert "complete (6)" in labels and any(label.startswith("pruned (3)") for label in labels)
    assert search.plots.plot_importances(tmp_path / "importances.png", few)
    assert any("only 6 complete trials" in text.get_text() for text in figures[-1].texts)
    assert search.plots.plot_importances(tmp_path / "importances.png", _toy_study(complete=25, pruned=0))
    assert not any("caution" in text.get_text() for text in figures[-1].texts)


def test_search_history_numbers_trials_with_whole_numbers_only(tmp_path, monkeypatch):
    """Trial numbers are integers: a 20-trial history must not tick the axis at 2.5, 7.5, ..."""
    figures = _plotted(monkeypatch)
    search.plots.plot_history(tmp_path / "history.png", _toy_study(complete=2, pruned=18))
    figure = figures[-1]
    figure.canvas.draw()
    ticks = figure.axes[0].get_xticks()
    assert len(ticks) >= 2 and all(float(tick).is_integer() for tick in ticks)


def test_a_missing_cache_is_refused_before_the_search_folder_is_made(tmp_path):
    out = tmp_path / "search"
    result = call_main("search", "--cache", tmp_path / "missing.h5", "--out", out, "--trials", 6)
    assert result.returncode == 2 and "missing.h5" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_a_sqlite_study_named_inside_a_new_out_folder_is_that_search_folder(small_cache, tmp_path):
    out = tmp_path / "search"
    call_main("search", "--cache", small_cache, "--out", out, "--storage", f"sqlite:///{out}/mine.db",
              "--trials", 6, "--max-epochs", 2, "--bootstrap", 10, check_rc=0)
    assert (out / "mine.db").is_file() and (out / "trials.csv").is_file()
