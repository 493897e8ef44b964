"""Output folders (cache/outdir.py): every command writes only into what it may, replaces only a
folder of its own kind, and never deletes or writes through what the kit did not make."""
import json
import shutil

import pytest

from cache.outdir import MARKER, folder_kind, prepare_out_dir
from cache.synthetic import write_synthetic_cache
from conftest import call_main

ROWS = {"train": 600, "val": 300, "test": 300}
QUICK_TRAIN = ["--max-epochs", "1", "--bootstrap", "5", "--device", "cpu"]
QUICK_SEARCH = ["--trials", "2", "--trials-per-pass", "2", "--max-epochs", "2", "--bootstrap", "5", "--device", "cpu"]
OLD_MARKER = "written by cxr14-kit; `--overwrite` may replace this folder\n"  # before kinds were recorded


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("outdir") / "features.h5"
    write_synthetic_cache(path, rows=ROWS, dim=16, separation=1.0, seed=0)
    return path


@pytest.fixture(scope="module")
def made(small_cache, tmp_path_factory):
    """A run folder and a search folder as the commands write them (read-only: tests copy them)."""
    root = tmp_path_factory.mktemp("made")
    call_main("heads.train", "--cache", small_cache, "--out", root / "run", *QUICK_TRAIN, check_rc=0)
    call_main("search", "--cache", small_cache, "--out", root / "search", *QUICK_SEARCH, check_rc=0)
    return root


