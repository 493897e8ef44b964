"""Studies shared by several workers (journal file, PostgreSQL): exactly N finished trials,
also when a worker is killed in the middle of a trial."""
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from conftest import REPO, call_main, run_cli
from search.liveness import JournalOwnership
from test_search import _check_exact, _outcomes  # the exact-N check and a study's outcomes, defined once

QUICK = ["--max-epochs", "12", "--patience", "3", "--bootstrap", "20", "--device", "cpu"]
PG_URL = os.environ.get("CXR14_TEST_POSTGRES_URL")
needs_postgres = pytest.mark.skipif(not PG_URL, reason="no PostgreSQL server: set CXR14_TEST_POSTGRES_URL "
                                                       "(.ci/run starts one)")


def _finished(study_or_trials):
    trials = getattr(study_or_trials, "trials", study_or_trials)
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def _journal_study(journal, name="shared"):
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))


def _unique_name(prefix):
    return f"{prefix}-{os.getpid()}-{time.time_ns()}"  # reruns against one server never collide


def _search(*args):
    return [sys.executable, "-m", "search", *map(str, args), *QUICK]


def _popen(command, **kwargs):
    return subprocess.Popen(command, cwd=REPO, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), **kwargs)


def _workers(storage, tmp_path, small_cache, *, trials, study_name, count=2):
    """`count` search processes sharing one study; returns their (stdout, stderr)."""
    processes = [_popen(_search("--cache", small_cache, "--out", tmp_path / f"w{i}", "--storage", storage,
                                "--study-name", study_name, "--trials", trials, "--trials-per-pass", 2,
                                "--worker-index", i),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(count)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    return outputs


def _finished_by_each(outputs):
    return [int(stdout.split("this process finished ")[1].split()[0]) for stdout, _ in outputs]


def test_two_workers_share_a_journal_file(small_cache, tmp_path):
    journal = tmp_path / "study.log"
    outputs = _workers(f"journal:{journal}", tmp_path, small_cache, trials=6, study_name="shared")
    _check_exact(_journal_study(journal), 6)
    assert sum(_finished_by_each(outputs)) == 6  # each says truthfully what it finished


def _kill_during_a_pass(command, finished_trials, *, enough):
    """Start `command`, SIGKILL it while it trains a pass after `enough` finished trials."""
    process = _popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            trials = finished_trials()
        except Exception:  # the study may not exist yet
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if len(_finished(trials)) >= enough and running:
            break
    assert process.poll() is None, "the search finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_journal_resume_after_a_killed_worker_reaches_exactly_n(small_cache, tmp_path):
    journal = tmp_path / "study.log"
    url = f"journal:{journal}"
    _kill_during_a_pass(_search("--cache", small_cache, "--out", tmp_path / "a", "--storage", url,
                                "--study-name", "shared", "--trials", 40, "--trials-per-pass", 2,
                                "--stale-after", 6),
                        lambda: _journal_study(journal).trials, enough=2)
    study = _journal_study(journal)
    left_running = [t.number for t in study.trials if t.state == TrialState.RUNNING]
    assert left_running, "the kill left no running trial to recover"
    # The resumed worker asks for exactly one more: the killed worker's trials fill all the room,
    # so without failing them it would wait (here: until the timeout) and end short of N.
    target = len(_finished(study)) + 1
    call_main("search", "--cache", small_cache, "--out", tmp_path / "b", "--storage", url, "--study-name", "shared",
              "--trials", target, "--timeout", 120, "--stale-after", 6, *QUICK, check_rc=0)
    study = _journal_study(journal)
    assert len(_finished(study)) == target
    for number in left_running:
        assert study.trials[number].state == TrialState.FAIL
        assert "its worker died" in study.trials[number].user_attrs["fail_reason"]


def test_journal_never_fails_a_live_workers_trial(small_cache, tmp_path):
    journal = tmp_path / "study.log"
    url = f"journal:{journal}"
    call_main("search", "--cache", small_cache, "--out", tmp_path / "a", "--storage", url, "--study-name", "shared",
              "--trials", 2, *QUICK, check_rc=0)
    study = _journal_study(journal)
    live = JournalOwnership(journal)  # a live worker (this process) in the middle of a trial
    trial = study.ask()
    live.claim(study, trial)
    call_main("search", "--cache", small_cache, "--out", tmp_path / "b", "--storage", url, "--study-name", "shared",
              "--trials", 3, "--timeout", 4, *QUICK, check_rc=0)
    assert _journal_study(journal).trials[trial.number].state == TrialState.RUNNING
    live._handle.close()  # the worker dies: the kernel drops its lock, its file stays
    call_main("search", "--cache", small_cache, "--out", tmp_path / "b", "--storage", url, "--study-name", "shared",
              "--trials", 3, "--timeout", 120, *QUICK, check_rc=0)
    study = _journal_study(journal)
    assert study.trials[trial.number].state == TrialState.FAIL and len(_finished(study)) == 3


@needs_postgres
def test_two_workers_on_postgresql_finish_exactly_n(small_cache, tmp_path):
    study_name = _unique_name("shared")
    outputs = _workers(PG_URL, tmp_path, small_cache, trials=8, study_name=study_name)
    _check_exact(optuna.load_study(study_name=study_name, storage=PG_URL), 8)
    assert sum(_finished_by_each(outputs)) == 8


@needs_postgres
def test_postgresql_fails_a_killed_workers_trials_while_waiting(small_cache, tmp_path):
    study_name = _unique_name("killed")
    _kill_during_a_pass(_search("--cache", small_cache, "--out", tmp_path / "a", "--storage", PG_URL,
                                "--study-name", study_name, "--trials", 40, "--trials-per-pass", 2,
                                "--stale-after", 6),
                        lambda: optuna.load_study(study_name=study_name, storage=PG_URL).trials, enough=2)
    study = optuna.load_study(study_name=study_name, storage=PG_URL)
    left_running = [t.number for t in study.trials if t.state == TrialState.RUNNING]
    assert left_running
    target = len(_finished(study)) + 1
    # no --timeout: without failing stale trials while it waits, this would never return
    command = _search("--cache", small_cache, "--out", tmp_path / "b", "--storage", PG_URL, "--study-name",
                      study_name, "--trials", target, "--stale-after", 6)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name=study_name, storage=PG_URL)
    assert len(_finished(study)) == target
    for number in left_running:
        assert study.trials[number].state == TrialState.FAIL
        reason = study.trials[number].user_attrs["fail_reason"]
        assert "stopped beating" in reason or "died before it started" in reason


def _sqlite_study(path):
    return optuna.load_study(study_name="cxr14-heads", storage=f"sqlite:///{path}")


def _running_trials_read_only(path) -> int:
    """RUNNING trials in a SQLite study, read without creating anything (Optuna's own loader
    would create the schema, racing the search that is creating it)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return db.execute("SELECT count(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0]
    except sqlite3.Error:  # no file or no tables yet
        return 0


def test_a_second_process_on_one_sqlite_file_is_refused_and_the_first_finishes(small_cache, tmp_path):
    """Two searches, two --out folders, one SQLite file (the first's default study.db, named by
    the second's --storage): the second is refused in one line and touches nothing, where it
    used to fail the first's running trials as interrupted and crash it."""
    first_out = tmp_path / "a"
    first = _popen(_search("--cache", small_cache, "--out", first_out, "--trials", 40, "--trials-per-pass", 2,
                           "--timeout", 5), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, running = time.time() + 240, 0
    while time.time() < deadline and first.poll() is None and not running:
        time.sleep(0.2)
        running = _running_trials_read_only(first_out / "study.db")
    assert first.poll() is None and running, f"the first search ended first: {first.stderr.read() if first.poll() else ''}"
    second_out = tmp_path / "b"
    second = call_main("search", "--cache", small_cache, "--out", second_out, "--storage",
                       f"sqlite:///{first_out / 'study.db'}", "--trials", 1, *QUICK)
    assert second.returncode == 2 and "another search process" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and not second_out.exists()
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    study = _sqlite_study(first_out / "study.db")
    assert not [t for t in study.trials if t.state == TrialState.FAIL], "the second process failed the first's trials"
    assert len(_finished(study)) == len(study.trials) >= 1


def _journal_search(runner, *, journal, out, seed_flags, small_cache):
    return runner("search", "--cache", small_cache, "--out", out, "--storage", f"journal:{journal}",
                  "--study-name", "shared", "--trials", 3, "--trials-per-pass", 3, *seed_flags, "--max-epochs", 3,
                  "--patience", 2, "--bootstrap", 10, "--device", "cpu", check_rc=0)


def test_one_process_on_a_journal_is_reproducible_from_the_seed_it_records(small_cache, tmp_path):
    """The seed once was --sampler-seed plus the process id on shared storages (and config.json
    said otherwise): two processes gave two searches. Now the seed is --sampler-seed plus
    --worker-index, and the one recorded reproduces the search."""
    studies = []
    for name in ("a", "b"):  # separate processes, so separate pids
        _journal_search(run_cli, journal=tmp_path / f"{name}.log", out=tmp_path / name,
                        seed_flags=["--sampler-seed", 3], small_cache=small_cache)
        studies.append(_outcomes(_journal_study(tmp_path / f"{name}.log")))
        assert json.loads((tmp_path / name / "config.json").read_text())["sampler_seed"] == 3
    assert studies[0] == studies[1]
    _journal_search(call_main, journal=tmp_path / "c.log", out=tmp_path / "c",
                    seed_flags=["--sampler-seed", 1, "--worker-index", 2], small_cache=small_cache)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert (config["sampler_seed"], config["worker_index"]) == (3, 2)
    assert _outcomes(_journal_study(tmp_path / "c.log")) == studies[0]  # the recorded seed is the one used


@pytest.mark.parametrize("content", ["my notes\nline two\n", '{\n  "model": "head"\n}\n'])
def test_a_journal_path_naming_a_file_that_is_not_a_journal_is_left_alone(small_cache, tmp_path, content):
    """A user's text file or a run's config.json given as journal:PATH: Optuna appended its
    records to the first and died with a JSONDecodeError traceback on the second."""
    victim = tmp_path / "notes.txt"
    victim.write_text(content)
    result = call_main("search", "--cache", small_cache, "--out", tmp_path / "s", "--trials", "1",
                       "--storage", f"journal:{victim}", *QUICK)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not an Optuna journal" in result.stderr
    assert victim.read_text() == content
