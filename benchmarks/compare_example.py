"""The comparison example of docs/compare.md, regenerated: two synthetic caches stand in for two encoders'
features of the same images, a head is trained on each, and `heads.compare` compares them. Its
comparison.md and forest_plot.png are copied into benchmarks/figures/.

    python -m benchmarks.compare_example [--work outputs/compare_example]

The caches are written with the same seed, so they hold the same images, patients, labels and
splits (what heads.compare requires). Best possible AUCs: 0.800 for A, 0.792 for B and C.
B has A's width, so it draws the same noise as A: its features are A's with the classes a
little less separated (like another layer of the same network, it errs on the same images).
C is wider, so it draws noise of its own (like another network, it errs on other images).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cache.synthetic import known_auc, write_synthetic_cache

FIGURES = Path(__file__).resolve().parent / "figures"
ROWS = {"train": 30_000, "val": 5_000, "test": 25_596}  # test: the size of the official test list
ENCODERS = {"encoder_a": {"dim": 64, "separation": 1.19}, "encoder_b": {"dim": 64, "separation": 1.15},
            "encoder_c": {"dim": 96, "separation": 1.15}}


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m benchmarks.compare_example", add_help=add_help,
                                     description="Regenerate the heads.compare example of docs/compare.md.")
    parser.add_argument("--work", default="outputs/compare_example", help="where caches and runs are written")
    return parser


def run_module(*args, cwd: Path) -> None:
    """`python -m ...` as a user types it, with this checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(FIGURES.parents[1]), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=env, check=True)


def main(args) -> int:
    work = Path(args.work)
    shutil.rmtree(work / "runs", ignore_errors=True)  # only what an earlier run of this script wrote
    shutil.rmtree(work / "compare", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    for name, spec in ENCODERS.items():
        write_synthetic_cache(work / f"{name}.h5", rows=ROWS, seed=0, **spec)
        print(f"{name}: {spec['dim']}-d, best possible AUC {known_auc(spec['separation']):.3f}")
        run_module("heads.train", "--cache", f"{name}.h5", "--out", f"runs/{name}", "--lr", "0.003", cwd=work)
    run_module("heads.compare", *[f"runs/{name}" for name in ENCODERS], "--out", "compare", cwd=work)
    FIGURES.mkdir(exist_ok=True)
    for name in ("comparison.md", "forest_plot.png"):
        shutil.copy(work / "compare" / name, FIGURES / f"compare_{name}")
    print(f"copied comparison.md and forest_plot.png to {FIGURES}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
