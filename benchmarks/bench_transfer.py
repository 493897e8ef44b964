"""Wall time of the two external-validation commands of docs/transfer.md as whole processes, each
against the 5-minute target and against the same work scripted as a user would without them:

(a) `python -m heads.transfer` over 4 synthetic datasets (NIH, CheXpert, PadChest, VinDr
    spellings, classes overlapping through cache/vocabulary.py), default head settings; baseline:
    4 `heads.train` (the diagonal is each run's own test) + 12 `heads.evaluate` (the other cells).
(b) `python -m heads.train --train-fraction 0.01,0.1,0.25,1 --repeats 5` on the NIH-like cache;
    baseline: the same 20 fits as 20 `heads.train` processes, each one fraction and one repeat
    (`--repeats 1 --seed` of that repeat: the same patients and the same head seed).

Each baseline runs on the same caches in the same run, and must give back the same AUCs as the
command it is set against (the note says the largest difference): it does the same work.

    python -m benchmarks.bench_transfer                    # 20,000 train rows x 2048-d per cache
    python -m benchmarks.bench_transfer --no-baseline      # the two commands alone
    python -m benchmarks.bench_transfer --quick            # tiny: checks it runs, not speed

Caches: val and test in NIH's proportions to train (8,378 and 25,596 to 78,146), float16.
Each row notes the load average before and after it: the machine may be shared, and only
ratios within one run compare.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_heads import measure_process
from benchmarks.table import print_measured
from cache.synthetic import NIH_SCALE, write_synthetic_cache
from heads.settings import DEFAULTS

TARGET_SECONDS = 300
ENCODER = "synthetic-encoder"  # one weights string: the caches read as one encoder's features
# Each dataset's own label names, one per feature column: class c's signal sits on column c, so a
# finding two datasets share (their names meet in cache/vocabulary.py) is found at one place.
COLUMNS = {
    "nih": ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Pneumothorax", "Pneumonia",
            "Emphysema", "Nodule", "Mass", "Infiltration", "Fibrosis", "Pleural_Thickening", "Hernia"],
    "chexpert": ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion", "Pneumothorax",
                 "Pneumonia", "Lung Opacity", "Fracture", "Support Devices", "Enlarged Cardiomediastinum",
                 "Lung Lesion", "Pleural Other", "No Finding"],
    # the planted shift: PadChest's cardiomegaly and pleural effusion sit on each other's column,
    # so a head trained elsewhere reads noise for them there, and PadChest's head elsewhere
    "padchest": ["atelectasis", "pleural effusion", "consolidation", "pulmonary edema", "cardiomegaly",
                 "pneumothorax", "pneumonia", "emphysema", "nodule", "mass", "infiltrates", "pulmonary fibrosis",
                 "pleural thickening", "hiatal hernia"],
    "vindr": ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural effusion", "Pneumothorax",
              "Pneumonia", "Lung Opacity", "Nodule/Mass", "Aortic enlargement", "Infiltration", "Pulmonary fibrosis",
              "Pleural thickening", "No finding"],
}
UNKNOWN_SHARE = {"nih": 0.0, "chexpert": 0.1, "padchest": 0.0, "vindr": 0.05}  # labels stored as 255
QUICK = {"train_rows": 300, "dim": 32, "caches": 2, "fractions": "0.1,1", "repeats": 1, "bootstrap": 20,
         "max_epochs": 5}


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m benchmarks.bench_transfer", add_help=add_help)
    parser.add_argument("--train-rows", type=int, default=20_000, help="train rows of each cache")
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension of the caches")
    parser.add_argument("--caches", type=int, default=4, choices=range(2, len(COLUMNS) + 1),
                        help=f"datasets in the matrix, the first of {', '.join(COLUMNS)}")
    parser.add_argument("--fractions", default="0.01,0.1,0.25,1", help="--train-fraction of part (b)")
    parser.add_argument("--repeats", type=int, default=5, help="--repeats of part (b)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient resamples of every CI (as the CLIs)")
    parser.add_argument("--max-epochs", type=int, default=None, help="head epoch cap (default: the heads' own)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no-baseline", action="store_true", help="time the two commands alone")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sizes ({', '.join(f'{k} {v}' for k, v in QUICK.items())}): checks it runs")
    parser.add_argument("--work-dir", default=None,
                        help="keep the caches and every output folder here (default: a temporary folder)")
    return parser


def nih_proportions(train_rows: int) -> dict:
    """Split sizes with val and test in the official NIH split's proportions to train."""
    return {split: max(2, round(train_rows * n / NIH_SCALE["train"])) for split, n in NIH_SCALE.items()}


