"""`python -m heads.compare`: is run A really better than run B? Paired comparisons of run
directories on the same test patients (heads.train runs, search best runs, heads.baseline):
a leaderboard with patient-bootstrap CIs, and per class and for the mean, each run minus the
reference with a paired-bootstrap CI, DeLong's test and Holm-adjusted p-values.

    python -m heads.compare outputs/runs/resnet50 outputs/runs/densenet121 [--reference DIR]

The reference defaults to the run with the best VALIDATION mean AUC. Outputs: see
heads/comparison.py.
"""
from __future__ import annotations

import argparse
import datetime
import shutil
import sys
from pathlib import Path

import pandas
import scipy

from cache.runtime import versions
from heads.comparison import CompareError, check_same_test_rows, choose_reference, compare_runs, load_run
from heads.comparison_report import format_terminal, write_comparison


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m heads.compare", add_help=add_help,
                                     description="Paired comparison of run directories on the same test patients.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by the kit")
    parser.add_argument("--reference", default=None, metavar="RUN_DIR",
                        help="the run the others are compared with (default: best validation mean AUC)")
    parser.add_argument("--out", default=None, help="output folder (default: outputs/compare/<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    parser.add_argument("--bootstrap", type=_at_least(1), default=1000, help="patient resamples (default: 1000)")
    parser.add_argument("--seed", type=_at_least(0), default=0, help="seed of the resamples (default: 0)")
    return parser


def _at_least(low: int):
    """An argparse type: an integer >= low, so a bad value stops at parse time (exit 2)."""
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"{text!r}: give an integer >= {low}")
        return int(text)
    return parse


def main(args) -> int:
    out = Path(args.out or f"outputs/compare/{datetime.datetime.now():%Y%m%d-%H%M%S}")
    try:
        names = _unique_runs(args.runs + ([args.reference] if args.reference else []))
        if len(names) < 2:
            raise CompareError("give at least two different run directories to compare")
        _check_out(out, overwrite=args.overwrite)
        runs = [load_run(name) for name in names]
        check_same_test_rows(runs)
        reference, reason = choose_reference(runs, args.reference)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a comparison that died half-way
    partial.mkdir(parents=True)
    try:
        comparison = compare_runs(runs, reference=reference, reference_reason=reason, n_resamples=args.bootstrap,
                                  seed=args.seed)
        write_comparison(partial, comparison, versions=versions(scipy=scipy.__version__, pandas=pandas.__version__))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)  # only ever an earlier comparison (_prepare_out checked)
    partial.rename(out)
    print(format_terminal(comparison))
    print(f"comparison: {out} (comparison.md, comparison.csv, paired_differences.csv, forest_plot.png)")
    return 0


def _unique_runs(names) -> list[str]:
    """The runs as given, each directory once (the reference may also be listed)."""
    seen, unique = set(), []
    for name in names:
        if Path(name).resolve() not in seen:
            seen.add(Path(name).resolve())
            unique.append(name)
    return unique


def _check_out(out: Path, *, overwrite: bool) -> None:
    """Refuse an --out that holds anything but an earlier comparison (replaced only with
    --overwrite): a folder the kit did not write is never touched."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (overwrite and (out / "comparison.json").is_file()):
            raise CompareError(f"--out {out} already exists" + (
                " and is not a comparison this tool wrote; pick another --out" if overwrite else
                "; pick another --out, or pass --overwrite to replace an earlier comparison"))


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
