"""Output folders: every command writes only where it may and never deletes what it did not make.

Each folder a command creates carries a marker file, `.cxr14-kit`, that names its KIND:

    run         heads.train, heads.baseline, and the best_run/ of a search (one writer, heads/report.py)
    search      python -m search (written in place, resumed by the same command)
    comparison  python -m heads.compare
    evaluation  python -m heads.evaluate (a run scored on another cache: heads.compare reads it as a run)
    transfer    python -m heads.transfer (its runs/ and evaluations/ inside are run and evaluation folders)

The rules, the same in every command and checked before any work:
- `--out` that does not exist, or is an empty folder, is written.
- `--out` that is a kit folder of the command's kind is replaced only with `--overwrite` (a search
  folder is resumed instead). A kit folder of another kind, a folder without the marker, a file
  and a symbolic link are refused in one line naming what they are: nothing is written or deleted.
- A folder is built as `<out>.partial` and renamed when complete, so a failure never leaves
  something that looks like a result; a leftover `<out>.partial` is removed only when it carries
  the marker of the same kind.
- A symbolic link as `--out` (or as `<out>.partial`) is refused rather than followed: replacing
  it would delete the folder it points to, or replace the link by a folder.
- A marker written before kinds were recorded names no kind: the kind is read from the files
  the folder holds (study.db, trials.csv or best_params.json: a search; config.json with
  metrics.json or predictions_test.csv: a run). When the files do not tell (an interrupted
  folder), the folder is refused as of unknown kind and left for its owner to remove.
Comparison folders made before the marker existed carry none: they are refused like any folder
the kit did not write.

`OutDirError` is a FileExistsError, so a command that already reports those keeps working.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MARKER = ".cxr14-kit"
KINDS = {  # each kind and the commands that write it
    "run": "heads.train, heads.baseline or a search's best_run",
    "search": "python -m search",
    "comparison": "python -m heads.compare",
    "evaluation": "python -m heads.evaluate or heads.transfer",
    "transfer": "python -m heads.transfer",
}
UNKNOWN = "unknown"  # an older marker whose folder's files do not tell its kind
SEARCH_FILES = ("study.db", "trials.csv", "best_params.json")


class OutDirError(FileExistsError):
    """An output path the command may not write into or replace."""


def folder_kind(path) -> str | None:
    """The kind of kit folder `path` is (a key of KINDS, or UNKNOWN), or None when it is not a
    folder the kit made: no marker, not a folder, or a symbolic link."""
    path = Path(path)
    marker = path / MARKER
    if path.is_symlink() or not path.is_dir() or marker.is_symlink() or not marker.is_file():
        return None
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, dict) and recorded.get("kind") in KINDS:
        return recorded["kind"]
    return _kind_from_files(path)


def _kind_from_files(path: Path) -> str:
    if any((path / name).exists() for name in SEARCH_FILES):
        return "search"
    if (path / "config.json").is_file() and any((path / n).is_file() for n in ("metrics.json", "predictions_test.csv")):
        return "run"
    return UNKNOWN


def is_kit_dir(path) -> bool:
    """True when `path` is a folder the kit created (it holds the marker), of any kind."""
    return folder_kind(path) is not None


def mark_kit_dir(path, *, kind: str) -> None:
    """Create `path` (and parents) as a kit folder of `kind`."""
    if kind not in KINDS:
        raise ValueError(f"unknown folder kind {kind!r}; one of {sorted(KINDS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text(json.dumps({"kit": "cxr14-kit", "kind": kind,
                                           "note": f"--overwrite may replace this {kind} folder"}) + "\n")


def partial_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def check_out_dir(out, *, kind: str, overwrite: bool) -> None:
    """Refuse, before any work, an --out that cannot become a folder of `kind` built aside and
    renamed: see the module's rules. Raises OutDirError."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise OutDirError(f"--out {out} names no folder of its own (it is built aside as <out>.partial and "
                          f"renamed): give a folder name, e.g. runs/NAME")
    found = _existing_kind(out)
    if found is not None and found != kind:
        raise OutDirError(f"--out {out} is {_what(found)}; --overwrite replaces only a {kind} folder: "
                          f"pick another --out")
    if found is not None and not overwrite:
        raise OutDirError(f"--out {out} already holds a {kind} (written by {KINDS[kind]}); pick another "
                          f"--out or pass --overwrite")
    partial = partial_path(out)
    if partial.is_symlink() or (partial.exists() and folder_kind(partial) != kind):
        found = "a symbolic link" if partial.is_symlink() else _what(folder_kind(partial))
        raise OutDirError(f"{partial} exists and is {found}; it is left alone: move it or pick another --out")


