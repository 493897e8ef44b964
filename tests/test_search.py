import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

import heads.run
import search.run
from cache.synthetic import write_synthetic_cache
from conftest import REPO, call_main
from heads.data import HeadsError
from search.storage import mask_text, mask_url

QUICK = ["--max-epochs", "12", "--patience", "3", "--bootstrap", "20", "--device", "cpu"]


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "features.h5"
    write_synthetic_cache(path, rows={"train": 800, "val": 400, "test": 500}, dim=24, separation=1.19)
    return path


def _study(out, name="cxr14-heads"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def _finished(study):
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def test_small_study_end_to_end(small_cache, tmp_path, monkeypatch):
    test_calls = []
    real_predict = heads.run.predict_proba

    def recording_predict(model, features):
        test_calls.append(features.shape[0])
        return real_predict(model, features)
    monkeypatch.setattr(heads.run, "predict_proba", recording_predict)
    out = tmp_path / "s"
    result = call_main("search", "--cache", small_cache, "--out", out, "--trials", "14", *QUICK, check_rc=0)
    study = _study(out)
    assert len(_finished(study)) == 14 and len(study.trials) == 14
    assert any(t.state == TrialState.PRUNED for t in study.trials), "the median pruner never pruned"
    best = json.loads((out / "best_params.json").read_text())
    assert best["study_val_mean_auc"] == study.best_value
    assert best["retrained_val_mean_auc"] == pytest.approx(study.best_value, abs=1e-9)
    metrics = json.loads((out / "best_run" / "metrics.json").read_text())
    assert metrics["val"]["mean_auc"] == pytest.approx(study.best_value, abs=1e-9)
    # test is scored once: for the best trial's retrained head, and never inside a trial
    assert test_calls.count(500) == 1  # the 500 test rows: scored once, by the best run
    assert "test" not in " ".join(pd.read_csv(out / "trials.csv").columns)
    for name in ("trials.csv", "optimization_history.png", "param_importances.png", "config.json",
                 "best_run/predictions_test.csv", "best_run/head.pt", "best_run/roc_curves.png"):
        assert (out / name).exists(), name
    assert "best trial #" in result.stdout and "optuna-dashboard sqlite:///" in result.stdout
    # a finished study is not extended by a rerun asking for the same count
    call_main("search", "--cache", small_cache, "--out", out, "--trials", "14", *QUICK, check_rc=0)
    assert len(_study(out).trials) == 14


def test_trials_never_see_test_rows(small_cache, tmp_path, monkeypatch):
    seen = []
    real_fit = search.run.fit_head

    def checking_fit(**kwargs):
        seen.append(sorted(kwargs))
        return real_fit(**kwargs)
    monkeypatch.setattr(search.run, "fit_head", checking_fit)
    call_main("search", "--cache", small_cache, "--out", tmp_path / "s", "--trials", "3", *QUICK, check_rc=0)
    assert seen and all("test" not in keys and "data" not in keys for keys in seen)


def test_a_failing_trial_is_recorded_and_the_study_goes_on(small_cache, tmp_path, monkeypatch):
    real_fit = search.run.fit_head
    calls = {"n": 0}

    def sometimes_failing(**kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise HeadsError("training loss became nan at epoch 3")
        return real_fit(**kwargs)
    monkeypatch.setattr(search.run, "fit_head", sometimes_failing)
    out = tmp_path / "s"
    call_main("search", "--cache", small_cache, "--out", out, "--trials", "5", *QUICK, check_rc=0)
    study = _study(out)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and "nan" in failed[0].user_attrs["fail_reason"]
    assert len(_finished(study)) == 5
    assert "training loss became nan" in pd.read_csv(out / "trials.csv").to_string()


def test_resume_after_a_kill_reaches_exactly_n(small_cache, tmp_path):
    out = tmp_path / "s"
    command = [sys.executable, "-m", "search", "--cache", str(small_cache), "--out", str(out), "--trials", "12",
               *QUICK]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.time() + 180
    while time.time() < deadline:
        time.sleep(0.3)
        if (out / "study.db").exists():
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
    interrupted = [t for t in study.trials if t.user_attrs.get("fail_reason", "").startswith("interrupted")]
    assert len(interrupted) <= 1 and len(study.trials) == 12 + len(interrupted)


def test_a_study_of_another_cache_is_refused(small_cache, tmp_path):
    out = tmp_path / "s"
    call_main("search", "--cache", small_cache, "--out", out, "--trials", "2", *QUICK, check_rc=0)
    other = tmp_path / "other.h5"
    write_synthetic_cache(other, rows={"train": 800, "val": 400, "test": 500}, dim=24, separation=1.0)
    result = call_main("search", "--cache", other, "--out", out, "--trials", "4", *QUICK)
    assert result.returncode == 2 and "another cache_fingerprint" in result.stderr
    result = call_main("search", "--cache", small_cache, "--out", out, "--trials", "4", *QUICK[:-4],
                       "--patience", "4", "--device", "cpu")
    assert result.returncode == 2 and "another fixed_settings" in result.stderr


def test_unreachable_storage_is_a_clear_error_without_the_password(small_cache, tmp_path):
    url = "postgresql://kit:hunter2@127.0.0.1:1/studies"
    result = call_main("search", "--cache", small_cache, "--out", tmp_path / "s", "--storage", url, *QUICK)
    assert result.returncode == 2
    assert "cannot open study storage postgresql://kit:***@127.0.0.1:1/studies" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout


def test_masking():
    assert mask_url("postgresql://kit:s3cr@t!@db.lab:5432/x") == "postgresql://kit:***@db.lab:5432/x"
    assert mask_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    url = "mysql://me:pw123@h/db"
    assert "pw123" not in mask_text(f"failed for {url}: password pw123 rejected", url)


def _workers(storage, tmp_path, small_cache, *, trials, study_name, count=2):
    """`count` search processes sharing one study; returns their (stdout, stderr)."""
    commands = [[sys.executable, "-m", "search", "--cache", str(small_cache), "--out", str(tmp_path / f"w{i}"),
                 "--storage", storage, "--study-name", study_name, "--trials", str(trials), *QUICK]
                for i in range(count)]
    processes = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PYTHONPATH=str(REPO))) for c in commands]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    return outputs


