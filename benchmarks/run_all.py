"""`make bench`: the CPU benchmarks of all three stages, each against its baseline, as one table
(extraction: 400 synthetic 1024x1024 PNGs, the kit in fp32 and bf16 against the tutorial pipeline;
external validation: a 4 x 4 transfer matrix and a 4 x 5 label-efficiency run, each against the
same work scripted as separate processes).

    python -m benchmarks.run_all [--quick]
"""
import argparse
import sys

from benchmarks import bench_extract, bench_heads, bench_search, bench_transfer
from benchmarks.table import print_table


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m benchmarks.run_all", add_help=add_help)
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the benchmarks run, not speed")
    return parser


def main(args) -> int:
    quick = args.quick
    rows = bench_extract.run(bench_extract.get_args_parser().parse_args(["--images", "8" if quick else "400"]))
    rows += bench_heads.run(bench_heads.get_args_parser().parse_args(
        ["--scale", "0.02" if quick else "1", *(["--precision-scale", "0.002"] if quick else [])]))
    rows += bench_search.run(bench_search.get_args_parser().parse_args(
        ["--trials", "6", "--max-epochs", "4", "--scale", "0.02", "--dim", "128"] if quick else []))
    rows += bench_transfer.run(bench_transfer.get_args_parser().parse_args(["--quick"] if quick else []))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