def prepare_out_dir(out, *, kind: str, overwrite: bool) -> Path:
    """`<out>.partial`, new and marked as `kind`, to build the folder in (after check_out_dir;
    a partial folder of the same kind left by a killed command is replaced)."""
    check_out_dir(out, kind=kind, overwrite=overwrite)
    partial = partial_path(out)
    if partial.exists():
        shutil.rmtree(partial)
    mark_kit_dir(partial, kind=kind)
    return partial


def discard_partial(partial, *, kind: str) -> None:
    """Remove a partial folder after a failure, only if it is the kit's, of `kind`."""
    if folder_kind(partial) == kind:
        shutil.rmtree(partial, ignore_errors=True)


def finish_out_dir(partial, out, *, kind: str) -> Path:
    """Move a complete folder into place; what it replaces must still be of `kind` (it may
    have changed while the folder was built: then the work is kept in `partial`)."""
    partial, out = Path(partial), Path(out)
    if out.exists() or out.is_symlink():
        empty = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
        if not empty and folder_kind(out) != kind:
            found = "a symbolic link" if out.is_symlink() else _what(folder_kind(out))
            raise OutDirError(f"--out {out} became {found} while the {kind} folder was built; it is left alone "
                              f"and the work is kept in {partial}")
        out.rmdir() if empty else shutil.rmtree(out)
    partial.rename(out)
    return out


def check_open_dir(out, *, kind: str) -> None:
    """Refuse, before any work, an --out that a command writing in place (a search, resumed by
    rerunning it) may not use: anything but a new or empty folder or a kit folder of `kind`."""
    out = Path(out)
    found = _existing_kind(out)
    if found is not None and found != kind:
        raise OutDirError(f"--out {out} is {_what(found)}; only a {kind} folder is written into (and "
                          f"resumed) here: pick another --out")


def open_dir(out, *, kind: str) -> Path:
    """`out`, checked, then created and marked as `kind` if new."""
    check_open_dir(out, kind=kind)
    if folder_kind(out) is None:
        mark_kit_dir(out, kind=kind)
    return Path(out)


def refuse_link(out, *, flag: str = "--out") -> None:
    """Refuse an output path that is a symbolic link, before any work (every command's --out,
    folder or file): writing through it would replace what it points to, wherever that is."""
    out = Path(out)
    if out.is_symlink():
        raise OutDirError(f"{flag} {out} is a symbolic link (to {os.readlink(out)}); the kit does not write "
                          f"through links: give the path itself, or another {flag}")


def _existing_kind(out: Path) -> str | None:
    """The kind of kit folder --out already is, None when it is new or an empty folder; refuses
    a link, a file, and a folder that is not the kit's or whose kind is unknown."""
    refuse_link(out)
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} is a file, not a folder; pick another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    found = folder_kind(out)
    if found is None or found == UNKNOWN:
        raise OutDirError(f"--out {out} is {_what(found)}; it is left alone: pick another --out")
    return found


def _what(kind: str | None) -> str:
    """What a folder is, in words, for a refusal."""
    if kind is None:
        return "a folder the kit did not write (it has no .cxr14-kit marker)"
    if kind == UNKNOWN:
        return "a folder of an older version of the kit whose files do not tell what it is (remove it yourself)"
    return f"a {kind} folder (written by {KINDS[kind]})"
