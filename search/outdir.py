"""The search folder obeys the kit's folder rules (heads.report): the kit writes only into a
folder it created itself (it carries the kit's marker) or into a new or empty one."""
from __future__ import annotations

from pathlib import Path

from heads.report import is_kit_dir, mark_kit_dir


def check_search_dir(out: Path) -> None:
    """Refuse (one line) a file or a folder of someone else's, before any work."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder; pick another --out")
    if out.is_dir() and any(out.iterdir()) and not is_kit_dir(out):
        raise FileExistsError(f"--out {out} holds files the kit did not write (no kit marker); "
                              f"pick another --out, the kit never writes into a folder it did not create")


def prepare_search_dir(out: Path) -> Path:
    """`out`, checked, then created and marked if new."""
    check_search_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    if not is_kit_dir(out):
        mark_kit_dir(out)
    return out
