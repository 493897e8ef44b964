"""`python -m search --trials N`: an Optuna study of head settings against validation mean AUC.

Each trial is `heads.fit.fit_head` with settings from `heads.settings.suggest`: the same
code, defaults and ranges as `python -m heads.train`. The study runs until it holds N finished
(complete or pruned) trials, however many workers share it and however often it is resumed.
The best trial is then retrained and scored once on test, as a full run directory.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

import cache
from heads import settings as head_settings
from heads.data import HeadsError, load_head_data
from cache.runtime import DeviceUnavailable, resolve_device
from heads.cli import add_io_args
from heads.fit import fit_head
from heads.run import print_summary as print_run_summary
from heads.run import train_and_report
from search.report import write_search_outputs
from search.storage import SearchError, is_shared, mask_text, mask_url, open_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
POLL_S = 2.0  # how often a worker waiting for others' last trials looks again


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m search", add_help=add_help,
                                     description="Search head settings with Optuna against validation mean AUC.")
    parser.add_argument("--trials", type=int, default=100,
                        help="run until the study holds this many finished (complete or pruned) trials")
    add_io_args(parser, out_help="search folder (default: outputs/search/<study-name>)", overwrite=False)
    parser.add_argument("--study-name", default="cxr14-heads")
    parser.add_argument("--storage", default=None,
                        help="default: sqlite:///<out>/study.db; postgresql://user:pw@host/db or mysql://... "
                             "for workers on several machines; journal:PATH for processes on one machine")
    parser.add_argument("--n-jobs", type=int, default=1, help="trials run in parallel threads of this process")
    parser.add_argument("--timeout", type=float, default=None, help="start no new trial after this many seconds")
    parser.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"],
                        help="stop unpromising trials early from their per-epoch validation AUC")
    parser.add_argument("--sampler-seed", type=int, default=0, help="seed of the TPE sampler")
    head_settings.add_setting_args(parser, searched=False)
    return parser


def main(args) -> int:
    try:
        return run_search(args)
    except (cache.CacheError, HeadsError, SearchError, DeviceUnavailable) as err:
        print(f"error: {mask_text(str(err), args.storage or '')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are kept in the study; rerun the same command to resume",
              file=sys.stderr)
        return 130


def run_search(args) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and summary say it all
    out = Path(args.out or f"outputs/search/{args.study_name}")
    out.mkdir(parents=True, exist_ok=True)
    url = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    device = resolve_device(args.device)
    data = load_head_data(args.cache, device=device)
    fixed = head_settings.settings_from_args(args)
    # The embedded SQLite study has one owner; shared storages coordinate through the database.
    owner = cache.exclusive_lock(out / "study.db", purpose="search") if not is_shared(url) else contextlib.nullcontext()
    with owner:
        study = open_study(url, args=args, fingerprint=data.attrs["fingerprint"], fixed=fixed)
        if not is_shared(url):
            fail_interrupted_trials(study)
        start = time.perf_counter()
        ran = run_workers(study, data=data, fixed=fixed, device=device, target=args.trials, n_jobs=args.n_jobs,
                          deadline=None if args.timeout is None else time.time() + args.timeout,
                          wait_for_others=not url.startswith("journal:"))
        seconds = time.perf_counter() - start
    best = best_trial(study)
    settings = {**fixed, **best.params}
    run_dir, metrics = train_and_report(
        cache_path=args.cache, settings=settings, out=out / "best_run", device=device, overwrite=True,
        n_bootstrap=args.bootstrap, data=data, quiet=True,
        extra_config={"search": {"study": args.study_name, "storage": mask_url(url), "trial": best.number,
                                 "study_val_mean_auc": best.value}},
    )
    write_search_outputs(out, study=study, best=best, settings=settings, metrics=metrics,
                         config={"study": args.study_name, "storage": mask_url(url), "trials": args.trials,
                                 "pruner": args.pruner, "sampler_seed": args.sampler_seed, "fixed": fixed,
                                 "search_space": head_settings.search_space(), "cache": str(args.cache)})
    print_summary(study, out=out, url=url, ran=ran, seconds=seconds, best=best, metrics=metrics, run_dir=run_dir,
                  data=data)
    return 0


def open_study(url: str, *, args, fingerprint: str, fixed: dict) -> optuna.Study:
    """Create the study, or resume it after checking it searches the same thing on the same cache."""
    storage = open_storage(url)
    # Workers sharing a database each need their own sampler stream, or their first random
    # trials would propose identical settings.
    seed = args.sampler_seed if not is_shared(url) else args.sampler_seed + threading.get_native_id()
    try:
        study = optuna.create_study(study_name=args.study_name, storage=storage, direction="maximize",
                                    sampler=optuna.samplers.TPESampler(seed=seed),
                                    pruner=make_pruner(args.pruner, max_epochs=fixed["max_epochs"]),
                                    load_if_exists=True)
    except Exception as err:  # storage backends raise many types
        raise SearchError(f"cannot open study {args.study_name!r} in {mask_url(url)}: {mask_text(str(err), url)}") from None
    identity = {"cache_fingerprint": fingerprint, "search_space": head_settings.search_space(), "fixed_settings": fixed}
    stored = study.user_attrs
    for key, value in identity.items():
        if key not in stored:
            study.set_user_attr(key, value)
        elif json.dumps(stored[key], sort_keys=True) != json.dumps(value, sort_keys=True):
            raise SearchError(f"study {args.study_name!r} in {mask_url(url)} was made with another {key} "
                              f"({stored[key]} vs now {value}); refusing to mix trials: use another "
                              f"--study-name or --out")
    return study


def make_pruner(name: str, *, max_epochs: int):
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=max_epochs)
    return optuna.pruners.NopPruner()


def fail_interrupted_trials(study: optuna.Study) -> None:
    """Trials left RUNNING in a study only this process can own were cut off by a kill."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "interrupted (process killed)")
        study.tell(trial.number, state=TrialState.FAIL)


