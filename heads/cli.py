"""Command-line pieces shared by the heads and search entry points (so no CLI imports another)."""
from __future__ import annotations

import cache


def add_io_args(parser, *, out_help: str, overwrite: bool = True) -> None:
    parser.add_argument("--cache", default=cache.DEFAULT_CACHE, help="the HDF5 feature cache")
    parser.add_argument("--out", default=None, help=out_help)
    if overwrite:
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for the test CIs")