def write_world(folder: Path, *, datasets, train_rows: int, dim: int, separation=1.19, seed: int = 0) -> list:
    """One synthetic cache per dataset (COLUMNS), one encoder's features, each with its own rows
    and labels; returns their paths."""
    paths = []
    for number, dataset in enumerate(datasets):
        path = folder / f"{dataset}.h5"
        write_synthetic_cache(path, rows=nih_proportions(train_rows), dim=dim, classes=COLUMNS[dataset],
                              dataset=dataset, unknown=UNKNOWN_SHARE[dataset], separation=separation,
                              seed=seed + number, weights=ENCODER)
        paths.append(path)
    return paths


def timed(module_args: list) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, load average before -> after) of `python -m ...` as a process."""
    before = os.getloadavg()[0]
    seconds, peak = measure_process(["-m", *map(str, module_args)])
    return seconds, peak, f"{before:.1f} -> {os.getloadavg()[0]:.1f}"


def against_target(seconds: float) -> str:
    verdict = "within" if seconds <= TARGET_SECONDS else "OVER"
    return f"{verdict} the {TARGET_SECONDS} s target"


def transfer_rows(caches: list, work: Path, *, args, common: list) -> list[dict]:
    n = len(caches)
    seconds, peak, load = timed(["heads.transfer", *[f for c in caches for f in ("--cache", c)],
                                 "--out", work / "transfer", "--bootstrap", args.bootstrap, *common])
    rows = [{"stage": "heads", "measure": f"heads.transfer, {n} x {n} matrix", "value": f"{seconds:.0f} s",
             "note": f"{against_target(seconds)}; {describe_caches(caches, args)}, {args.bootstrap} "
                     f"resamples; {describe_head(args)}; peak RSS {peak:.0f} MiB; load {load}"}]
    if args.no_baseline:
        return rows
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    for source in caches:
        run = work / "baseline" / "runs" / source.stem
        measure_process(["-m", "heads.train", "--cache", source, "--out", run, "--bootstrap", args.bootstrap, *common])
        for target in caches:
            if target != source:
                measure_process(["-m", "heads.evaluate", run, "--cache", target, "--bootstrap", args.bootstrap,
                                 "--out", work / "baseline" / "evaluations" / f"{source.stem}-on-{target.stem}"])
    baseline = time.perf_counter() - start
    rows.append({"stage": "heads", "measure": f"baseline: {n} heads.train + {n * (n - 1)} heads.evaluate",
                 "value": f"{baseline:.0f} s",
                 "note": f"the same matrix as separate processes: heads.transfer {baseline / seconds:.2f}x faster; "
                         f"largest AUC difference from its cells {largest_cell_difference(work, caches):.1e}; "
                         f"load {load_before:.1f} -> {os.getloadavg()[0]:.1f}"})
    return rows


def cell_aucs(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())["test"]["auc"]


def largest_cell_difference(work: Path, caches: list) -> float:
    """The largest |AUC difference| of any class of any cell between heads.transfer and the
    baseline (the diagonal: the baseline's run against the transfer's run of that source)."""
    gaps = []
    for source in caches:
        for target in caches:
            name = f"{source.stem}-on-{target.stem}"
            mine = cell_aucs(work / "transfer" / "evaluations" / name)
            theirs = cell_aucs(work / "baseline" / ("runs" if source == target else "evaluations") /
                               (source.stem if source == target else name))
            gaps += [abs(mine[c] - theirs[c]) for c in mine if mine[c] is not None]
    return max(gaps)


def efficiency_rows(cache: Path, work: Path, *, args, common: list) -> list[dict]:
    fractions = args.fractions.split(",")
    seconds, peak, load = timed(["heads.train", "--cache", cache, "--train-fraction", args.fractions,
                                 "--repeats", args.repeats, "--out", work / "efficiency", *common])
    fits = len(fractions) * args.repeats
    rows = [{"stage": "heads", "measure": f"heads.train --train-fraction {args.fractions} --repeats {args.repeats}",
             "value": f"{seconds:.0f} s",
             "note": f"{against_target(seconds)}; {fits} fits on {cache.name}, {describe_caches([cache], args)}; "
                     f"{describe_head(args)}; peak RSS {peak:.0f} MiB; load {load}"}]
    if args.no_baseline:
        return rows
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    for repeat in range(args.repeats):
        for fraction in fractions:
            # repeat r of the efficiency run draws its patients and its head with seed + r
            measure_process(["-m", "heads.train", "--cache", cache, "--train-fraction", fraction, "--repeats", "1",
                             "--seed", DEFAULTS["seed"] + repeat, "--out",
                             work / "baseline" / "efficiency" / f"f{fraction}-r{repeat}", *common])
    baseline = time.perf_counter() - start
    rows.append({"stage": "heads", "measure": f"baseline: {fits} heads.train, one fit each",
                 "value": f"{baseline:.0f} s",
                 "note": f"the same fits as separate processes: the efficiency run {baseline / seconds:.2f}x faster; "
                         f"largest test AUC difference from its fits {largest_fit_difference(work, args):.1e}; "
                         f"load {load_before:.1f} -> {os.getloadavg()[0]:.1f}"})
    return rows


def fit_test_aucs(run: Path, *, repeat_offset: int = 0) -> dict:
    """{(fraction, repeat, class): test AUC} of an efficiency run's efficiency.csv."""
    import pandas as pd

    table = pd.read_csv(run / "efficiency.csv").dropna(subset=["test_auc"])
    return {(f"{row.fraction:g}", row["repeat"] + repeat_offset, row["class"]): row.test_auc
            for _, row in table.iterrows()}