class SurplusTrial(Exception):
    """The study already held enough trials when this one was created (a race between workers)."""


def run_workers(study, *, data, fixed, device, target, n_jobs, deadline, wait_for_others) -> int:
    """Run trials in `n_jobs` threads until the study holds `target` finished ones; returns how
    many trials this process finished."""
    finished_before = count(study, FINISHED)
    progress = tqdm(total=target, initial=min(finished_before, target), unit="trial", desc="search", dynamic_ncols=True)
    counter = {"ran": 0}
    lock = threading.Lock()

    def objective(trial):
        if not admitted(study, trial, target):
            raise SurplusTrial(f"the study already held {target} trials")
        settings = head_settings.suggest(trial, base=fixed)

        def report(epoch, val_auc):
            trial.report(val_auc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (validation mean AUC {val_auc:.4f})")
        try:
            return fit_head(train=data.train, val=data.val, settings=settings, device=device, on_epoch=report).best_val_auc
        except (HeadsError, RuntimeError, MemoryError) as err:  # NaN loss, out of memory
            trial.set_user_attr("fail_reason", str(err)[:500])
            raise

    def worker():
        while deadline is None or time.time() < deadline:
            finished, running = count(study, FINISHED), count(study, (TrialState.RUNNING,))
            if finished >= target:
                return
            if finished + running >= target:
                if not wait_for_others:
                    return
                time.sleep(POLL_S)  # another worker's trial may still fail and need replacing
                continue
            study.optimize(objective, n_trials=1, catch=(HeadsError, RuntimeError, MemoryError, SurplusTrial))
            with lock:
                counter["ran"] += 1
                progress.n = min(count(study, FINISHED), target)
                progress.set_postfix_str(_best_text(study))
                progress.refresh()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, n_jobs) - 1)]
    for thread in threads:
        thread.start()
    try:
        worker()
    finally:
        for thread in threads:
            thread.join()
        progress.close()
    return count(study, FINISHED) - finished_before


def count(study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def admitted(study, trial, target: int) -> bool:
    """Trial numbers are unique and in creation order in every Optuna storage, so counting the
    not-failed trials created before this one decides, without a race, whether it is among
    the first `target` of the study."""
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and t.state != TrialState.FAIL]
    return len(earlier) < target


def best_trial(study) -> optuna.trial.FrozenTrial:
    try:
        return study.best_trial
    except ValueError:
        raise SearchError(f"study {study.study_name!r} has no completed trial yet (all failed or pruned); "
                          f"see trials.csv for the reasons, then rerun") from None


def _best_text(study) -> str:
    try:
        return f"best val AUC {study.best_value:.4f}"
    except ValueError:
        return ""


def print_summary(study, *, out, url, ran, seconds, best, metrics, run_dir, data) -> None:
    states = {state.name.lower(): count(study, (state,)) for state in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                       TrialState.FAIL)}
    print(f"\nstudy {study.study_name!r}: {states['complete']} complete, {states['pruned']} pruned, "
          f"{states['fail']} failed ({ran} finished by this process in {seconds:.1f}s)")
    print(f"best trial #{best.number}: validation mean AUC {best.value:.4f} with {best.params}")
    print("retrained and scored once on test:\n")
    print_run_summary(run_dir, data=data, metrics=metrics)
    print(f"search folder: {out} (trials.csv, best_params.json, optimization_history.png, param_importances.png)")
    print(f"study storage: {mask_url(url)}   browse it: optuna-dashboard {mask_url(url)}")