def _check_exact(study, trials):
    assert len(_finished(study)) == trials
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) == max(numbers) + 1  # none lost, none duplicated
    for trial in study.trials:
        if trial.state == TrialState.FAIL:  # only a surplus trial created in a race may fail here
            assert "already held" in trial.user_attrs.get("fail_reason", "") or trial.system_attrs


def test_two_workers_share_a_journal_file(small_cache, tmp_path):
    journal = tmp_path / "study.log"
    _workers(f"journal:{journal}", tmp_path, small_cache, trials=10, study_name="shared")
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    study = optuna.load_study(study_name="shared", storage=JournalStorage(JournalFileBackend(str(journal))))
    _check_exact(study, 10)


def test_two_workers_on_postgresql_finish_exactly_n(small_cache, tmp_path):
    url = os.environ.get("CXR14_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: set CXR14_TEST_POSTGRES_URL (.ci/run starts one)")
    study_name = f"shared-{os.getpid()}-{int(time.time())}"  # reruns against one server never collide
    outputs = _workers(url, tmp_path, small_cache, trials=12, study_name=study_name)
    _check_exact(optuna.load_study(study_name=study_name, storage=url), 12)
    password = url.split("://", 1)[1].split("@")[0].partition(":")[2]
    for index, (stdout, stderr) in enumerate(outputs):
        config = (tmp_path / f"w{index}" / "config.json").read_text()
        assert ":***@" in config
        assert password and password not in stdout + stderr + config


def test_threads_in_one_process_finish_exactly_n(small_cache, tmp_path):
    out = tmp_path / "s"
    call_main("search", "--cache", small_cache, "--out", out, "--trials", "7", "--n-jobs", "2", *QUICK, check_rc=0)
    _check_exact(_study(out), 7)
