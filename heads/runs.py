"""`python -m heads.runs [DIR]`: the runs under a folder (heads.train, heads.baseline, a search's
best_run), one table per test set, each ordered by VALIDATION mean AUC.

    python -m heads.runs                      # everything under outputs/
    python -m heads.runs outputs/runs --csv runs.csv

Runs whose test rows differ (other images, patients or labels) are listed apart: their test AUCs
do not compare. Test AUC is shown but orders nothing, as a comparison's reference is chosen
(heads/comparison.py, whose loading and checks this reuses). A run is a folder whose kit marker
says so (cache/outdir.py); a run that cannot be read is named in one line and the rest listed.
"""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import pandas as pd

from cache.flags import OneLineParser
from cache.outdir import OutDirError, folder_kind, partial_path, refuse_link
from heads.comparison import (CompareError, Run, check_same_test_rows, describe_features, label_runs,
                              labels_and_scores, load_run)
from heads.comparison_report import head_descriptions
from heads.metrics import auc_per_class, mean_auc

COLUMNS = ["test_set", "name", "features", "head", "val_mean_auc", "test_mean_auc", "date", "run_dir",
           "cache_fingerprints"]
PARTIAL = partial_path("run").suffix  # a folder still being built, or left by a killed command
SHOWN = {"name": "name", "features": "features", "head": "head", "val_mean_auc": "val AUC",
         "test_mean_auc": "test AUC", "date": "date", "run_dir": "run"}


def get_args_parser(add_help=True):
    parser = OneLineParser("python -m heads.runs", add_help=add_help,
                           description="List the runs under a folder, ordered by validation mean AUC, "
                                       "grouped by test set.")
    parser.add_argument("folder", nargs="?", default="outputs", metavar="DIR",
                        help="the folder to look in, subfolders included (default: outputs)")
    parser.add_argument("--csv", default=None, metavar="FILE", help="also write the table to this CSV")
    return parser


