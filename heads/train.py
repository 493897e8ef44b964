"""`python -m heads.train`: train a multi-label head on the cached features, choose its epoch
on validation, score it once on test, and write a run directory (see heads/report.py).

    python -m heads.train --cache outputs/cache/features.h5 --depth 1 --width 512
    python -m heads.train --lr 1e-4,3e-4,1e-3 --weight-decay 0,1e-4   # a grid: 6 heads, one pass
    python -m heads.train --cache resnet.h5 --cache densenet.h5        # two caches side by side
    python -m heads.train --pool --cache nih.h5 --cache chexpert.h5    # two datasets' rows, one head
    python -m heads.train --train-fraction 0.01,0.1,1 --repeats 5      # label efficiency (heads/efficiency.py)
"""
from __future__ import annotations

import datetime
import sys

import cache
from cache.flags import OneLineParser
from cache.outdir import check_out_dir
from cache.runtime import DeviceUnavailable, resolve_device
from heads import settings as head_settings
from heads.cli import add_io_args, add_name_arg, add_operating_args, cache_paths, check_subgroups
from heads.data import HeadsError, load_head_data
from heads.efficiency import run_efficiency
from heads.estimator import Head, HeadGrid
from heads.pool import load_pooled_data
from heads.training import fit_and_report


def get_args_parser(add_help=True, description="Train a multi-label head on the feature cache."):
    parser = OneLineParser("python -m heads.train", add_help=add_help, description=description)
    add_io_args(parser, out_help="run directory (default: outputs/runs/head-<time>)", multi_cache=True)
    add_name_arg(parser)
    parser.add_argument("--pool", action="store_true",
                        help="train on the union of the rows of the --cache files (several datasets, one encoder; "
                             "each keeps its splits, test is also reported per dataset) instead of joining caches "
                             "of the same images side by side")
    add_operating_args(parser)
    head_settings.add_setting_args(parser, grid=True)
    head_settings.add_efficiency_args(parser)
    return parser


def main(args) -> int:
    out = args.out or f"outputs/runs/head-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    grid = head_settings.settings_grid(args)
    if args.repeats is not None and args.train_fraction is None:
        print("error: --repeats repeats a label-efficiency run; give --train-fraction too", file=sys.stderr)
        return 2
    try:
        check_out_dir(out, kind="run", overwrite=args.overwrite)  # before any work
        if args.train_fraction is not None and (args.by or args.sensitivity is not None):
            raise HeadsError("--by and --sensitivity are not reported by --train-fraction runs (their figures are "
                             "AUCs per fraction); run heads.train without --train-fraction for them")
        device = resolve_device(args.device)
        paths = cache_paths(args)
        data = load_pooled_data(paths, device=device) if args.pool else load_head_data(paths, device=device)
        check_subgroups(data, args.by)
        if args.train_fraction is not None:
            run_efficiency(grid=grid, data=data, cache_path=paths, out=out, device=device,
                           fractions=args.train_fraction, repeats=args.repeats or head_settings.REPEATS.default,
                           overwrite=args.overwrite, name=args.name)
            return 0
        estimator = Head(grid[0], device=device) if len(grid) == 1 else HeadGrid(grid, device=device)
        fit_and_report(estimator, cache_path=paths, data=data, out=out, device=device, overwrite=args.overwrite,
                       n_bootstrap=args.bootstrap, name=args.name, by=args.by, sensitivity=args.sensitivity)
    except (cache.CacheError, HeadsError, FileExistsError, DeviceUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
