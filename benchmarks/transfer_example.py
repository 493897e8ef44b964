"""The worked example of docs/transfer.md, regenerated: four synthetic "datasets" (NIH, CheXpert,
PadChest and VinDr spellings, one encoder) with a planted shift, `heads.transfer` over them, and
a label-efficiency run on the NIH-like one. transfer.md, transfer.png, efficiency.md and
efficiency.png are copied into benchmarks/figures/.

    python -m benchmarks.transfer_example [--work outputs/transfer_example]

The world is benchmarks/bench_transfer.py's (COLUMNS): every finding carries the same signal
(best possible AUC 0.856 at separation 1.5) on the feature column of its shared name, except
PadChest's cardiomegaly and pleural effusion, which sit on each other's column. So the answer
is known before the run: a head scores those two at chance across the PadChest border, in both
directions, and everything else holds. The script prints, per cell, the drop that alone would
cause, and at the end whether any fit ran into its epoch cap (HEAD).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from benchmarks.bench_transfer import COLUMNS, nih_proportions, write_world
from benchmarks.compare_example import FIGURES, run_module
from cache.synthetic import known_auc
from cache.vocabulary import shared_name

SEPARATION = 1.5
TRAIN_ROWS = 6_000  # 2,000 patients: the 1% subset keeps 20 of them
DIM = 64
FRACTIONS, REPEATS = "0.01,0.1,0.25,1", 5
# The default head (batch 512, at most 100 epochs) suits NIH-scale train splits; 60 images are
# one step an epoch, and the cap would stop the small fits long before they converge, so the
# curve would show optimisation steps rather than labels. With these every fit early-stops.
HEAD = ["--lr", "0.01", "--batch-size", "64", "--patience", "20", "--max-epochs", "500"]


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser("python -m benchmarks.transfer_example", add_help=add_help,
                                     description="Regenerate the heads.transfer example of docs/transfer.md.")
    parser.add_argument("--work", default="outputs/transfer_example", help="where caches and outputs are written")
    return parser


def columns_by_shared_name(dataset: str) -> dict:
    return {shared_name(dataset, own): column for column, own in enumerate(COLUMNS[dataset])}


def planted_drop(source: str, target: str, best: float) -> tuple[float, int, int]:
    """(the drop the planted shift alone causes, classes shared, of which shifted): a shifted
    class falls from `best` to chance, the others hold."""
    mine, theirs = columns_by_shared_name(source), columns_by_shared_name(target)
    shared = [name for name in mine if name in theirs]
    shifted = [name for name in shared if mine[name] != theirs[name]]
    return len(shifted) / len(shared) * (best - 0.5), len(shared), len(shifted)


def print_planted(best: float) -> None:
    print(f"best possible AUC per class {best:.3f}; the drop the planted shift alone causes, per cell:")
    for source in COLUMNS:
        cells = [f"{target} {drop:+.3f} ({shifted} of {shared} shared shifted)"
                 for target in COLUMNS if target != source
                 for drop, shared, shifted in [planted_drop(source, target, best)]]
        print(f"  {source}: " + "; ".join(cells))


def print_capped(work: Path) -> None:
    """Name every fit that ran into the epoch cap (still improving when stopped)."""
    cap = int(HEAD[HEAD.index("--max-epochs") + 1])
    fits = [(f"transfer run {path.parent.name}", json.loads(path.read_text()))
            for path in sorted((work / "transfer" / "runs").glob("*/metrics.json"))]
    fits += [(f"efficiency fit {fit['fraction']:g} repeat {fit['repeat']}", fit)
             for fit in json.loads((work / "efficiency" / "metrics.json").read_text())["fits"]]
    capped = [name for name, fit in fits if fit["epochs_run"] >= cap]
    print(f"ran into the {cap}-epoch cap: {', '.join(capped)}" if capped else
          f"all {len(fits)} fits early-stopped before the {cap}-epoch cap")


def main(args) -> int:
    work = Path(args.work)
    for folder in ("caches", "transfer", "efficiency"):  # only what an earlier run of this script wrote
        shutil.rmtree(work / folder, ignore_errors=True)
    (work / "caches").mkdir(parents=True)
    write_world(work / "caches", datasets=list(COLUMNS), train_rows=TRAIN_ROWS, dim=DIM, separation=SEPARATION)
    print(f"{len(COLUMNS)} caches of {nih_proportions(TRAIN_ROWS)} rows x {DIM}-d")
    print_planted(known_auc(SEPARATION))
    run_module("heads.transfer", *[f for name in COLUMNS for f in ("--cache", f"caches/{name}.h5")],
               "--out", "transfer", *HEAD, cwd=work)
    run_module("heads.train", "--cache", "caches/nih.h5", "--train-fraction", FRACTIONS, "--repeats", REPEATS,
               "--out", "efficiency", *HEAD, cwd=work)
    print_capped(work)
    FIGURES.mkdir(exist_ok=True)
    for folder, names in (("transfer", ("transfer.md", "transfer.png")), ("efficiency", ("efficiency.md",
                                                                                      "efficiency.png"))):
        for name in names:
            shutil.copy(work / folder / name, FIGURES / name)
    print(f"copied transfer.md, transfer.png, efficiency.md and efficiency.png to {FIGURES}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
