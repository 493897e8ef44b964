"""Wall time of a whole `python -m search` with K trials per pass against K = 1 (one at a time),
same cache, same sampler seed, same pruner, in one run: the speed-up and the best validation
AUC each reaches.

    python -m benchmarks.bench_search                                   # 100 trials, quarter NIH scale, 2048-d
    python -m benchmarks.bench_search --per-pass 1,4,8,16 --trials 40   # choose the default K
    python -m benchmarks.bench_search --scale 1 --per-pass default      # full NIH scale, default K only

Each search is a real `python -m search` in a subprocess with its own SQLite study; its time
includes loading the cache, retraining the best trial and scoring it on test.
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
    parser.add_argument("--scale", type=float, default=0.25, help="fraction of NIH-scale rows")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension of the synthetic cache")
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    parser.add_argument("--per-pass", default="default,1",
                        help="comma-separated K values timed in this order; 'default' is the search's own default")
    parser.add_argument("--cache", default=None, help="reuse a cache (default: write a synthetic one)")
    return parser


def time_search(cache, out, *, per_pass: str, args) -> tuple[float, dict]:
    command = [sys.executable, "-m", "search", "--cache", str(cache), "--out", str(out), "--trials", str(args.trials),
               "--pruner", args.pruner, "--max-epochs", str(args.max_epochs), "--device", args.device,
               "--bootstrap", "100", "--sampler-seed", "0"]
    if per_pass != "default":
        command += ["--trials-per-pass", per_pass]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name="cxr14-heads", storage=f"sqlite:///{out / 'study.db'}")
    states = {s: sum(t.state.name == s for t in study.trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    config = json.loads((out / "config.json").read_text())
    return seconds, {**states, "best": study.best_value, "k": config["trials_per_pass"]}


def run(args) -> list[dict]:
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache or Path(tmp) / "features.h5")
        sizes = {k: max(50, int(v * args.scale)) for k, v in NIH_SCALE.items()}
        if not args.cache:
            write_synthetic_cache(cache, rows=sizes, dim=args.dim)
        for per_pass in args.per_pass.split(","):
            seconds, info = time_search(cache, Path(tmp) / f"k{per_pass}", per_pass=per_pass, args=args)
            results[per_pass] = (seconds, info)
            rows.append({"stage": "search",
                         "measure": f"{args.trials} trials, pruner {args.pruner}, K = {info['k']} per pass",
                         "value": f"{seconds:.0f} s",
                         "note": f"{sizes['train']} train rows x {args.dim}-d, max "
                                 f"{args.max_epochs} epochs; {info['COMPLETE']} complete, {info['PRUNED']} pruned, "
                                 f"{info['FAIL']} failed; best val {info['best']:.4f}"})
    if "1" in results:
        one_seconds, one = results["1"]
        for row, (per_pass, (seconds, info)) in zip(rows, results.items()):
            if per_pass != "1":
                row["note"] += (f"; {one_seconds / seconds:.2f}x faster than K = 1, best val "
                                f"{info['best'] - one['best']:+.4f} against it")
    return rows


def main(args) -> int:
    print_table(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
