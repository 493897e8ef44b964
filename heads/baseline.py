"""`python -m heads.baseline`: the baseline a user would otherwise reach for, scikit-learn's
LogisticRegression one-vs-rest on the same standardized features and splits, written as the
same kind of run directory (no head.pt) so the two tables compare line by line."""
from __future__ import annotations

import argparse
import datetime
import sys
import time
import warnings

from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

import cache
from heads.data import HeadsError, load_head_data
from heads.report import discard_partial, finish_out_dir, format_table, per_class_table, prepare_out_dir, write_run
from heads.cli import add_io_args
from heads.run import run_config


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m heads.baseline", add_help=add_help,
                                     description="scikit-learn logistic regression on the feature cache.")
    add_io_args(parser, out_help="run directory (default: outputs/runs/sklearn-<time>)")
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength (scikit-learn's default)")
    parser.add_argument("--max-iter", type=int, default=1000, help="lbfgs iterations per class")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def fit_logistic(train, *, C: float, max_iter: int):
    """(fitted classifier, seconds). class_weight="balanced" is the same per-class weighting
    as the heads' default."""
    classifier = OneVsRestClassifier(LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced"))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier.fit(train.features.float().cpu().numpy(), train.labels.cpu().numpy())
    return classifier, time.perf_counter() - start


def main(args) -> int:
    out = args.out or f"outputs/runs/sklearn-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    try:
        data = load_head_data(args.cache, device="cpu")
        partial = prepare_out_dir(out, overwrite=args.overwrite)
    except (cache.CacheError, HeadsError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        classifier, seconds = fit_logistic(data.train, C=args.C, max_iter=args.max_iter)
        settings = {"C": args.C, "max_iter": args.max_iter, "class_weight": "balanced", "seed": args.seed}
        config = run_config(cache_path=args.cache, data=data, settings=settings, device="cpu",
                            class_weights_used={"scheme": "sklearn class_weight='balanced' (same formula)"},
                            n_bootstrap=args.bootstrap, extra={"model": "sklearn LogisticRegression one-vs-rest"})
        metrics = write_run(
            partial, classes=data.classes, config=config, val=data.val,
            val_scores=classifier.predict_proba(data.val.features.float().numpy()), test=data.test,
            test_scores=classifier.predict_proba(data.test.features.float().numpy()), checkpoint=None,
            n_bootstrap=args.bootstrap, seed=args.seed,
            fit={"train_seconds": round(seconds, 3), "rows": {n: len(s) for n, s in data.splits.items()},
                 "rows_not_done": data.excluded},
        )
    except BaseException:
        discard_partial(partial)
        raise
    run_dir = finish_out_dir(partial, out)
    print(format_table(per_class_table(data.classes, metrics)))
    print(f"\nscikit-learn LogisticRegression trained in {seconds:.1f}s; "
          f"validation mean AUC {metrics['val']['mean_auc']:.4f}\nrun directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
