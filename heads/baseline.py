"""`python -m heads.baseline`: the baseline a user would otherwise reach for, scikit-learn's
LogisticRegression (one per class, on its known labels) on the same standardized features and
splits, written by the same run-directory writer as the heads (no head.pt) so the two tables
compare line by line. It runs on the CPU (scikit-learn has no GPU path), so it takes no --device."""
from __future__ import annotations

import datetime
import sys

import cache
from cache.flags import OneLineParser, Valid, number_type
from cache.outdir import check_out_dir
from heads.cli import add_io_args, add_name_arg, cache_paths
from heads.data import HeadsError, load_head_data
from heads.estimator import LogisticBaseline
from heads.training import fit_and_report


def get_args_parser(add_help=True):
    parser = OneLineParser("python -m heads.baseline", add_help=add_help,
                           description="scikit-learn logistic regression on the feature cache.")
    add_io_args(parser, out_help="run directory (default: outputs/runs/sklearn-<time>)", multi_cache=True,
                device=False)
    add_name_arg(parser)
    parser.add_argument("--C", type=number_type(float, Valid(0.0, low_open=True)), default=1.0,
                        help="inverse L2 strength (scikit-learn's default; allowed (0, inf))")
    parser.add_argument("--max-iter", type=number_type(int, Valid(1, 1_000_000)), default=1000,
                        help="lbfgs iterations per class")
    parser.add_argument("--seed", type=number_type(int, Valid(0, 2 ** 63 - 1)), default=0, help="bootstrap seed")
    return parser


def main(args) -> int:
    out = args.out or f"outputs/runs/sklearn-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    try:
        check_out_dir(out, kind="run", overwrite=args.overwrite)
        paths = cache_paths(args)
        data = load_head_data(paths, device="cpu")
        fit_and_report(LogisticBaseline(C=args.C, max_iter=args.max_iter, seed=args.seed), cache_path=paths,
                       data=data, out=out, device="cpu", overwrite=args.overwrite, n_bootstrap=args.bootstrap,
                       name=args.name)
    except (cache.CacheError, HeadsError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