def _snapshot(folder):
    """Every file under `folder` with its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_each_command_marks_the_kind_of_folder_it_wrote(made):
    assert folder_kind(made / "run") == "run"
    assert folder_kind(made / "search") == "search" and folder_kind(made / "search" / "best_run") == "run"
    assert json.loads((made / "run" / MARKER).read_text())["kind"] == "run"


def test_overwrite_replaces_only_the_kits_own_folders(small_cache, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    result = call_main("heads.train", "--cache", small_cache, "--out", thesis, "--overwrite")
    assert result.returncode == 2 and "did not write" in result.stderr and str(thesis) in result.stderr
    assert (thesis / "chapter1.tex").read_text() == "years of work"
    # a user's folder that happens to be called <out>.partial is not deleted either
    users_partial = tmp_path / "run.partial"
    users_partial.mkdir()
    (users_partial / "notes.txt").write_text("mine")
    result = call_main("heads.train", "--cache", small_cache, "--out", tmp_path / "run")
    assert result.returncode == 2 and "run.partial" in result.stderr and (users_partial / "notes.txt").exists()
    # an --out that is a regular file: one line, nothing written
    plain_file = tmp_path / "file.txt"
    plain_file.write_text("x")
    result = call_main("heads.train", "--cache", small_cache, "--out", plain_file)
    assert result.returncode == 2 and "is a file" in result.stderr and plain_file.read_text() == "x"
    # the kit's own run is replaced with --overwrite, and a kit-made partial is cleaned up
    run = tmp_path / "kit"
    call_main("heads.train", "--cache", small_cache, "--out", run, *QUICK_TRAIN, check_rc=0)
    prepare_out_dir(run, kind="run", overwrite=True)  # as a killed run would leave it
    first = (run / "metrics.json").stat().st_mtime_ns
    call_main("heads.train", "--cache", small_cache, "--out", run, *QUICK_TRAIN, "--overwrite", check_rc=0)
    assert (run / "metrics.json").stat().st_mtime_ns != first and not (tmp_path / "kit.partial").exists()


def test_train_overwrite_never_replaces_a_search_or_a_comparison(made, small_cache, tmp_path):
    search = tmp_path / "search"
    shutil.copytree(made / "search", search)
    before = _snapshot(search)
    for command in ("heads.train", "heads.baseline"):
        result = call_main(command, "--cache", small_cache, "--out", search, "--overwrite", "--bootstrap", "5")
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert "is a search folder" in result.stderr and "replaces only a run folder" in result.stderr
    assert _snapshot(search) == before
    comparison = tmp_path / "cmp"
    call_main("heads.compare", made / "run", made / "search" / "best_run", "--out", comparison, "--bootstrap", "20",
              check_rc=0)
    before = _snapshot(comparison)
    result = call_main("heads.train", "--cache", small_cache, "--out", comparison, "--overwrite")
    assert result.returncode == 2 and "is a comparison folder" in result.stderr and _snapshot(comparison) == before


def test_search_never_writes_into_a_run_folder(made, small_cache, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(made / "run", run)
    before = _snapshot(run)
    result = call_main("search", "--cache", small_cache, "--out", run, *QUICK_SEARCH)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "is a run folder" in result.stderr and "only a search folder" in result.stderr
    assert _snapshot(run) == before  # config.json of the run is intact, so heads.predict still reads it


@pytest.mark.parametrize("command", ["heads.train", "heads.baseline", "search", "heads.compare", "heads.predict"])
def test_an_out_that_is_a_symbolic_link_is_refused_before_any_work(made, small_cache, tmp_path, command):
    """The link points to what the command could otherwise replace or write into (a run, a
    search, an empty folder, an earlier predictions CSV): followed, it would be trained into and
    then fail at the rename, or be deleted through the link."""
    target = tmp_path / "target"
    if command in ("heads.train", "heads.baseline", "search"):
        shutil.copytree(made / ("search" if command == "search" else "run"), target)
    elif command == "heads.compare":
        target.mkdir()
    else:
        target.write_text("image,prob_Atelectasis\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    before = _snapshot(tmp_path)
    arguments = {
        "heads.train": ["--cache", small_cache, *QUICK_TRAIN, "--overwrite"],
        "heads.baseline": ["--cache", small_cache, "--bootstrap", "5", "--overwrite"],
        "search": ["--cache", small_cache, *QUICK_SEARCH],
        "heads.compare": [made / "run", made / "search" / "best_run", "--bootstrap", "20", "--overwrite"],
        "heads.predict": ["--run", made / "run", made / "missing.png", "--device", "cpu"],
    }[command]
    result = call_main(command, *arguments, "--out", link)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "symbolic link" in result.stderr
    assert link.is_symlink() and _snapshot(tmp_path) == before  # no link.partial, nothing written through it


def test_a_folder_marked_before_kinds_were_recorded_is_told_by_its_files(made, small_cache, tmp_path):
    old_run, old_search, interrupted = tmp_path / "old_run", tmp_path / "old_search", tmp_path / "interrupted"
    shutil.copytree(made / "run", old_run)
    shutil.copytree(made / "search", old_search)
    interrupted.mkdir()
    for folder in (old_run, old_search, interrupted):
        (folder / MARKER).write_text(OLD_MARKER)
    assert [folder_kind(f) for f in (old_run, old_search, interrupted)] == ["run", "search", "unknown"]
    call_main("heads.train", "--cache", small_cache, "--out", old_run, *QUICK_TRAIN, "--overwrite", check_rc=0)
    assert folder_kind(old_run) == "run" and json.loads((old_run / MARKER).read_text())["kind"] == "run"
    before = _snapshot(old_search)
    result = call_main("heads.train", "--cache", small_cache, "--out", old_search, "--overwrite")
    assert result.returncode == 2 and "is a search folder" in result.stderr and _snapshot(old_search) == before
    result = call_main("heads.train", "--cache", small_cache, "--out", interrupted, "--overwrite")
    assert result.returncode == 2 and "older version" in result.stderr and (interrupted / MARKER).exists()


@pytest.mark.parametrize("command", ["heads.train", "heads.baseline", "heads.compare"])
@pytest.mark.parametrize("out", [".", ".."])
def test_an_out_that_names_no_folder_of_its_own_is_one_line(made, small_cache, tmp_path, monkeypatch, command, out):
    """`--out .` in an empty folder: the folder is built as <out>.partial, and '.' has no name
    to add '.partial' to (a ValueError traceback before)."""
    work = tmp_path / "empty" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    arguments = {
        "heads.train": ["--cache", small_cache, *QUICK_TRAIN],
        "heads.baseline": ["--cache", small_cache, "--bootstrap", "5"],
        "heads.compare": [made / "run", made / "search" / "best_run", "--bootstrap", "20"],
    }[command]
    result = call_main(command, *arguments, "--out", out)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "names no folder of its own" in result.stderr
    assert sorted(p.name for p in (tmp_path / "empty").rglob("*")) == ["here"]
