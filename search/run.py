"""`python -m search --trials N`: an Optuna study of head settings against validation mean AUC.

Each trial is a head of `heads.fit.fit_heads` with settings from `heads.settings.suggest`: the
same code, defaults and ranges as `python -m heads.train`. Trials run K per pass (see
search/passes.py). The study runs until it holds N finished (complete or pruned) trials,
however many workers share it and however often it is resumed. The best trial is then
retrained alone and scored once on test, as a full run directory.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import traceback
from pathlib import Path

import optuna
from tqdm import tqdm

import cache
from cache.runtime import DeviceUnavailable, resolve_device
from heads import settings as head_settings
from heads.cli import add_io_args
from heads.data import HeadsError, load_head_data
from heads.run import train_and_report
from search import outdir
from search.liveness import Liveness
from search.passes import Pass, run_passes
from search.report import print_summary, write_search_outputs
from search.storage import SearchError, is_shared, mask_text, mask_url
from search.study import FINISHED, best_text, best_trial, count, fail_interrupted_trials, open_study, study_identity

# Trials per pass when --trials-per-pass is not given, by device (measured: README, performance).
DEFAULT_PER_PASS = {"cpu": 8, "cuda": 32}
DEFAULT_STALE_AFTER_S = 60.0


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit 2, before any work (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, *, low, high=math.inf, low_open=False, what="a number"):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high != math.inf else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {what} {bound}")
        return value
    return parse


def _study_name(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("the study name must not be empty")
    return text


def get_args_parser(add_help=True):
    parser = OneLineParser("python -m search", add_help=add_help,
                           description="Search head settings with Optuna against validation mean AUC.")
    parser.add_argument("--trials", type=_number(int, low=1, what="a whole number"), default=100,
                        help="run until the study holds this many finished (complete or pruned) trials (>= 1)")
    add_io_args(parser, out_help="search folder (default: outputs/search/<study-name>)", overwrite=False)
    parser.add_argument("--study-name", type=_study_name, default="cxr14-heads")
    parser.add_argument("--storage", default=None,
                        help="default: sqlite:///<out>/study.db; postgresql://user:pw@host/db or mysql://... "
                             "for workers on several machines; journal:PATH for processes on one machine")
    parser.add_argument("--trials-per-pass", type=_number(int, low=1, what="a whole number"), default=None,
                        help="K trials asked at once and trained together on one stream of minibatches; 1 trains "
                             f"one at a time (default: {DEFAULT_PER_PASS['cpu']} on CPU, "
                             f"{DEFAULT_PER_PASS['cuda']} on CUDA)")
    parser.add_argument("--n-jobs", type=_number(int, low=1, what="a whole number"), default=1,
                        help="threads of this process that share the training of each pass (>= 1)")
    parser.add_argument("--timeout", type=_number(float, low=0, low_open=True), default=None,
                        help="seconds after which no new pass starts (> 0; default: none)")
    parser.add_argument("--stale-after", type=_number(float, low=6), default=DEFAULT_STALE_AFTER_S,
                        help="seconds without a heartbeat (database storages) after which a worker's running "
                             "trial counts as dead and is failed, so the study still reaches N (>= 6)")
    parser.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"],
                        help="stop unpromising trials early from their per-epoch validation AUC")
    parser.add_argument("--sampler-seed", type=_number(int, low=0, what="a whole number"), default=0,
                        help="seed of the TPE sampler (>= 0)")
    head_settings.add_setting_args(parser, searched=False)
    return parser


def main(args) -> int:
    try:
        return run_search(args)
    except (cache.CacheError, HeadsError, SearchError, DeviceUnavailable, FileExistsError, NotADirectoryError) as err:
        print(f"error: {mask_text(str(err), args.storage)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are kept in the study; rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception:  # a bug: show where, but never the storage's password
        print(mask_text(traceback.format_exc(), args.storage), file=sys.stderr, end="")
        return 1


def cache_paths(args) -> list:
    return list(args.cache) if isinstance(args.cache, (list, tuple)) else [args.cache]


def run_search(args) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and summary say it all
    out = outdir.prepare_search_dir(Path(args.out or f"outputs/search/{args.study_name}"))
    url = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    device = resolve_device(args.device)
    data = load_head_data(args.cache, device=device)
    check_val_scorable(data)
    fixed = head_settings.settings_from_args(args)
    per_pass = args.trials_per_pass or DEFAULT_PER_PASS[device.type]
    # The embedded SQLite study has one owner; shared storages coordinate through the database.
    owner = cache.exclusive_lock(out / "study.db", purpose="search") if not is_shared(url) else contextlib.nullcontext()
    with owner:
        study = open_study(url, study_name=args.study_name, pruner=args.pruner, sampler_seed=args.sampler_seed,
                           max_epochs=fixed["max_epochs"], stale_after=args.stale_after,
                           identity=study_identity(data=data, fingerprints=[data.attrs["fingerprint"]], fixed=fixed,
                                                   space=head_settings.search_space()))
        if not is_shared(url):
            fail_interrupted_trials(study)
        start = time.perf_counter()
        ran = run_with_progress(study, args=args, data=data, fixed=fixed, device=device, url=url, per_pass=per_pass)
        seconds = time.perf_counter() - start
    best = best_trial(study)
    settings = {**fixed, **best.params}
    search_config = {"study": args.study_name, "storage": mask_url(url), "trials": args.trials,
                     "trials_per_pass": per_pass, "n_jobs": args.n_jobs, "pruner": args.pruner,
                     "sampler": "TPE, constant liar", "sampler_seed": args.sampler_seed, "fixed": fixed,
                     "search_space": head_settings.search_space(), "cache": [str(p) for p in cache_paths(args)]}
    run_dir, metrics = train_and_report(
        cache_path=args.cache, settings=settings, out=out / "best_run", device=device, overwrite=True,
        n_bootstrap=args.bootstrap, data=data, quiet=True,
        extra_config={"search": {**search_config, "trial": best.number, "study_val_mean_auc": best.value}},
    )
    write_search_outputs(out, study=study, best=best, settings=settings, metrics=metrics, config=search_config)
    print_summary(study, out=out, url=url, ran=ran, seconds=seconds, best=best, metrics=metrics, run_dir=run_dir,
                  data=data)
    return 0


def check_val_scorable(data) -> None:
    """A class scores only where val holds both label values; with none, every trial would fail."""
    labels = data.val.labels
    scorable = ((labels.min(dim=0).values == 0) & (labels.max(dim=0).values == 1)).sum()
    if int(scorable) == 0:
        raise SearchError(f"the val split ({len(data.val)} rows) has no class with both positive and negative "
                          f"labels, so no trial can be scored; extract more val rows or use a larger "
                          f"--val-fraction when extracting")


def run_with_progress(study, *, args, data, fixed, device, url, per_pass) -> int:
    """run_passes with a progress bar; returns how many trials this process finished."""
    progress = tqdm(total=args.trials, initial=min(count(study, FINISHED), args.trials), unit="trial", desc="search",
                    dynamic_ncols=True)

    def on_pass():
        progress.n = min(count(study, FINISHED), args.trials)
        progress.set_postfix_str(best_text(study))
        progress.refresh()
    liveness = Liveness(url)
    try:
        run = Pass(study=study, data=data, fixed=fixed, device=device, target=args.trials, liveness=liveness)
        return run_passes(run, per_pass=per_pass, n_jobs=args.n_jobs, on_pass=on_pass,
                          deadline=None if args.timeout is None else time.time() + args.timeout)
    finally:
        liveness.close()
        progress.close()
