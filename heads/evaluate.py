"""`python -m heads.evaluate RUN_DIR --cache OTHER.h5`: score a trained run on another cache of
the same encoder recipe (another dataset, or another cache of the same one), on the classes the
two share through the label vocabulary, and write an evaluation folder that heads.compare reads
like a run's test results (files: heads/external.py).

    python -m heads.evaluate outputs/runs/resnet50-nih --cache outputs/cache/resnet50-chexpert.h5
    python -m heads.compare outputs/eval/resnet50-on-chexpert outputs/eval/rad-dino-on-chexpert

--split test (the default) reads the target's test rows only; --split all every done row (the
target's train and val rows too: fine for a dataset the run never saw, never for its own cache).
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

import cache
from cache.flags import OneLineParser, number_type
from cache.outdir import OutDirError, check_out_dir, discard_partial, finish_out_dir, prepare_out_dir
from heads.cli import BOOTSTRAP_VALID, add_operating_args, check_subgroup_request
from heads.data import HeadsError, is_official_nih_test
from heads.expert import expert_reference, load_google2019
from heads.external import (SPLIT_CHOICES, ExternalError, check_same_recipe, check_split, check_target,
                            check_unseen_patients, dataset_of, evaluate, format_evaluation, read_source_run,
                            read_target, write_evaluation)
from heads.predict import say_warnings
from heads.report import write_json

KIND = "evaluation"


def get_args_parser(add_help=True):
    parser = OneLineParser("python -m heads.evaluate", add_help=add_help,
                           description="Score a trained run on another cache of the same encoder recipe.")
    parser.add_argument("run", metavar="RUN_DIR", help="a run directory written by heads.train or search")
    parser.add_argument("--cache", required=True, help="the cache to score the run on (same encoder recipe)")
    parser.add_argument("--split", default="test", choices=SPLIT_CHOICES,
                        help="the target rows scored: its test split (default), or all its done rows")
    parser.add_argument("--out", default=None, help="evaluation folder (default: outputs/evaluations/<run>-on-<cache>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    parser.add_argument("--bootstrap", type=number_type(int, BOOTSTRAP_VALID), default=1000,
                        help=f"patient resamples for the CIs (default: 1000; allowed {BOOTSTRAP_VALID.describe()})")
    parser.add_argument("--labels", default="cache", choices=("cache", "google2019"),
                        help="score against the cache's labels (default), or, on an NIH cache, also against "
                             "Google's expert labels of its official test images (docs/expert.md)")
    parser.add_argument("--labels-csv", default=None, metavar="FILE",
                        help="the google2019 labels file (default: the copy torchxrayvision ships)")
    add_operating_args(parser)
    return parser


def check_request(args, attrs: dict) -> None:
    """What --by and --labels need of the target cache, refused before any row is read."""
    if args.labels_csv and args.labels != "google2019":
        raise ExternalError("--labels-csv names the google2019 file: give it with --labels google2019")
    if args.labels == "google2019" and (dataset_of(attrs) != "nih" or args.split != "test"):
        raise ExternalError(f"--labels google2019 scores NIH's official test images: give an NIH cache "
                            f"({args.cache} is {dataset_of(attrs)}) and --split test")
    check_subgroup_request(cache.read_metadata(args.cache), args.by, where=args.cache)


def expert_figures(evaluation, experts, args):
    """The run's AUC against the expert labels beside its AUC against the NLP labels, on the
    official test images both the file and the cache hold."""
    table = cache.read_table(args.cache)
    return expert_reference(
        experts, image_ids=evaluation.target.image_ids, patient_ids=evaluation.target.patient_ids, splits="test",
        classes=evaluation.classes, scores=evaluation.scores, nlp_labels=evaluation.labels,
        cache_test_is_official=is_official_nih_test(table["image_id"][table["split"] == "test"]),
        n_resamples=args.bootstrap)


def write_expert_reference(partial: Path, reference) -> None:
    """expert.md, expert.json and expert_rows.csv (every expert AUC recomputes from the rows)."""
    (partial / "expert.md").write_text(reference.markdown(), encoding="utf-8")
    write_json(partial / "expert.json", reference.to_dict())
    reference.rows.to_csv(partial / "expert_rows.csv", index=False, float_format="%.9g")


def main(args) -> int:
    out = Path(args.out or f"outputs/evaluations/{Path(args.run).resolve().name}-on-{Path(args.cache).stem}-"
                           f"{datetime.datetime.now():%Y%m%d-%H%M%S}")
    try:
        check_out_dir(out, kind=KIND, overwrite=args.overwrite)  # before any work
        run = read_source_run(args.run)
        attrs = check_target(args.cache)
        check_same_recipe(run, attrs, args.cache)
        check_split(run, attrs, split=args.split)
        check_request(args, attrs)
        experts = load_google2019(args.labels_csv) if args.labels == "google2019" else None
        target = read_target(args.cache, split=args.split)
        check_unseen_patients(run, target)
        evaluation = evaluate(run, target, n_bootstrap=args.bootstrap)
        reference = None if experts is None else expert_figures(evaluation, experts, args)
        partial = prepare_out_dir(out, kind=KIND, overwrite=args.overwrite)
    except (ExternalError, HeadsError, cache.CacheError, OutDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    say_warnings(run.config, [run.recipe], notes=[])  # random encoder weights, classes the run never learned
    try:
        write_evaluation(partial, evaluation, by=args.by, sensitivity=args.sensitivity, n_bootstrap=args.bootstrap)
        if reference is not None:
            write_expert_reference(partial, reference)
        finish_out_dir(partial, out, kind=KIND)
    except OutDirError as err:  # --out changed while the evaluation was written: the work is kept in partial
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        discard_partial(partial, kind=KIND)
        raise
    print(format_evaluation(evaluation))
    if reference is not None:
        print(f"\nagainst Google's expert labels ({reference.labels_file}), official NIH test images only:\n")
        print(reference.markdown())
    print(f"evaluation: {out} (metrics.json, predictions_test.csv, roc_curves.png; heads.compare reads it as a run)")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
