"""Head training at NIH scale (78,146 / 8,378 / 25,596 rows of 2048-d synthetic features):
the default head to early stop, seconds per epoch at depth 0 and depth 2, and scikit-learn's
LogisticRegression on the same features in the same run, with peak memory against the size
of the feature matrix.

    python -m benchmarks.bench_heads
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

from benchmarks.table import print_table
from cache.synthetic import NIH_SCALE, known_auc, write_synthetic_cache
from heads.baseline import fit_logistic
from heads.data import load_head_data
from heads.evaluate import auc_per_class, mean_auc
from heads.settings import DEFAULTS
from cache.runtime import resolve_device
from heads.fit import fit_head


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m benchmarks.bench_heads", add_help=add_help)
    parser.add_argument("--cache", default=None, help="reuse a cache (default: write a synthetic NIH-scale one)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of NIH-scale rows")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--skip-sklearn", action="store_true")
    return parser


def seconds_per_epoch(data, *, device, depth: int, epochs: int = 2) -> float:
    settings = {**DEFAULTS, "depth": depth, "max_epochs": epochs, "patience": epochs}
    return fit_head(train=data.train, val=data.val, settings=settings, device=device).seconds / epochs


def run(args) -> list[dict]:
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.cache or f"{tmp}/features.h5")
        if not args.cache:
            write_synthetic_cache(path, rows={k: int(v * args.scale) for k, v in NIH_SCALE.items()})
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        data = load_head_data(path, device=device)
        matrix_mib = sum(s.features.numel() * 4 for s in data.splits.values()) / 2**20
        fit = fit_head(train=data.train, val=data.val, settings=DEFAULTS, device=device)
        rows = [{"stage": "heads", "measure": "default head to early stop", "value": f"{fit.seconds:.1f} s",
                 "note": f"{device.type}; {len(fit.history)} epochs, val mean AUC {fit.best_val_auc:.4f} "
                         f"(best possible {known_auc(1.19):.3f}); {len(data.train)} train rows"}]
        for depth in (0, 2):
            rows.append({"stage": "heads", "measure": f"seconds per epoch, depth {depth}",
                         "value": f"{seconds_per_epoch(data, device=device, depth=depth):.2f} s",
                         "note": f"width {DEFAULTS['width']}, batch {DEFAULTS['batch_size']}"})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
        rows.append({"stage": "heads", "measure": "peak memory of training", "value": f"{peak:.0f} MiB",
                     "note": f"feature matrix {matrix_mib:.0f} MiB float32: {peak / matrix_mib:.2f}x"})
        if not args.skip_sklearn:
            classifier, seconds = fit_logistic(data.train, C=1.0, max_iter=1000)
            val_auc = mean_auc(auc_per_class(data.val.labels.cpu().numpy(),
                                             classifier.predict_proba(data.val.features.cpu().numpy())))
            rows.append({"stage": "heads", "measure": "scikit-learn LogisticRegression", "value": f"{seconds:.1f} s",
                         "note": f"val mean AUC {val_auc:.4f}; the default head is {seconds / fit.seconds:.2f}x faster"})
    return rows


def main(args) -> int:
    print_table(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
