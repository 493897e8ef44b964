"""A storage URL's password never appears in output, files or errors, whatever form the URL takes."""
import os
from pathlib import Path

import pytest

import search.run
from cache.synthetic import write_synthetic_cache
from conftest import call_main
from search.storage import mask_text, mask_url, parse_url

QUICK = ["--max-epochs", "6", "--patience", "2", "--bootstrap", "10", "--device", "cpu"]
PG_URL = os.environ.get("CXR14_TEST_POSTGRES_URL")

# (URL, its secrets, the masked form): every place a password can sit in a URL
FORMS = [
    ("postgresql://kit:hunter2@127.0.0.1:1/studies", ["hunter2"], "postgresql://kit:***@127.0.0.1:1/studies"),
    ("postgresql://kit@127.0.0.1:1/studies?password=Qz9SECRET", ["Qz9SECRET"],
     "postgresql://kit@127.0.0.1:1/studies?password=***"),
    ("postgresql://:EmptyUserPw1@127.0.0.1:1/db", ["EmptyUserPw1"], "postgresql://:***@127.0.0.1:1/db"),
    ("postgresql://kit:s3cr@tW0rd!@127.0.0.1:1/db", ["s3cr@tW0rd!", "tW0rd!"], "postgresql://kit:***@127.0.0.1:1/db"),
    ("postgresql://kit:p%40ssW0rd@127.0.0.1:1/db", ["p@ssW0rd", "p%40ssW0rd"], "postgresql://kit:***@127.0.0.1:1/db"),
    ("mysql://me:Pw123xyz@127.0.0.1:1/db?sslmode=x&token=TkN77&pwd=Pwd55&api_secret=Sec99",
     ["Pw123xyz", "TkN77", "Pwd55", "Sec99"],
     "mysql://me:***@127.0.0.1:1/db?api_secret=***&pwd=***&sslmode=x&token=***"),
]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("security") / "features.h5"
    write_synthetic_cache(path, rows={"train": 300, "val": 150, "test": 150}, dim=8)
    return path


def _everything_written(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file())


@pytest.mark.parametrize("url, secrets, masked", FORMS)
def test_every_form_is_masked(url, secrets, masked):
    assert mask_url(url) == masked
    text = mask_text(f"could not connect to {url}: password {secrets[0]} rejected for {secrets[-1]}", url)
    assert not any(secret in text for secret in secrets)


def test_an_unencoded_at_in_the_password_is_read_as_the_user_meant():
    parsed = parse_url("postgresql://kit:s3cr@tW0rd!@db.lab:5432/x")
    assert (parsed.password, parsed.host, parsed.port) == ("s3cr@tW0rd!", "db.lab", 5432)


def test_text_that_is_not_a_url_is_masked_whole():
    assert "Pw" not in mask_url("postgresql://kit:Pw@[bad")


@pytest.mark.parametrize("url, secrets, masked", FORMS)
def test_an_unreachable_storage_is_one_masked_line(url, secrets, masked, tiny_cache, tmp_path):
    out = tmp_path / "s"
    result = call_main("search", "--cache", tiny_cache, "--out", out, "--storage", url, "--trials", "2", *QUICK)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot open study storage" in result.stderr
    assert masked in result.stderr
    everything = (result.stdout + result.stderr).encode() + _everything_written(out)
    assert not any(secret.encode() in everything for secret in secrets)
    assert not out.exists()  # the storage is opened before the folder is made: nothing left behind


def test_an_unexpected_error_prints_its_traceback_without_the_password(tiny_cache, tmp_path, monkeypatch):
    url = "postgresql://kit:Tr4ceback99@127.0.0.1:1/db"

    def broken_load(*args, **kwargs):
        raise RuntimeError(f"bug while talking to {url} with password Tr4ceback99")
    monkeypatch.setattr(search.run, "load_head_data", broken_load)
    result = call_main("search", "--cache", tiny_cache, "--out", tmp_path / "s", "--storage", url, *QUICK)
    assert result.returncode == 1 and "Traceback" in result.stderr and "RuntimeError" in result.stderr
    assert "Tr4ceback99" not in result.stderr + result.stdout


def _postgres_forms():
    """The test server's URL with its password in user:password@ and in ?password=."""
    if not PG_URL:
        return []
    parsed = parse_url(PG_URL)
    in_query = parsed.set(password=None).update_query_dict({"password": parsed.password})
    return [(PG_URL, parsed.password), (in_query.render_as_string(hide_password=False), parsed.password)]


@pytest.mark.skipif(not PG_URL, reason="no PostgreSQL server: set CXR14_TEST_POSTGRES_URL (.ci/run starts one)")
@pytest.mark.parametrize("index", [0, 1])
def test_a_search_on_postgresql_writes_and_prints_no_password(index, tiny_cache, tmp_path):
    url, password = _postgres_forms()[index]
    out = tmp_path / "s"
    result = call_main("search", "--cache", tiny_cache, "--out", out, "--storage", url, "--trials", "2",
                       "--study-name", f"secure-{os.getpid()}-{index}-{tmp_path.name}", *QUICK, check_rc=0)
    assert "***" in result.stdout and "***" in (out / "config.json").read_text()
    assert "***" in (out / "best_run" / "config.json").read_text()
    everything = (result.stdout + result.stderr).encode() + _everything_written(out)
    assert password.encode() not in everything
