"""`python -m heads.compare`: is run A really better than run B? Paired comparisons of run
directories on the same test patients (heads.train runs, search best runs, heads.baseline):
a leaderboard with patient-bootstrap CIs, and per class and for the mean, each run minus the
reference with a paired-bootstrap CI, DeLong's test and Holm-adjusted p-values.

    python -m heads.compare outputs/runs/resnet50 outputs/runs/densenet121 [--reference DIR]
    python -m heads.compare --label resnet=outputs/runs/resnet50 --label dino=outputs/runs/dino
    python -m heads.compare RUN_A RUN_B --by sex,age,view      # also paired within each subgroup

The reference defaults to the run with the best VALIDATION mean AUC. Each run is shown by a
short label: --label NAME=RUN_DIR, else its folder name. Outputs: see heads/comparison.py.
Label-efficiency runs (heads.train --train-fraction) are compared per fraction: heads/efficiency.py.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import pandas
import scipy

from cache.flags import OneLineParser, Valid, number_type
from cache.outdir import OutDirError, check_out_dir, discard_partial, finish_out_dir, prepare_out_dir
from cache.runtime import versions
from heads import subgroup_comparison
from heads.cli import BOOTSTRAP_VALID
from heads.comparison import CompareError, check_same_test_rows, choose_reference, compare_runs, label_runs, load_run
from heads.comparison_report import format_terminal, write_comparison
from heads.efficiency import compare_efficiency_runs, efficiency_comparison
from heads.subgroups import ATTRIBUTES, parse_by


def get_args_parser(add_help=True):
    parser = OneLineParser("python -m heads.compare", add_help=add_help,
                           description="Paired comparison of run directories on the same test patients.")
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories written by the kit")
    parser.add_argument("--label", action="append", default=[], type=_label, metavar="NAME=RUN_DIR",
                        help="a run and its short name in the tables (repeatable; the run need not be listed "
                             "again; default name: the run's folder name)")
    parser.add_argument("--reference", default=None, metavar="RUN_DIR",
                        help="the run the others are compared with (default: best validation mean AUC)")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/compare/<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    parser.add_argument("--bootstrap", type=number_type(int, BOOTSTRAP_VALID), default=1000,
                        help=f"patient resamples (default: 1000; allowed {BOOTSTRAP_VALID.describe()})")
    parser.add_argument("--seed", type=number_type(int, Valid(0, 2 ** 63 - 1)), default=0,
                        help="seed of the resamples (default: 0)")
    parser.add_argument("--by", type=parse_by, default=(),
                        help=f"also compare the runs within each subgroup of any of {','.join(ATTRIBUTES)} (paired: "
                             "the same rows in every run), from the per-row metadata of the runs' cache")
    parser.add_argument("--metadata-cache", default=None, metavar="PATH",
                        help="the cache whose metadata --by reads (default: the cache the first run records)")
    return parser


def _label(text: str) -> tuple[str, str]:
    """--label NAME=RUN_DIR as (name, run dir); a name must fit in a table cell."""
    name, equals, run_dir = text.partition("=")
    name = name.strip()
    if not equals or not name or not run_dir:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=RUN_DIR")
    if any(c in name for c in "|`") or not name.isprintable():
        raise argparse.ArgumentTypeError(f"{name!r}: a label may not hold | or ` or control characters")
    return name, run_dir


def main(args) -> int:
    out = Path(args.out or f"outputs/compare/{datetime.datetime.now():%Y%m%d-%H%M%S}")
    try:
        names = _unique_runs(args.runs + [run_dir for _, run_dir in args.label]
                             + ([args.reference] if args.reference else []))
        if len(names) < 2:
            raise CompareError("give at least two different run directories to compare")
        check_out_dir(out, kind="comparison", overwrite=args.overwrite)  # before reading any run
        if efficiency_comparison(names):  # label-efficiency runs: paired per fraction (heads/efficiency.py)
            if args.by:
                raise CompareError("--by compares single runs within subgroups; label-efficiency runs are compared "
                                   "per fraction: leave out --by")
            return compare_efficiency_runs(names, args=args, out=out)
        runs, reference, reason = _read_runs(names, args)
        metadata = subgroup_comparison.test_metadata(runs, args.by, metadata_cache=args.metadata_cache) \
            if args.by else None
        partial = prepare_out_dir(out, kind="comparison", overwrite=args.overwrite)
    except (CompareError, OutDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        comparison = compare_runs(runs, reference=reference, reference_reason=reason, n_resamples=args.bootstrap,
                                  seed=args.seed)
        write_comparison(partial, comparison, versions=versions(scipy=scipy.__version__, pandas=pandas.__version__))
        by_group = None if metadata is None else write_by_group(partial, runs, metadata=metadata, args=args,
                                                                reference=reference)
        finish_out_dir(partial, out, kind="comparison")
    except OutDirError as err:  # --out changed while the comparison was made: the work is kept in partial
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        discard_partial(partial, kind="comparison")
        raise
    print(format_terminal(comparison))
    if by_group is not None:
        print(subgroup_comparison.format_terminal(by_group))
    print(f"comparison: {out} (comparison.md, comparison.csv, paired_differences.csv, forest_plot.png"
          f"{', subgroup_differences.csv' if by_group is not None else ''})")
    return 0


def write_by_group(partial: Path, runs, *, metadata, args, reference):
    """subgroup_differences.csv and its section of comparison.md; returns the table."""
    table = subgroup_comparison.compare_by(runs, metadata=metadata, by=args.by, reference=reference,
                                           n_resamples=args.bootstrap, seed=args.seed)
    table.to_csv(partial / "subgroup_differences.csv", index=False, float_format="%.6g")
    with open(partial / "comparison.md", "a") as md:
        md.write("\n" + subgroup_comparison.markdown(table, by=args.by, n_resamples=args.bootstrap))
    return table


def _read_runs(names, args):
    """Every run read and checked, labelled, and the reference chosen (on validation)."""
    runs = label_runs([load_run(name) for name in names], labels=args.label)
    check_same_test_rows(runs)
    reference, reason = choose_reference(runs, args.reference)
    return runs, reference, reason


def _unique_runs(names) -> list[str]:
    """The runs as given, each directory once (the reference or a labelled run may also be listed)."""
    seen, unique = set(), []
    for name in names:
        if Path(name).resolve() not in seen:
            seen.add(Path(name).resolve())
            unique.append(name)
    return unique


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