def largest_fit_difference(work: Path, args) -> float:
    mine = fit_test_aucs(work / "efficiency")
    theirs = {}
    for folder in (work / "baseline" / "efficiency").iterdir():
        theirs.update(fit_test_aucs(folder, repeat_offset=int(folder.name.rpartition("-r")[2])))
    assert mine.keys() == theirs.keys(), "the baseline fits are not the efficiency run's fits"
    return max(abs(mine[key] - theirs[key]) for key in mine)


def describe_caches(caches: list, args) -> str:
    sizes = nih_proportions(args.train_rows)
    return (f"{len(caches)} cache{'s' * (len(caches) > 1)} of {sizes['train']:,}/{sizes['val']:,}/{sizes['test']:,} "
            f"train/val/test rows x {args.dim}-d float16")


def describe_head(args) -> str:
    return "default head" + (f", at most {args.max_epochs} epochs" if args.max_epochs else "")


def resolve_quick(args):
    """--quick replaces the sizes with QUICK's."""
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def run(args) -> list[dict]:
    args = resolve_quick(args)
    common = ["--device", args.device, *(["--max-epochs", args.max_epochs] if args.max_epochs else [])]
    with (contextlib.nullcontext(args.work_dir) if args.work_dir else tempfile.TemporaryDirectory()) as tmp:
        work = Path(tmp)
        (work / "caches").mkdir(parents=True)
        caches = write_world(work / "caches", datasets=list(COLUMNS)[:args.caches], train_rows=args.train_rows,
                             dim=args.dim)
        rows = transfer_rows(caches, work, args=args, common=common)
        rows += efficiency_rows(caches[0], work, args=args, common=common)
    return rows


def main(args) -> int:
    if args.work_dir and Path(args.work_dir, "caches").exists():  # an earlier run's outputs: not mixed in
        print(f"error: --work-dir {args.work_dir} holds an earlier run (caches/); give another folder", file=sys.stderr)
        return 2
    print_measured(lambda: run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
