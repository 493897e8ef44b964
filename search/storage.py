"""Where a study lives: an embedded SQLite file by default, a PostgreSQL/MySQL URL for workers
on several machines, or an Optuna journal file (`journal:PATH`) for processes on one machine.

A storage URL may hold a password (in `user:password@`, or as a query parameter such as
`?password=`). It is parsed with SQLAlchemy's URL object, and only its masked form is ever
printed or written: `mask_url` for the URL, `mask_text` for any message that may quote it.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
import warnings
from pathlib import Path
from urllib.parse import quote, quote_plus

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from sqlalchemy.engine import URL, make_url

import cache

# Workers on a shared database beat every HEARTBEAT_S; a RUNNING trial silent for
# --stale-after seconds belonged to a worker that died, and is marked FAIL so that the study
# can still reach N. Optuna wants at least a few beats inside the grace period.
HEARTBEAT_PER_GRACE = 6
SCHEMA_RACE_RETRIES = 3
MASK = "***"
# Query parameters whose value is a credential (matched as substrings, case-insensitive).
SECRET_QUERY_NAMES = ("password", "passwd", "pwd", "secret", "token")


class SearchError(Exception):
    """A study that cannot be opened, resumed or trusted."""


def parse_url(url: str) -> URL | None:
    """SQLAlchemy's reading of `url`, with an unencoded '@' inside the password put back where
    the user meant it (SQLAlchemy ends the password at the first '@', so the rest of the
    password would otherwise be taken for the host). None for journal files and for text that
    is not a URL at all."""
    if url.startswith("journal:"):
        return None
    try:
        parsed = make_url(url)
    except Exception:  # sqlalchemy.exc.ArgumentError and friends: not a URL
        return None
    if parsed.password is not None and parsed.host and "@" in parsed.host:
        rest_of_password, _, host = parsed.host.rpartition("@")
        parsed = parsed.set(password=f"{parsed.password}@{rest_of_password}", host=host)
    return parsed


def _is_secret_name(name: str) -> bool:
    return any(word in name.lower() for word in SECRET_QUERY_NAMES)


def secrets_in(url: str) -> list[str]:
    """Every credential the URL holds, longest first: the password (and its pieces around an '@')
    and the secret-named query values, each also percent-encoded."""
    parsed = parse_url(url)
    if parsed is None:
        return []
    found = []
    if parsed.password:
        found.append(str(parsed.password))
        # the pieces a naive reader of an unencoded '@' would split it into (too short ones would
        # mask ordinary words, and alone give little away)
        found += [piece for piece in str(parsed.password).split("@") if len(piece) >= 3]
    for name, value in parsed.query.items():
        if _is_secret_name(name):
            found += [value] if isinstance(value, str) else list(value)
    found = [secret for secret in found if secret]
    # Drivers and SQLAlchemy may quote a secret percent-encoded; hide those spellings too.
    found += [form for secret in found for form in (quote(secret, safe=""), quote_plus(secret))]
    return sorted(set(found), key=len, reverse=True)


def mask_url(url: str) -> str:
    """The URL with its password and secret query values replaced by ***: what every message and
    file shows. Something that is not a URL is shown by its scheme only, since where its secret
    sits cannot be known."""
    if url.startswith("journal:"):
        return url
    parsed = parse_url(url)
    if parsed is None:
        scheme, sep, _ = url.partition("://")
        return f"{scheme}://{MASK} (not a valid URL)" if sep else f"{MASK} (not a valid URL)"
    if parsed.password is not None:
        parsed = parsed.set(password=MASK)
    secret_query = {name: MASK for name in parsed.query if _is_secret_name(name)}
    if secret_query:
        parsed = parsed.update_query_dict(secret_query)
    # Render without percent-encoding the mask, so that it reads as *** and not %2A%2A%2A.
    return parsed.render_as_string(hide_password=False).replace(quote(MASK, safe=""), MASK)


def mask_text(text: str, url: str | None) -> str:
    """`text` with every secret of `url` removed wherever it occurs (drivers quote it in errors)."""
    if not url:
        return text
    text = text.replace(url, mask_url(url))
    for secret in secrets_in(url):
        text = text.replace(secret, MASK)
    return text


def is_shared(url: str) -> bool:
    return not url.startswith("sqlite")


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for an in-memory database and other storages."""
    parsed = parse_url(url)
    if parsed is None or not parsed.drivername.startswith("sqlite") or not parsed.database:
        return None
    database = parsed.database
    if str(parsed.query.get("uri", "")).lower() in ("true", "1"):
        if parsed.query.get("mode") == "memory":
            return None
        database = database.removeprefix("file:")
    return None if database == ":memory:" else Path(database)


