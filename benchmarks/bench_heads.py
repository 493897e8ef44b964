"""Head training, measured in one run so that every figure is a ratio against a baseline
timed beside it:

1. NIH scale (78,146 / 8,378 / 25,596 rows of 2048-d synthetic features): the default head to
   early stop, seconds per epoch at depth 0 and depth 2, and the whole `heads.train` process's
   peak RSS (wait4) against the float16 feature matrix and against a process that only
   imports it.
2. CNN-like features (40,000 rows x 2048: non-negative, correlated, ReLU-pooled-like, unevenly
   scaled, as a real backbone's pooled output; not well-conditioned Gaussians): the whole
   `heads.train --depth 0` process against scikit-learn's LogisticRegression fit alone on the
   same standardized features, their validation AUCs, and float16 against float32 features.
3. K heads in one pass against the same K heads trained one at a time.
4. bf16 autocast against fp32 for the same heads on a small cache: the validation AUC gap and the
   time ratio (native bf16 units where /proc/cpuinfo names them, emulated and slower elsewhere).

    python -m benchmarks.bench_heads                 # everything (tens of minutes on 2 CPU cores)
    python -m benchmarks.bench_heads --scale 0.02    # a quick check that it runs
    python -m benchmarks.bench_heads --only-precision  # part 4 alone
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

import numpy as np

from benchmarks.table import print_table
from cache.runtime import cpu_has_native_bf16, resolve_device
from cache.schema import CLASSES
from cache.store import PartWriter, create_cache, exclusive_lock, merge_parts, read_attrs
from cache.synthetic import NIH_SCALE, known_auc, write_synthetic_cache
from heads.data import load_head_data
from heads.estimator import LogisticBaseline
from heads.metrics import auc_per_class, mean_auc
from heads.fit import fit_head, fit_heads
from heads.settings import DEFAULTS

CNN_ROWS = {"train": 28_000, "val": 4_000, "test": 8_000}  # 40,000 rows, as in the figure to beat
REPO = Path(__file__).resolve().parents[1]


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m benchmarks.bench_heads", add_help=add_help)
    parser.add_argument("--cache", default=None, help="reuse a cache for part 1 (default: a synthetic NIH-scale one)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the row counts")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--skip-sklearn", action="store_true", help="leave out parts 2 and 3")
    parser.add_argument("--heads", type=int, default=8, help="K for part 3")
    parser.add_argument("--cnn-rows", type=float, default=1.0, help="fraction of the 40,000 CNN-like rows")
    parser.add_argument("--deep-epochs", type=int, default=15, help="epoch cap of the depth-2 rows of part 2")
    parser.add_argument("--skip-extras", action="store_true", help="part 2 without the float16 and K-head rows")
    parser.add_argument("--only-precision", action="store_true", help="part 4 alone")
    parser.add_argument("--precision-scale", type=float, default=0.05,
                        help="fraction of NIH-scale rows of part 4's cache (emulated bf16 is slow)")
    parser.add_argument("--skip-epochs", action="store_true",
                        help="part 1 measures only the heads.train process (no in-process timings)")
    return parser


def write_cnn_like_cache(path, *, rows: dict, dim: int = 2048, seed: int = 0, prevalence: float = 0.08,
                         latent: int = 96, block_rows: int = 8192) -> None:
    """Features shaped like a CNN's global-average-pooled ReLU output: a low-rank shared
    component (features correlate), a weak class signal spread over many features, ReLU then
    pooled over 8 "positions" (non-negative, skewed, many near-zero), and per-feature scales
    spanning two orders of magnitude (badly conditioned for an unscaled solver)."""
    rng = np.random.default_rng(seed)
    n_rows, n_classes = sum(rows.values()), len(CLASSES)
    split = np.concatenate([np.full(n, name, dtype=object) for name, n in rows.items()])
    first_patient = np.cumsum([0] + [n // 3 + 1 for n in rows.values()])[:-1]
    patient = np.concatenate([start + np.arange(n) // 3 for start, n in zip(first_patient, rows.values())])
    labels = (rng.random((n_rows, n_classes)) < prevalence).astype(np.uint8)
    mixing = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    signal = (rng.standard_normal((n_classes, dim)) * (rng.random((n_classes, dim)) < 0.05)).astype(np.float32) * 0.15
    scale = np.exp(rng.uniform(np.log(0.05), np.log(5.0), dim)).astype(np.float32)
    table = {"image_id": [f"{i:08d}_000.png" for i in range(n_rows)], "patient_id": patient, "labels": labels,
             "split": split}
    attrs = {"classes": list(CLASSES), "backbone": "synthetic-cnn-like", "weights": f"latent={latent}",
             "weights_sha256": "", "image_size": 0, "precision": "fp32", "preprocessing": {"none": True},
             "val_fraction": 0.0, "split_seed": seed, "split_source": "synthetic", "source_csv": "",
             "source_csv_sha256": "", "split_lists_sha256": ""}
    create_cache(path, table=table, feature_dim=dim, feature_dtype="float16", attrs=attrs)
    writer = PartWriter(path, fingerprint=read_attrs(path)["fingerprint"])
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        shared = rng.standard_normal((stop - start, latent), dtype=np.float32) @ mixing
        centre = shared + labels[start:stop].astype(np.float32) @ signal
        pooled = np.zeros_like(centre)
        for _ in range(8):  # 8 spatial positions, each its own noise, ReLU, then averaged
            pooled += np.maximum(centre + rng.standard_normal(centre.shape, dtype=np.float32), 0)
        writer.write(rows=np.arange(start, stop), features=(pooled / 8 * scale).astype(np.float16))
    with exclusive_lock(path):
        merge_parts(path)


# A child's ru_maxrss counts the pages it shared with its parent before exec, so this
# benchmark (which holds torch and data) cannot fork the measured process itself: a small
# Python in between starts it and reports its wait4 rusage.
_WAIT4 = """
import os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss)
"""


def measure_process(args: list) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `python ...args` as a whole process (wait4's rusage)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _WAIT4, sys.executable, *map(str, args)], env=env,
                            capture_output=True, text=True)
    code, seconds, peak_kib = result.stdout.split()[-3:]
    if int(code) != 0:
        raise RuntimeError(f"{args} failed: {result.stderr[-2000:]}")
    return float(seconds), int(peak_kib) / 1024


def nih_scale_rows(args, tmp: Path, device) -> list[dict]:
    path = Path(args.cache or tmp / "nih.h5")
    if not args.cache:
        write_synthetic_cache(path, rows={k: max(int(v * args.scale), 50) for k, v in NIH_SCALE.items()})
    data = load_head_data(path, device=device)
    matrix_mib = sum(s.features.numel() * s.features.element_size() for s in data.splits.values()) / 2**20
    rows = [] if args.skip_epochs else epoch_rows(data, device)
    del data
    imports_s, imports_mib = measure_process(["-c", "import heads.train, heads.training, matplotlib.pyplot"])
    seconds, peak = measure_process(["-m", "heads.train", "--cache", path, "--out", tmp / "nih-run",
                                     "--device", device.type, "--max-epochs", "3"])
    rows.append({"stage": "heads", "measure": "heads.train peak RSS (whole process)", "value": f"{peak:.0f} MiB",
                 "note": f"float16 feature matrix {matrix_mib:.0f} MiB: {peak / matrix_mib:.2f}x; a process that "
                         f"only imports the kit peaks at {imports_mib:.0f} MiB, so the run adds "
                         f"{(peak - imports_mib) / matrix_mib:.2f}x the matrix; 3 epochs, {seconds:.0f} s"})
    return rows


def epoch_rows(data, device) -> list[dict]:
    fit = fit_head(train=data.train, val=data.val, settings=DEFAULTS, device=device)
    rows = [{"stage": "heads", "measure": "default head to early stop", "value": f"{fit.seconds:.1f} s",
             "note": f"{device.type}; {len(fit.history)} epochs, val mean AUC {fit.best_val_auc:.4f} "
                     f"(best possible {known_auc(1.19):.3f}); {len(data.train)} train rows"}]
    for depth in (0, 2):
        settings = {**DEFAULTS, "depth": depth, "max_epochs": 2, "patience": 2}
        per_epoch = fit_head(train=data.train, val=data.val, settings=settings, device=device).seconds / 2
        rows.append({"stage": "heads", "measure": f"seconds per epoch, depth {depth}", "value": f"{per_epoch:.2f} s",
                     "note": f"width {DEFAULTS['width']}, batch {DEFAULTS['batch_size']}"})
    return rows


def cnn_like_rows(args, tmp: Path, device) -> list[dict]:
    path = tmp / "cnn.h5"
    write_cnn_like_cache(path, rows={k: max(int(v * args.scale * args.cnn_rows), 50) for k, v in CNN_ROWS.items()})
    head_s, _ = measure_process(["-m", "heads.train", "--cache", path, "--out", tmp / "cnn-run", "--depth", "0",
                                 "--device", device.type])
    metrics = json.loads((tmp / "cnn-run" / "metrics.json").read_text())
    import_s, _ = measure_process(["-c", "import torch"])
    full = load_head_data(path, device="cpu", dtype=np.float32)
    baseline = LogisticBaseline().fit(full.train)
    sk_auc = mean_auc(auc_per_class(full.val.labels.numpy(), baseline.predict_proba(full.val.features)))
    rows = [{"stage": "heads", "measure": "heads.train --depth 0, whole process", "value": f"{head_s:.1f} s",
             "note": f"CNN-like {len(full.train)} train rows x 2048; val mean AUC {metrics['val']['mean_auc']:.4f}; "
                     f"training {metrics['train_seconds']:.1f} s of it ({metrics['epochs_run']} epochs)"},
            {"stage": "heads", "measure": "scikit-learn LogisticRegression fit alone", "value": f"{baseline.seconds_:.1f} s",
             "note": f"same standardized features; val mean AUC {sk_auc:.4f}; heads.train is "
                     f"{baseline.seconds_ / head_s:.1f}x faster (whole process vs the fit alone)"},
            {"stage": "heads", "measure": "a process that only imports torch", "value": f"{import_s:.1f} s",
             "note": f"the floor of any heads.train; 15x scikit-learn would mean ending in "
                     f"{baseline.seconds_ / 15:.1f} s"}]
    if args.skip_extras:
        return rows
    half = load_head_data(path, device=device)
    for depth in (0, 2):
        settings = {**DEFAULTS, "depth": depth, "max_epochs": 100 if depth == 0 else args.deep_epochs}
        a = fit_head(train=half.train, val=half.val, settings=settings, device=device).best_val_auc
        full_device = full if device.type == "cpu" else load_head_data(path, device=device, dtype=np.float32)
        b = fit_head(train=full_device.train, val=full_device.val, settings=settings, device=device).best_val_auc
        rows.append({"stage": "heads", "measure": f"float16 vs float32 features, depth {depth}",
                     "value": f"{a - b:+.4f}", "note": f"val mean AUC {a:.4f} (float16) vs {b:.4f} (float32)"})
    rows += stack_rows(args, half, device)
    return rows


def stack_rows(args, data, device) -> list[dict]:
    """K heads (a learning-rate x weight-decay grid) in one pass against one at a time."""
    lrs = np.geomspace(1e-4, 3e-3, max(args.heads // 2, 1))
    grid = [{**DEFAULTS, "lr": float(lr), "weight_decay": wd} for lr in lrs for wd in (0.0, 1e-4)][:args.heads]
    rows = []
    for depth, epochs in ((0, 10), (2, 3)):
        settings_list = [{**s, "depth": depth, "max_epochs": epochs} for s in grid]
        start = time.perf_counter()
        together = fit_heads(train=data.train, val=data.val, settings_list=settings_list, device=device)
        stacked = time.perf_counter() - start
        start = time.perf_counter()
        alone = [fit_head(train=data.train, val=data.val, settings=s, device=device) for s in settings_list]
        single = time.perf_counter() - start
        gap = max(abs(a.best_val_auc - b.best_val_auc) for a, b in zip(together, alone))
        rows.append({"stage": "heads", "measure": f"{len(grid)} heads in one pass, depth {depth}",
                     "value": f"{stacked:.1f} s", "note": f"one at a time {single:.1f} s: {single / stacked:.1f}x "
                                                        f"faster; {epochs} epochs at most; largest val AUC gap {gap:.1e}"})
    return rows


# Heads of the searched space: linear and deep, slow and fast learning rates, with dropout.
PRECISION_HEADS = [{"depth": 0, "lr": 1e-3}, {"depth": 0, "lr": 1e-4}, {"depth": 1, "width": 256, "lr": 3e-4},
                   {"depth": 2, "width": 512, "lr": 1e-3, "dropout": 0.3}, {"depth": 3, "width": 1024, "lr": 1e-4}]


def precision_rows(args, tmp: Path, device) -> list[dict]:
    """The same heads trained in fp32 and under bf16 autocast: their validation AUCs and times."""
    path = tmp / "precision.h5"
    write_synthetic_cache(path, rows={k: max(int(v * args.precision_scale), 50) for k, v in NIH_SCALE.items()})
    data = load_head_data(path, device=device)
    native = device.type == "cuda" or cpu_has_native_bf16()
    gaps, seconds = [], {"fp32": 0.0, "bf16": 0.0}
    for head in PRECISION_HEADS:
        aucs = {}
        for precision in ("fp32", "bf16"):
            settings = {**DEFAULTS, **head, "max_epochs": 30, "precision": precision}
            fit = fit_head(train=data.train, val=data.val, settings=settings, device=device)
            aucs[precision], seconds[precision] = fit.best_val_auc, seconds[precision] + fit.seconds
        gaps.append(aucs["bf16"] - aucs["fp32"])
    return [{"stage": "heads", "measure": f"bf16 autocast vs fp32, {len(gaps)} heads, val mean AUC",
             "value": f"{max(gaps, key=abs):+.4f}",
             "note": f"largest gap of depths {sorted({h['depth'] for h in PRECISION_HEADS})}, gaps "
                     f"{', '.join(f'{g:+.4f}' for g in gaps)}; {len(data.train)} train rows x "
                     f"{data.train.features.shape[1]}; bf16 took {seconds['bf16'] / seconds['fp32']:.2f}x the "
                     f"fp32 time ({'native bf16' if native else 'no native bf16 here: emulated'})"}]


def run(args) -> list[dict]:
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only_precision:
            return precision_rows(args, Path(tmp), device)
        rows = nih_scale_rows(args, Path(tmp), device)
        if not args.skip_sklearn:
            rows += cnn_like_rows(args, Path(tmp), device)
        rows += precision_rows(args, Path(tmp), device)
    return rows


def main(args) -> int:
    print_table(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
