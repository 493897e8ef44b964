"""Command-line pieces shared by the heads and search entry points (so no CLI imports another)."""
from __future__ import annotations

import argparse

import cache
from cache.flags import Valid, number_type

BOOTSTRAP_VALID = Valid(1, 100_000)  # patient resamples; 1,000 gives CI ends to about +-0.005


def add_io_args(parser, *, out_help: str, overwrite: bool = True, multi_cache: bool = False,
                device: bool = True) -> None:
    """--cache, --out, --overwrite, --device, --bootstrap. With `multi_cache`, --cache may be
    given several times (a list; caches of the same images, their features side by side) and
    `cache_paths(args)` reads it."""
    if multi_cache:
        parser.add_argument("--cache", action="append", default=None,
                            help=f"an HDF5 feature cache; repeat to join several caches of the same images "
                                 f"(default: {cache.DEFAULT_CACHE})")
    else:
        parser.add_argument("--cache", default=cache.DEFAULT_CACHE, help="the HDF5 feature cache")
    parser.add_argument("--out", default=None, help=out_help)
    if overwrite:
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    if device:
        parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--bootstrap", type=number_type(int, BOOTSTRAP_VALID), default=1000,
                        help=f"patient resamples for the test CIs (allowed {BOOTSTRAP_VALID.describe()})")


def add_operating_args(parser) -> None:
    """--sensitivity and --by: how each class's threshold is chosen on validation, and the test
    subgroups reported (heads/operating.py, heads/subgroups.py)."""
    from heads.operating import SENSITIVITY_VALID
    from heads.subgroups import ATTRIBUTES, parse_by

    parser.add_argument("--sensitivity", type=number_type(float, SENSITIVITY_VALID), default=None,
                        help="choose each class's threshold on validation as the highest that reaches this "
                             f"sensitivity (allowed {SENSITIVITY_VALID.describe()}; default: Youden's J)")
    parser.add_argument("--by", type=parse_by, default=(),
                        help=f"report test AUC and false negative rate per subgroup of any of {','.join(ATTRIBUTES)} "
                             "(from the cache's per-row metadata), e.g. --by sex,age")


def check_subgroup_request(metadata, by, *, where, n_rows: int | None = None) -> None:
    """--by needs per-row metadata holding the attributes asked for: refused in one line before
    any training or scoring (heads.train, heads.evaluate, heads.transfer)."""
    from heads.data import HeadsError
    from heads.subgroups import check_request

    if not by:
        return
    if metadata is None:
        raise HeadsError(f"{where}: --by {','.join(by)} needs per-row sex, age and view, which this cache does not "
                         f"hold; rerun the `python -m extract` command that made it (it adds them without embedding "
                         f"again), or leave out --by")
    try:
        check_request(metadata, by, n_rows=len(metadata["age"]) if n_rows is None else n_rows)
    except ValueError as err:
        raise HeadsError(f"{where}: {err}") from None


def check_subgroups(data, by) -> None:
    """check_subgroup_request on the test rows of loaded data."""
    where = " + ".join(entry["name"] for entry in data.caches)
    check_subgroup_request(data.test.metadata, by, where=where, n_rows=len(data.test))


def cache_paths(args) -> list:
    """The --cache values as a list (the default cache when none was given)."""
    if args.cache is None:
        return [cache.DEFAULT_CACHE]
    return [args.cache] if isinstance(args.cache, str) else list(args.cache)


def run_name(text: str) -> str:
    """A run's short name (--name, a comparison's --label), as argparse `type=`: it becomes a
    table cell, so it may not be empty or hold | or ` or control characters."""
    name = text.strip()
    if not name or any(c in name for c in "|`") or not name.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r}: a run name must be non-empty, without | or ` or control "
                                         "characters")
    return name


def add_name_arg(parser) -> None:
    parser.add_argument("--name", type=run_name, default=None,
                        help="the run's short name, recorded in config.json; heads.compare and heads.runs show it "
                             "(default: none, they show the folder name)")