def sole_user(url: str) -> contextlib.AbstractContextManager:
    """Hold a SQLite study's file for this process alone until the context exits; refuse, in one
    line, when another process holds it. The lock is on the file the URL names (its real path),
    whatever --out is: a second process on one SQLite file would fail the first one's running
    trials as interrupted. Other storages are built for several processes: nothing to hold."""
    held = contextlib.ExitStack()
    path = sqlite_file(url)
    if path is None:
        return held
    try:
        held.enter_context(cache.exclusive_lock(path, purpose="search"))
    except cache.CacheError:
        holder = _lock_holder(path)
        raise SearchError(f"another search process ({holder}) is using {mask_url(url)}: a SQLite study serves one "
                          f"process at a time; wait for it to finish, give a separate search its own SQLite file (or "
                          f"--out), or share one study between processes with --storage journal:PATH (one "
                          f"machine) or a PostgreSQL URL") from None
    return held


def _lock_holder(path: Path) -> str:
    """Who holds `path`'s lock, as cache.exclusive_lock writes it in the lock file (on the real path)."""
    real = Path(os.path.realpath(path))
    try:
        return real.with_name(real.name + ".lock").read_text().strip() or "unknown pid"
    except OSError:
        return "unknown pid"


def has_heartbeat(url: str) -> bool:
    """Database storages beat for their RUNNING trials (Optuna's heartbeat); a journal file cannot."""
    return is_shared(url) and not url.startswith("journal:")


def _refuse_foreign_journal(path: str, *, url: str) -> None:
    """Refuse a file that is neither new, empty, nor an Optuna journal: Optuna would append its
    records to it (a user's file, a run's config.json) before finding it unreadable."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    try:
        with open(path, "rb") as handle:
            first = json.loads(handle.readline(1 << 20))
    except (OSError, ValueError):
        first = None
    if not (isinstance(first, dict) and "op_code" in first):
        raise SearchError(f"--storage {url}: the file is not an Optuna journal (its first line is not a journal "
                          f"record) and is left alone: give a new file, or the journal a search wrote")


def open_storage(url: str, *, stale_after: float):
    """An Optuna storage for `url`, with a clear SearchError (secrets masked) if unusable."""
    if url.startswith("journal:"):
        path = url.removeprefix("journal:")
        _refuse_foreign_journal(path, url=url)
        try:
            return JournalStorage(JournalFileBackend(path))
        except (OSError, ValueError) as err:
            raise SearchError(f"cannot open journal file {url}: {err}") from err
    parsed = parse_url(url)
    if parsed is None:
        raise SearchError(f"--storage {mask_url(url)} is not a database URL: use e.g. "
                          f"postgresql://user:password@host/db, sqlite:///path or journal:PATH")
    engine_kwargs = {"connect_args": {"connect_timeout": 10}} if parsed.drivername.startswith("postgresql") else {}
    heartbeat = ({"heartbeat_interval": max(1, int(stale_after // HEARTBEAT_PER_GRACE)),
                  "grace_period": int(stale_after)}
                 if has_heartbeat(url) else {})
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat
                return optuna.storages.RDBStorage(parsed.render_as_string(hide_password=False),
                                                  engine_kwargs=engine_kwargs, **heartbeat)
        except Exception as err:  # sqlalchemy raises many types (bad URL, no driver, no server)
            message = str(err)
            # Workers starting together on an empty database race to create Optuna's tables;
            # the loser sees a duplicate and succeeds on a second try, once the tables exist.
            if attempt < SCHEMA_RACE_RETRIES and ("duplicate key" in message or "already exists" in message):
                time.sleep(0.5 + random.random())
                continue
            first_line = message.strip().splitlines()[0] if message.strip() else type(err).__name__
            raise SearchError(
                f"cannot open study storage {mask_url(url)}: {mask_text(first_line, url)}. "
                f"Check that the server is running and reachable, the database exists and the "
                f"credentials are right (PostgreSQL needs `pip install 'psycopg[binary]'`)"
            ) from None
