"""Wall time of a search with the median pruner against the same search without pruning,
on one synthetic cache, in one run.

    python -m benchmarks.bench_search --scale 1 --trials 100       # NIH scale (a GPU's job)
    python -m benchmarks.bench_search --scale 0.03125 --dim 128     # what a 2-core CPU finishes

Each search is a real `python -m search` in a subprocess with its own SQLite study.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

from benchmarks.table import print_table
from cache.synthetic import NIH_SCALE, write_synthetic_cache

REPO = Path(__file__).resolve().parents[1]


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m benchmarks.bench_search", add_help=add_help)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--scale", type=float, default=1 / 32, help="fraction of NIH-scale rows")
    parser.add_argument("--dim", type=int, default=128, help="feature dimension of the synthetic cache")
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--pruners", default="median,none", help="comma-separated, timed in this order")
    return parser


def time_search(cache, out, *, pruner: str, args) -> tuple[float, dict]:
    command = [sys.executable, "-m", "search", "--cache", str(cache), "--out", str(out), "--trials", str(args.trials),
               "--pruner", pruner, "--max-epochs", str(args.max_epochs), "--device", args.device, "--bootstrap", "100"]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name="cxr14-heads", storage=f"sqlite:///{out / 'study.db'}")
    states = {s: sum(t.state.name == s for t in study.trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    best = json.loads((out / "best_params.json").read_text())
    return seconds, {**states, "best": best["study_val_mean_auc"]}


def run(args) -> list[dict]:
    rows, times = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "features.h5"
        sizes = {k: max(50, int(v * args.scale)) for k, v in NIH_SCALE.items()}
        write_synthetic_cache(cache, rows=sizes, dim=args.dim)
        for pruner in args.pruners.split(","):
            seconds, info = time_search(cache, Path(tmp) / pruner, pruner=pruner, args=args)
            times[pruner] = seconds
            rows.append({"stage": "search", "measure": f"{args.trials} trials, pruner {pruner}",
                         "value": f"{seconds:.0f} s",
                         "note": f"{sizes['train']} train rows x {args.dim}-d, max {args.max_epochs} epochs; "
                                 f"{info['COMPLETE']} complete, {info['PRUNED']} pruned; best val {info['best']:.4f}"})
    if "median" in times and "none" in times:
        rows[-1]["note"] += f"; pruning is {times['none'] / times['median']:.2f}x faster"
    return rows


def main(args) -> int:
    print_table(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
