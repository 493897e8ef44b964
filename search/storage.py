"""Where a study lives: an embedded SQLite file by default, a PostgreSQL/MySQL URL for workers
on several machines, or an Optuna journal file (`journal:PATH`) for processes on one machine."""
from __future__ import annotations

import random
import re
import time
import warnings

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

# Workers on a shared database beat every HEARTBEAT_S; a RUNNING trial silent for GRACE_S
# belonged to a worker that died, and is marked FAIL so that the study can still reach N.
HEARTBEAT_S, GRACE_S = 10, 60
SCHEMA_RACE_RETRIES = 3


# user:password@ up to the last "@", since a password may itself contain "@"
_CREDENTIALS = r"(://[^:/@]+:)(.*)(@[^@]*$)"


class SearchError(Exception):
    """A study that cannot be opened, resumed or trusted."""


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***: what every message and file shows."""
    return re.sub(_CREDENTIALS, r"\1***\3", url)


def mask_text(text: str, url: str) -> str:
    """`text` with the URL's password removed wherever it occurs (drivers quote it in errors)."""
    match = re.search(_CREDENTIALS, url)
    text = text.replace(url, mask_url(url))
    return text.replace(match.group(2), "***") if match and match.group(2) else text


def is_shared(url: str) -> bool:
    return not url.startswith("sqlite")


def open_storage(url: str):
    """An Optuna storage for `url`, with a clear SearchError (password masked) if unusable."""
    if url.startswith("journal:"):
        try:
            return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
        except OSError as err:
            raise SearchError(f"cannot open journal file {url}: {err}") from err
    engine_kwargs = {}
    if url.startswith("postgresql"):
        engine_kwargs = {"connect_args": {"connect_timeout": 10}}
    heartbeat = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S} if is_shared(url) else {}
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except Exception as err:  # sqlalchemy raises many types (bad URL, no driver, no server)
            message = str(err)
            # Workers starting together on an empty database race to create Optuna's tables;
            # the loser sees a duplicate and succeeds on a second try, once the tables exist.
            if attempt < SCHEMA_RACE_RETRIES and ("duplicate key" in message or "already exists" in message):
                time.sleep(0.5 + random.random())
                continue
            raise SearchError(
                f"cannot open study storage {mask_url(url)}: {mask_text(message.splitlines()[0], url)}. "
                f"Check that the server is running and reachable, the database exists and the "
                f"credentials are right (PostgreSQL needs `pip install 'psycopg[binary]'`)"
            ) from None
