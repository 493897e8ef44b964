"""Which RUNNING trials belong to a worker that died, so that a shared study still reaches N.

Database storages (PostgreSQL, MySQL) use Optuna's heartbeat: each worker beats for its
running trials, and a trial silent for longer than the grace period is failed. A journal file
has no heartbeat in Optuna, so each worker holds an exclusive flock on a file of its own,
`<journal>.owners/<owner>.lock`, for as long as it lives, and records that owner on every trial
it asks for. The kernel drops a flock when its process dies (even by SIGKILL), so a trial whose
owner's lock can be taken belonged to a dead worker; a live worker's lock cannot be taken, so
its trials are never failed. Journal files are for processes on one machine, where flock holds.
"""
from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from optuna.trial import TrialState

from search.storage import has_heartbeat
from search.study import fail_trial

OWNER_ATTR = "cxr14_owner"


class JournalOwnership:
    """This process's lock in `<journal>.owners/`, held until `close()` or the process's death."""

    def __init__(self, journal_path):
        self.folder = Path(f"{journal_path}.owners")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._handle = open(self.folder / f"{self.token}.lock", "w")
        fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: never contended

    def claim(self, study, trial) -> None:
        study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, self.token)

    def fail_dead_owners_trials(self, study) -> int:
        """Fail the RUNNING trials whose owner's lock is free (the owner died); returns how many."""
        failed = 0
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = trial.system_attrs.get(OWNER_ATTR)
            if owner == self.token:
                continue
            if owner is not None and self._owner_is_dead(owner):
                failed += fail_trial(study, trial, "its worker died (killed or crashed) while running it")
        return failed

    def _owner_is_dead(self, owner: str) -> bool:
        path = self.folder / f"{owner}.lock"
        if not path.exists():
            return True  # its lock file was already removed by whoever found it dead
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
        return True

    def close(self) -> None:
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        (self.folder / f"{self.token}.lock").unlink(missing_ok=True)


class Liveness:
    """One interface over both mechanisms: `claim` each trial asked, `beating` while training,
    `fail_stale` whenever the study is counted."""

    def __init__(self, url: str, *, stale_after: float):
        self.stale_after = stale_after
        self._journal = JournalOwnership(url.removeprefix("journal:")) if url.startswith("journal:") else None
        self._heartbeat = has_heartbeat(url)
        self._shared = self._journal is not None or self._heartbeat

    def claim(self, study, trial) -> None:
        if self._heartbeat:
            study._storage.record_heartbeat(trial._trial_id)  # a trial with no beat is never stale...
        if self._journal is not None:
            self._journal.claim(study, trial)
        elif self._shared:  # ...so it is marked claimed only once it has one
            study._storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, "heartbeat")

    def fail_stale(self, study) -> None:
        if not self._shared:
            return
        fail_unclaimed_trials(study, after=self.stale_after)
        if self._journal is not None:
            self._journal.fail_dead_owners_trials(study)
        if self._heartbeat:
            fail_silent_trials(study)

    def beating(self, study, trials):
        """A context that beats for `trials` every heartbeat interval while they train."""
        return _Beats(study, trials) if self._heartbeat else _NoBeats()

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()


def fail_unclaimed_trials(study, *, after: float) -> int:
    """Fail the RUNNING trials still unclaimed `after` seconds after they started (a live worker
    claims a trial milliseconds after asking for it): their worker was killed in between, so
    neither a lock nor a heartbeat would ever show them dead."""
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
        if OWNER_ATTR not in trial.system_attrs and time.time() - started > after:
            failed += fail_trial(study, trial, "its worker died before it started training")
    return failed


def fail_silent_trials(study) -> int:
    """Optuna's fail_stale_trials, but with the reason recorded first (a failed trial's
    attributes can no longer be set); returns how many this worker failed."""
    failed = 0
    for trial_id in study._storage._get_stale_trial_ids(study._study_id):
        trial = study._storage.get_trial(trial_id)
        failed += fail_trial(study, trial, "its worker stopped beating (killed or lost)")
    return failed


class _NoBeats:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Beats:
    def __init__(self, study, trials):
        self.study, self.trials, self.stop = study, trials, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        interval = self.study._storage.get_heartbeat_interval()
        while not self.stop.wait(interval):
            for trial in self.trials:
                self.study._storage.record_heartbeat(trial._trial_id)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        return False
