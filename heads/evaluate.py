"""`python -m heads.evaluate RUN_DIR --cache OTHER.h5`: score a trained run on another cache of
the same encoder recipe (another dataset, or another cache of the same one), on the classes the
two share through the label vocabulary, and write an evaluation folder that heads.compare reads
like a run's test results (files: heads/external.py).

    python -m heads.evaluate outputs/runs/resnet50-nih --cache outputs/cache/resnet50-chexpert.h5
    python -m heads.compare outputs/eval/resnet50-on-chexpert outputs/eval/rad-dino-on-chexpert

--split test (the default) reads the target's test rows only; --split all every done row (the
target's train and val rows too: fine for a dataset the run never saw, never for its own cache).
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import cache
from cache.flags import OneLineParser, number_type
from cache.outdir import OutDirError, check_out_dir, discard_partial, finish_out_dir, prepare_out_dir
from heads.cli import BOOTSTRAP_VALID
from heads.predict import say_warnings
from heads.external import (SPLIT_CHOICES, ExternalError, check_same_recipe, check_split, check_target, evaluate,
                            format_evaluation, read_source_run, read_target, write_evaluation)

KIND = "evaluation"


def get_args_parser(add_help=True):
    parser = OneLineParser("python -m heads.evaluate", add_help=add_help,
                           description="Score a trained run on another cache of the same encoder recipe.")
    parser.add_argument("run", metavar="RUN_DIR", help="a run directory written by heads.train or search")
    parser.add_argument("--cache", required=True, help="the cache to score the run on (same encoder recipe)")
    parser.add_argument("--split", default="test", choices=SPLIT_CHOICES,
                        help="the target rows scored: its test split (default), or all its done rows")
    parser.add_argument("--out", default=None, help="evaluation folder (default: outputs/evaluations/<run>-on-<cache>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    parser.add_argument("--bootstrap", type=number_type(int, BOOTSTRAP_VALID), default=1000,
                        help=f"patient resamples for the CIs (default: 1000; allowed {BOOTSTRAP_VALID.describe()})")
    # Google's expert labels on NIH (--labels google2019, heads/expert.py) replace the target's labels in
    # heads.external.read_target; --by sex,age,view and operating points plug in at write_evaluation
    return parser


def main(args) -> int:
    out = Path(args.out or f"outputs/evaluations/{Path(args.run).resolve().name}-on-{Path(args.cache).stem}-"
                           f"{datetime.datetime.now():%Y%m%d-%H%M%S}")
    try:
        check_out_dir(out, kind=KIND, overwrite=args.overwrite)  # before any work
        run = read_source_run(args.run)
        attrs = check_target(args.cache)
        check_same_recipe(run, attrs, args.cache)
        check_split(run, attrs, split=args.split)
        evaluation = evaluate(run, read_target(args.cache, split=args.split), n_bootstrap=args.bootstrap)
        partial = prepare_out_dir(out, kind=KIND, overwrite=args.overwrite)
    except (ExternalError, cache.CacheError, OutDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    say_warnings(run.config, [run.recipe], notes=[])  # random encoder weights, classes the run never learned
    try:
        write_evaluation(partial, evaluation)
        finish_out_dir(partial, out, kind=KIND)
    except OutDirError as err:  # --out changed while the evaluation was written: the work is kept in partial
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        discard_partial(partial, kind=KIND)
        raise
    print(format_evaluation(evaluation))
    print(f"evaluation: {out} (metrics.json, predictions_test.csv, roc_curves.png; heads.compare reads it as a run)")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
