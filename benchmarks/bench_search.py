"""Wall time of a whole `python -m search` with its default schedule (K trials per pass, successive
halving inside each pass) against one trial at a time (K = 1, the median pruner alone), same
cache, same sampler seed, same pruner, in one run: the speed-up, the best validation AUC each
reaches, and the best trial's test AUC beside it (reported, never used to choose).

    python -m benchmarks.bench_search                                   # 100 trials, quarter NIH scale, 2048-d
    python -m benchmarks.bench_search --variants 8:2:2,16:1:3,1 --trials 40   # choose the schedule (K:rung:eta)
    python -m benchmarks.bench_search --scale 1 --variants default      # full NIH scale, default only
    python -m benchmarks.bench_search --baseline-trials 40              # K = 1 on fewer trials, when time is short

With K = 1 among the variants it also prints how well a head's validation AUC after 1, 3 and 9
epochs ranks the heads that trained to the end (Spearman, over K = 1's complete trials): what a
rung that early can know.

Each search is a real `python -m search` in a subprocess with its own SQLite study; its time
includes loading the cache, retraining the best trial and scoring it on test. Each row notes the
load average before and after it: the machine may be shared, and only ratios within one run
compare.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pandas as pd

from benchmarks.table import print_measured
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
    parser.add_argument("--sampler-seed", type=int, default=0, help="the same for every variant")
    parser.add_argument("--variants", default="default,1",
                        help="comma-separated schedules timed in this order: 'default' (the search's own), K "
                             "(K per pass, default halving; 1 is one trial at a time) or K:first_rung:eta")
    parser.add_argument("--baseline-trials", type=int, default=None,
                        help="trials of the K = 1 variant (default: --trials); its time is scaled to --trials "
                             "for the speed-up")
    parser.add_argument("--cache", default=None, help="reuse a cache (default: write a synthetic one)")
    parser.add_argument("--work-dir", default=None,
                        help="keep the cache and every search folder here (default: a temporary folder)")
    return parser


def search_flags(variant: str) -> list:
    if variant == "default":
        return []
    k, *schedule = variant.split(":")
    flags = ["--trials-per-pass", k]
    if k == "1":
        flags += ["--halving-eta", "1"]
    if schedule:
        flags += ["--halving-first-rung", schedule[0], "--halving-eta", schedule[1]]
    return flags


def time_search(cache, out, *, variant: str, trials: int, args) -> tuple[float, dict]:
    command = [sys.executable, "-m", "search", "--cache", str(cache), "--out", str(out), "--trials", str(trials),
               "--pruner", args.pruner, "--max-epochs", str(args.max_epochs), "--device", args.device,
               "--bootstrap", "100", "--sampler-seed", str(args.sampler_seed), *search_flags(variant)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name="cxr14-heads", storage=f"sqlite:///{out / 'study.db'}")
    states = {s: sum(t.state.name == s for t in study.trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    epochs = sum(len(t.intermediate_values) for t in study.trials)
    config = json.loads((out / "config.json").read_text())
    best = json.loads((out / "best_params.json").read_text())
    halving = config["halving"] if config["trials_per_pass"] > 1 and config["halving"]["eta"] > 1 else None
    return seconds, {**states, "study": study, "best": study.best_value, "test": best["retrained_test_mean_auc"], "epochs": epochs,
                     "k": config["trials_per_pass"], "halving": halving, "trials": trials,
                     "load": f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}"}


def describe(info: dict) -> str:
    halving = (f", halving from epoch {info['halving']['first_rung']}, eta {info['halving']['eta']}"
               if info["halving"] else "")
    return f"K = {info['k']} per pass{halving}"


def run(args) -> list[dict]:
    rows, results = [], {}
    with (contextlib.nullcontext(args.work_dir) if args.work_dir else tempfile.TemporaryDirectory()) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        cache = Path(args.cache or Path(tmp) / "features.h5")
        sizes = {k: max(50, int(v * args.scale)) for k, v in NIH_SCALE.items()}
        if not args.cache:
            write_synthetic_cache(cache, rows=sizes, dim=args.dim)
        for variant in args.variants.split(","):
            trials = args.baseline_trials if variant == "1" and args.baseline_trials else args.trials
            seconds, info = time_search(cache, Path(tmp) / variant.replace(":", "-"), variant=variant,
                                        trials=trials, args=args)
            results[variant] = (seconds, info)
            rows.append({"stage": "search",
                         "measure": f"{trials} trials, pruner {args.pruner}, {describe(info)}"
                                    + (f", sampler seed {args.sampler_seed}" if args.sampler_seed else ""),
                         "value": f"{seconds:.0f} s",
                         "note": f"{sizes['train']} train rows x {args.dim}-d, max {args.max_epochs} epochs; "
                                 f"{info['COMPLETE']} complete, {info['PRUNED']} pruned, {info['FAIL']} failed; "
                                 f"{info['epochs']} head-epochs; best val {info['best']:.4f} (its test "
                                 f"{info['test']:.4f}); load {info['load']}"})
    if "1" in results:
        one_seconds, one = results["1"]
        per_trial = one_seconds / one["trials"]
        for row, (variant, (seconds, info)) in zip(rows, results.items()):
            if variant != "1":
                scaled = " (K = 1 time scaled per trial)" if one["trials"] != info["trials"] else ""
                row["note"] += (f"; {per_trial * info['trials'] / seconds:.2f}x faster than K = 1{scaled}, best val "
                                f"{info['best'] - one['best']:+.4f} against it")
        rows += horizon_rows(one["study"])
    return rows


def horizon_rows(study, *, epochs=(1, 3, 9), top=5) -> list[dict]:
    """How a rung after `epochs` would rank the heads that trained to early stopping: the
    Spearman correlation of each head's best validation AUC by then with its final one, and
    where the `top` best finals stand in that ranking."""
    complete = [t for t in study.trials if t.state.name == "COMPLETE" and t.intermediate_values]
    if len(complete) <= top:
        return []
    final = pd.Series([t.value for t in complete])
    best_of_top = final.rank(ascending=False) <= top
    rows = []
    for epoch in epochs:
        by_then = pd.Series([max((v for step, v in t.intermediate_values.items() if step <= epoch),
                                 default=float("nan")) for t in complete])
        places = sorted(int(p) for p in by_then.rank(ascending=False)[best_of_top].dropna())
        rows.append({"stage": "search", "measure": f"rank after {epoch} epoch{'s' * (epoch > 1)} vs final",
                     "value": f"{by_then.corr(final, method='spearman'):.2f}",
                     "note": f"Spearman over K = 1's {len(complete)} complete trials; its {top} best "
                             f"finals stood {', '.join(map(str, places))} of {len(complete)} then"})
    return rows


def main(args) -> int:
    print_measured(lambda: run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