def main(args) -> int:
    folder = Path(args.folder)
    try:
        if not folder.is_dir():
            raise CompareError(f"{folder}: no such folder; give the folder the runs were written under")
        if args.csv:
            check_csv(Path(args.csv))
    except (CompareError, OutDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    found = find_runs(folder)
    # a label-efficiency run holds one head per fraction and repeat, not one test score
    efficiency = [path for path in found if (path / "efficiency.csv").is_file()]
    runs, unreadable = read_runs([path for path in found if path not in efficiency])
    table = runs_table(runs, root=folder)
    print(format_table(table, runs) if runs else f"no runs under {folder}")
    for path in efficiency:
        print(f"label-efficiency run (efficiency.md; heads.compare compares two per fraction): {path}")
    for message in unreadable:
        print(f"unreadable: {message}")
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        table[COLUMNS].to_csv(args.csv, index=False, float_format="%.6g")
        print(f"wrote {args.csv}")
    return 0


def check_csv(path: Path) -> None:
    """Refuse, before any work, a --csv that is a link, a folder, or a file heads.runs did not
    write (one it wrote, recognised by its header, is replaced)."""
    refuse_link(path, flag="--csv")
    if path.is_dir():
        raise OutDirError(f"--csv {path} is a folder; give the path of the CSV to write")
    if path.exists():
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                header = handle.readline().strip()
        except OSError as err:
            raise OutDirError(f"--csv {path} cannot be read ({err}); choose another --csv") from None
        if header != ",".join(COLUMNS):
            raise OutDirError(f"--csv {path} exists and is not a table written by heads.runs; choose another --csv")


def find_runs(folder: Path, *, max_depth: int | None = None) -> list[Path]:
    """Every run folder under `folder` (itself included), at most `max_depth` folders down, in
    path order. Links are not followed; a run's or comparison's insides and half-written
    `.partial` folders are not searched."""
    found = []
    for directory, subfolders, _ in os.walk(folder):
        kind = folder_kind(directory)
        if kind == "run":
            found.append(Path(directory))
        if kind in ("run", "comparison") or (
                max_depth is not None and len(Path(directory).relative_to(folder).parts) >= max_depth):
            subfolders.clear()
        subfolders[:] = sorted(s for s in subfolders if not s.endswith(PARTIAL))
    return sorted(found)


def read_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """(the runs read and checked as heads.compare reads them, one line per run that cannot be)."""
    runs, unreadable = [], []
    for path in paths:
        try:
            runs.append(load_run(str(path)))
        except (CompareError, OSError, ValueError) as err:
            unreadable.append(str(err) if isinstance(err, CompareError) else f"{path}: {err}")
    return runs, unreadable


def group_by_test_set(runs: list[Run]) -> list[int]:
    """Each run's test set, numbered from 1 in the order first met: runs share one when heads.compare
    would accept them together (the same classes, images, patients and labels)."""
    representatives, groups = [], []
    for run in runs:
        for number, first in enumerate(representatives, start=1):
            try:
                check_same_test_rows([first, run])
            except CompareError:
                continue
            groups.append(number)
            break
        else:
            representatives.append(run)
            groups.append(len(representatives))
    return groups


def test_mean_auc(run: Run) -> float:
    """The run's test mean AUC, recomputed from its predictions_test.csv."""
    return mean_auc(auc_per_class(*labels_and_scores(run.test, run.classes)))


def runs_table(runs: list[Run], *, root: Path) -> pd.DataFrame:
    """One row per run, each test set's runs together, ordered by validation mean AUC (a run
    without one last); test AUC is a column, never a key."""
    label_runs(runs)
    heads = head_descriptions(runs)
    rows = [{"test_set": group, "name": run.label, **describe_features(run.config), "head": heads[run.label],
             "val_mean_auc": run.val_mean_auc, "test_mean_auc": test_mean_auc(run), "date": _written(run.path),
             "run_dir": _relative(run.path, root)} for run, group in zip(runs, group_by_test_set(runs))]
    table = pd.DataFrame(rows, columns=COLUMNS)
    return table.sort_values(["test_set", "val_mean_auc"], ascending=[True, False], na_position="last",
                             kind="stable").reset_index(drop=True)


def _written(path: Path) -> str:
    """When the run was written: its config.json's time (a run folder is written once, then renamed)."""
    return f"{datetime.datetime.fromtimestamp((path / 'config.json').stat().st_mtime):%Y-%m-%d %H:%M}"


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def format_table(table: pd.DataFrame, runs: list[Run]) -> str:
    """The table as printed: a header line per test set, then its runs."""
    by_label = {run.label: run for run in runs}
    lines = []
    for group, rows in table.groupby("test_set", sort=True):
        first = by_label[rows["name"].iloc[0]]
        official = ", the official NIH test split" if first.config.get("official_nih_test_split") is True else ""
        lines += ["" if lines else None,
                  f"test set {group}: {len(first.test)} images, {first.test['patient_id'].nunique()} patients, "
                  f"{len(first.classes)} classes{official} ({len(rows)} run{'s' if len(rows) > 1 else ''})",
                  _aligned(rows)]
    lines.append("\nordered by validation mean AUC within each test set; test AUC is shown, never ranked on")
    return "\n".join(line for line in lines if line is not None)


def _aligned(rows: pd.DataFrame) -> str:
    """The rows under their headers, text left-aligned and AUCs right-aligned."""
    cells = {header: [_cell(value) for value in rows[column]] for column, header in SHOWN.items()}
    widths = {header: max(map(len, [header, *values])) for header, values in cells.items()}
    numbers = ("val AUC", "test AUC")

    def line(values):
        return "  ".join(value.rjust(widths[h]) if h in numbers else value.ljust(widths[h])
                         for h, value in zip(cells, values)).rstrip()
    return "\n".join([line(list(cells))] + [line(values) for values in zip(*cells.values())])


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):  # a run without a validation AUC
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
