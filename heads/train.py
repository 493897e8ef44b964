"""`python -m heads.train`: train a multi-label head on the cached features, choose its epoch
on validation, score it once on test, and write a run directory (see heads/report.py).

    python -m heads.train --cache outputs/cache/features.h5 --depth 1 --width 512
"""
from __future__ import annotations

import argparse
import datetime
import sys

import cache
from cache.runtime import DeviceUnavailable, resolve_device
from heads import settings as head_settings
from heads.cli import add_io_args, cache_paths
from heads.data import HeadsError
from heads.run import train_and_report


def get_args_parser(add_help=True, description="Train a multi-label head on the feature cache."):
    parser = argparse.ArgumentParser("python -m heads.train", add_help=add_help, description=description)
    add_io_args(parser, out_help="run directory (default: outputs/runs/head-<time>)", multi_cache=True)
    head_settings.add_setting_args(parser)
    return parser


def main(args) -> int:
    out = args.out or f"outputs/runs/head-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    try:
        train_and_report(cache_path=cache_paths(args), settings=head_settings.settings_from_args(args), out=out,
                         device=resolve_device(args.device), overwrite=args.overwrite, n_bootstrap=args.bootstrap)
    except (cache.CacheError, HeadsError, FileExistsError, DeviceUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
