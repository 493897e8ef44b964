"""`python -m search --trials N`: an Optuna study of head settings against validation mean AUC.

Each trial is a head of `heads.fit.fit_heads` with settings from `heads.settings.suggest`: the
same code, defaults and ranges as `python -m heads.train`. Trials run K per pass (see
search/passes.py). The study runs until it holds N finished (complete or pruned) trials,
however many workers share it and however often it is resumed. The best trial is then
retrained alone and scored once on test, as a full run directory.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import optuna
from tqdm import tqdm

import cache
from cache.flags import OneLineParser, Valid, number_type
from cache.outdir import check_open_dir, open_dir
from cache.runtime import DeviceUnavailable, resolve_device
from heads import settings as head_settings
from heads.cli import add_io_args, cache_paths
from heads.data import HeadsError, load_head_data
from heads.training import train_and_report
from search.liveness import Liveness
from search.passes import Halving, SearchContext, run_passes
from search.report import print_standing, print_summary, write_search_outputs
from search.storage import SearchError, is_shared, mask_text, mask_url, parse_url, sole_user, sqlite_file
from search.study import FINISHED, best_text, best_trial, count, fail_interrupted_trials, open_study, study_identity

# Trials per pass when --trials-per-pass is not given, by device, and the successive-halving
# schedule inside a pass (docs/performance.md: measured on a 2-core CPU with the benchmark's
# defaults against one trial at a time). A pass of 16 keeps its best 5 hidden-layer heads after
# its first rung and its best one after the second (linear heads are never cut): most epochs
# go to the heads that win. The first rung is set in
# train rows seen, one epoch of the quarter-NIH-scale cache it was measured on (19,536 rows),
# and at most one epoch: a larger cache cuts after the same amount of training, inside its
# first epoch. A GPU step is launch overhead that K heads share, hence more heads there (not
# yet measured on a GPU).
DEFAULT_PER_PASS = {"cpu": 16, "cuda": 32}
DEFAULT_FIRST_RUNG_ROWS, DEFAULT_ETA = 20_000, 3
DEFAULT_STALE_AFTER_S = 60.0
SEED_MAX = 2**32 - 1  # numpy's RandomState, behind Optuna's samplers, takes seeds up to here
SEED_TYPE = number_type(int, Valid(0, SEED_MAX))


def _study_name(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("the study name must not be empty")
    return text


def _storage_url(text):
    if not text.startswith("journal:") and parse_url(text) is None:
        raise argparse.ArgumentTypeError(f"{mask_url(text)} is not a storage URL: use e.g. "
                                         f"postgresql://user:password@host/db, sqlite:///path or journal:PATH")
    return text


def get_args_parser(add_help=True):
    parser = OneLineParser("python -m search", add_help=add_help,
                           description="Search head settings with Optuna against validation mean AUC.")
    parser.add_argument("--trials", type=number_type(int, Valid(1)), default=100,
                        help="run until the study holds this many finished (complete or pruned) trials (>= 1)")
    add_io_args(parser, out_help="search folder (default: outputs/search/<study-name>)", overwrite=False,
                multi_cache=True)
    parser.add_argument("--study-name", type=_study_name, default="cxr14-heads")
    parser.add_argument("--storage", type=_storage_url, default=None,
                        help="default: sqlite:///<out>/study.db; postgresql://user:pw@host/db or mysql://... "
                             "for workers on several machines; journal:PATH for processes on one machine")
    parser.add_argument("--trials-per-pass", type=number_type(int, Valid(1)), default=None,
                        help="K trials asked at once and trained together on one stream of minibatches; 1 trains "
                             f"one at a time (default: {DEFAULT_PER_PASS['cpu']} on CPU, "
                             f"{DEFAULT_PER_PASS['cuda']} on CUDA)")
    parser.add_argument("--halving-first-rung", type=number_type(float, Valid(0, low_open=True)), default=None,
                        metavar="EPOCHS",
                        help="successive halving inside a pass: every head trains this many epochs (a fraction stops "
                             "inside an epoch), then the best 1/eta go on (> 0; default: the epochs of "
                             f"{DEFAULT_FIRST_RUNG_ROWS:,} train rows, at most 1)")
    parser.add_argument("--halving-eta", type=number_type(int, Valid(1)), default=DEFAULT_ETA,
                        help="at each rung (first rung x eta^i epochs) a pass keeps its best 1/eta heads by "
                             f"validation AUC; 1 turns halving off (>= 1; default: {DEFAULT_ETA})")
    parser.add_argument("--n-jobs", type=number_type(int, Valid(1)), default=1,
                        help="threads of this process: a pass asks K x n-jobs trials and the threads share their "
                             "training, each with its own heads (>= 1)")
    parser.add_argument("--timeout", type=number_type(float, Valid(0, low_open=True)), default=None,
                        help="seconds after which no new pass starts (> 0; default: none)")
    parser.add_argument("--stale-after", type=number_type(float, Valid(6)), default=DEFAULT_STALE_AFTER_S,
                        help="seconds without a heartbeat (database storages), or unclaimed after it started "
                             "(any shared storage), after which a running trial counts as its dead worker's and "
                             "is failed, so the study still reaches N (>= 6)")
    parser.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"],
                        help="stop unpromising trials early from their per-epoch validation AUC (besides the halving "
                             "inside a pass: --halving-eta 1 turns that off)")
    parser.add_argument("--sampler-seed", type=SEED_TYPE, default=0,
                        help=f"seed of the TPE sampler, 0 to {SEED_MAX}; it uses this plus --worker-index")
    parser.add_argument("--worker-index", type=SEED_TYPE, default=0,
                        help="this worker's number among processes sharing one study (0, 1, 2, ...): each "
                             "needs its own, or they propose the same settings (default 0)")
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


def run_search(args) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar and summary say it all
    seed = sampler_seed(args)
    out = Path(args.out or f"outputs/search/{args.study_name}")
    check_open_dir(out, kind="search")
    for path in cache_paths(args):  # a missing or damaged cache is refused before the folder is made
        cache.check_readable(path)
    url = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if _study_file_inside(url, out):
        open_dir(out, kind="search")  # the study file, and so its lock, live in the folder
    with sole_user(url):  # a SQLite study is one process's: a second one is refused here, before any work
        if not is_shared(url):  # a shared study is opened first, so that an unreachable
            open_dir(out, kind="search")  # database leaves no empty folder
        return search_and_report(args, out=out, url=url, seed=seed)


def _study_file_inside(url: str, out: Path) -> bool:
    """True when the SQLite file of `url` lies in `out` (the default study.db, or one named there)."""
    path = sqlite_file(url)
    return path is not None and Path(os.path.realpath(path)).is_relative_to(os.path.realpath(out))


def sampler_seed(args) -> int:
    """The TPE sampler's seed: --sampler-seed plus --worker-index, so that workers sharing a
    study (each given its own index) propose different settings, and one process, on any
    storage, is reproducible from the seed recorded in config.json."""
    seed = args.sampler_seed + args.worker_index
    if seed > SEED_MAX:
        raise SearchError(f"--sampler-seed {args.sampler_seed} plus --worker-index {args.worker_index} is {seed}, "
                          f"above {SEED_MAX}, the largest seed the sampler takes: lower one of them")
    return seed


def search_and_report(args, *, out: Path, url: str, seed: int) -> int:
    device = resolve_device(args.device)
    paths = cache_paths(args)
    data = load_head_data(paths, device=device)  # each cache read once; trials select their blocks
    sets = feature_sets(paths, data)
    fixed = head_settings.settings_from_args(args)
    space = {**head_settings.search_space(), **({"features": ["choice", list(sets)]} if sets else {})}
    per_pass = args.trials_per_pass or DEFAULT_PER_PASS[device.type]
    study = open_study(url, study_name=args.study_name, pruner=args.pruner, sampler_seed=seed,
                       max_epochs=fixed["max_epochs"], stale_after=args.stale_after,
                       identity=study_identity(data=data, fingerprints=data.fingerprints, fixed=fixed, space=space))
    if is_shared(url):
        open_dir(out, kind="search")
    else:  # held by this process alone (sole_user): a RUNNING trial is a killed run's
        fail_interrupted_trials(study)
    halving = halving_schedule(args, train_rows=len(data.train))
    start = time.perf_counter()
    ran = run_with_progress(study, args=args, data=data, fixed=fixed, device=device, url=url, per_pass=per_pass,
                            sets=sets, halving=halving)
    seconds = time.perf_counter() - start
    best = best_trial(study)
    search_config = {"study": args.study_name, "storage": mask_url(url), "trials": args.trials,
                     "trials_per_pass": per_pass, "n_jobs": args.n_jobs, "pruner": args.pruner,
                     "halving": {"first_rung": halving.first_rung, "eta": halving.eta,
                                 **({} if args.halving_first_rung else {"first_rung_rows": DEFAULT_FIRST_RUNG_ROWS})},
                     "sampler": "TPE, constant liar", "sampler_seed": seed, "worker_index": args.worker_index,
                     "fixed": fixed, "search_space": space, "cache": [str(p) for p in paths], "feature_sets": sets}
    run_dir, metrics, settings, best_data = retrain_best(best, args=args, out=out, data=data, fixed=fixed,
                                                         device=device, sets=sets, search_config=search_config)
    write_search_outputs(out, study=study, best=best, settings=settings, metrics=metrics, config=search_config)
    print_summary(study, out=out, url=url, ran=ran, seconds=seconds, best=best, metrics=metrics, run_dir=run_dir,
                  data=best_data)
    print_standing(out, run_dir)
    return 0


def halving_schedule(args, *, train_rows: int) -> Halving:
    """--halving-first-rung as given (epochs), else DEFAULT_FIRST_RUNG_ROWS rows seen."""
    if args.halving_first_rung:
        first = args.halving_first_rung
        return Halving(first_rung=int(first) if first == int(first) else first, eta=args.halving_eta)
    return Halving.for_rows(DEFAULT_FIRST_RUNG_ROWS, train_rows=train_rows, eta=args.halving_eta)


def feature_sets(paths: list, data) -> dict:
    """With several caches, the feature set is searched: each cache alone and all of them side by
    side, named by file stem (by path where stems repeat). Empty for one cache."""
    if len(paths) < 2:
        return {}
    blocks = list(data.blocks)
    stems = [Path(p).stem for p in paths]
    labels = stems if len(set(stems)) == len(stems) else [str(p) for p in paths]
    sets = {label: [block] for label, block in zip(labels, blocks)}
    sets["+".join(labels)] = blocks
    return sets


def retrain_best(best, *, args, out, data, fixed, device, sets, search_config):
    """The best trial retrained alone on its feature set and scored once on test, as best_run/."""
    settings = {**fixed, **best.params}
    chosen = settings.pop("features", None)
    best_data = data.select(sets[chosen]) if chosen else data
    chosen_paths = [p for p in cache_paths(args) if not chosen or str(p) in sets[chosen]]
    run_dir, metrics = train_and_report(
        cache_path=chosen_paths, settings=settings, out=out / "best_run", device=device, overwrite=True,
        n_bootstrap=args.bootstrap, data=best_data, quiet=True, name=args.study_name,
        extra_config={"search": {**search_config, "trial": best.number, "study_val_mean_auc": best.value,
                                 "features": chosen}},
    )
    return run_dir, metrics, {**settings, **({"features": chosen} if chosen else {})}, best_data


def run_with_progress(study, *, args, data, fixed, device, url, per_pass, sets, halving) -> int:
    """run_passes with a progress bar; returns how many trials this process finished."""
    progress = tqdm(total=args.trials, initial=min(count(study, FINISHED), args.trials), unit="trial", desc="search",
                    dynamic_ncols=True)

    def on_pass():
        progress.n = min(count(study, FINISHED), args.trials)
        progress.set_postfix_str(best_text(study))
        progress.refresh()
    liveness = Liveness(url, stale_after=args.stale_after)
    try:
        run = SearchContext(study=study, data=data, fixed=fixed, device=device, target=args.trials,
                            liveness=liveness, feature_sets=sets, halving=halving)
        return run_passes(run, per_pass=per_pass, n_jobs=args.n_jobs, on_pass=on_pass,
                          deadline=None if args.timeout is None else time.time() + args.timeout)
    finally:
        liveness.close()
        progress.close()
