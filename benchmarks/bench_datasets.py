"""Reading and validating a dataset's full label table, on the real metadata files torchxrayvision
ships (torchxrayvision/data/): CheXpert's train.csv (223,414 rows), PadChest's 160K CSV
(160,861 rows) and VinBigData's train.csv (67,914 box rows), each laid out in a data folder as
its reader expects (label files only, no images: reading the table opens none).

    python -m benchmarks.bench_datasets                     # the full tables
    python -m benchmarks.bench_datasets --quick             # the first 2,000 rows of each file
    python -m benchmarks.bench_datasets --datasets padchest --profile   # where the time goes

What is timed is what `python -m extract --dataset NAME` does before it reads an image:
`extract.run.load_rows` hands the table to `extract.datasets.load` (the reader, then
check_table) with the options its flags give; with the default flags those are `Options()`,
which is what the child calls. `extract.run` itself is not imported: it loads torch for the
embedding, which is no part of reading a table.

Each dataset is read in a fresh process, so that imports are paid once and the figure is a
whole process; a process that only imports extract.datasets is timed beside them as the
baseline. CPU seconds (getrusage of the child) are the figure load on a shared machine
disturbs least; wall seconds and the load average before and after are printed beside them.
"""
from __future__ import annotations

import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from benchmarks.table import print_measured
from cache.flags import OneLineParser, Valid, number_type

REPO = Path(__file__).resolve().parents[1]
QUICK_ROWS = 2_000
CHEXPERT_VALID_PATIENTS = 200  # the real valid.csv holds 200 patients; the shipped file has only train
DATASETS = ("chexpert", "padchest", "vindr")
SOURCES = {"chexpert": "chexpert_train.csv.gz",
           "padchest": "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz",
           "vindr": "vinbigdata-train.csv.gz"}

# The child: imports, then (given a dataset) the reader and its checks, timed inside as well.
CHILD = """
import json, sys, time
import extract.datasets as datasets
name, data_dir, profile = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
report = {}
if name:
    if profile:
        import cProfile, pstats
    profiler = cProfile.Profile() if profile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    rows, provenance = datasets.load(name, data_dir)
    if profiler:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(15)
    report = {"kept": len(rows["image_id"]), "reader_wall": time.perf_counter() - wall,
              "reader_cpu": time.process_time() - cpu, "classes": len(provenance["classes"])}
print(json.dumps(report))
"""


def get_args_parser(add_help=True):
    parser = OneLineParser("python -m benchmarks.bench_datasets", add_help=add_help,
                           description="Time each dataset reader on the real metadata torchxrayvision ships.")
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated, from {', '.join(DATASETS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"the first {QUICK_ROWS:,} rows of each file")
    parser.add_argument("--rows", type=number_type(int, Valid(50)), default=None,
                        help="read the first this many rows of each file (default: all; --quick: 2,000)")
    parser.add_argument("--profile", action="store_true",
                        help="print each reader's top 15 functions by cumulative time (cProfile)")
    parser.add_argument("--work-dir", default=None,
                        help="lay the data folders out here and keep them (default: a temporary folder)")
    return parser


def xrv_data() -> Path:
    """torchxrayvision's data folder, located without importing it (its import loads torch)."""
    import importlib.util
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("torchxrayvision is not installed (pip install -e '.[xrv]'): its wheel ships "
                                "the metadata files this benchmark reads")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def read_source(name: str, rows: int | None) -> pd.DataFrame:
    """The shipped file as strings; `rows`: its first that many rows (whole patients but the
    last, in the files' order; reading only those keeps --quick quick)."""
    return pd.read_csv(xrv_data() / SOURCES[name], dtype=str, keep_default_na=False, nrows=rows)


def lay_out_chexpert(folder: Path, rows: int | None) -> tuple[Path, int]:
    """train.csv and valid.csv in CheXpert-v1.0-small/: valid.csv holds the rows of the last
    patients, moved to valid/ as the real file names them (torchxrayvision ships train only)."""
    data_dir = folder / "CheXpert-v1.0-small"
    data_dir.mkdir(parents=True)
    frame = read_source("chexpert", rows)
    patients = frame["Path"].str.extract(r"(patient\d+)", expand=False)
    last = patients.drop_duplicates().iloc[-min(CHEXPERT_VALID_PATIENTS, max(1, patients.nunique() // 10)):]
    moved = patients.isin(last)
    valid = frame[moved].copy()
    valid["Path"] = valid["Path"].str.replace("/train/", "/valid/", regex=False)
    frame[~moved].to_csv(data_dir / "train.csv", index=False)
    valid.to_csv(data_dir / "valid.csv", index=False)
    return data_dir, len(frame)


def lay_out_padchest(folder: Path, rows: int | None) -> tuple[Path, int]:
    """The labels CSV as shipped (gzipped, which the reader accepts); no image folders, so the
    paths resolve flat."""
    folder.mkdir(parents=True)
    target = folder / SOURCES["padchest"]
    if rows:
        frame = read_source("padchest", rows)
        frame.to_csv(target, index=False)
        return folder, len(frame)
    shutil.copyfile(xrv_data() / SOURCES["padchest"], target)
    return folder, len(read_source("padchest", None))


def lay_out_vindr(folder: Path, rows: int | None) -> tuple[Path, int]:
    """Kaggle VinBigData's train.csv (one row per radiologist finding and box), uncompressed as
    Kaggle distributes it."""
    folder.mkdir(parents=True)
    if rows:
        frame = read_source("vindr", rows)
        frame.to_csv(folder / "train.csv", index=False)
        return folder, len(frame)
    with gzip.open(xrv_data() / SOURCES["vindr"], "rb") as source, open(folder / "train.csv", "wb") as target:
        shutil.copyfileobj(source, target)
    return folder, len(read_source("vindr", None))


LAYOUTS = {"chexpert": lay_out_chexpert, "padchest": lay_out_padchest, "vindr": lay_out_vindr}


def time_child(name: str, data_dir, *, profile: bool) -> dict:
    """Run CHILD in a fresh process: its whole wall and CPU seconds, and what it reported."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, name, str(data_dir), "1" if profile else "0"],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"reading {name or 'nothing'} failed (rc {done.returncode}): "
                           f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no message'}")
    if profile and done.stderr:
        print(f"--- {name}: top 15 by cumulative time ---\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "load": f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}",
            **json.loads(done.stdout.strip().splitlines()[-1])}


def chosen_datasets(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LAYOUTS] or ([] if names else [text])
    if unknown:
        raise ValueError(f"--datasets {unknown[0]!r}: choose from {', '.join(DATASETS)}")
    return names


def refuse_existing(work: Path, names: list) -> None:
    """Never write into (or delete) a dataset folder this run did not make."""
    existing = [str(work / name) for name in names if (work / name).exists()]
    if existing:
        raise ValueError(f"--work-dir: {existing[0]} exists; give a folder without {', '.join(names)} in it")


def run(args) -> list[dict]:
    names = chosen_datasets(args.datasets)
    sample = args.rows or (QUICK_ROWS if args.quick else None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        refuse_existing(work, names)
        baseline = time_child("", "", profile=False)
        table = [{"stage": "datasets", "measure": "import extract.datasets only (baseline)",
                  "value": f"{baseline['cpu']:.2f} s CPU",
                  "note": f"wall {baseline['wall']:.2f} s; load {baseline['load']}"}]
        for name in names:
            data_dir, read = LAYOUTS[name](work / name, sample)
            timed = time_child(name, data_dir, profile=args.profile)
            table.append({
                "stage": "datasets", "measure": f"read + validate {name}: {read:,} rows read, {timed['kept']:,} kept",
                "value": f"{timed['cpu']:.2f} s CPU",
                "note": f"wall {timed['wall']:.2f} s (whole process); reader alone {timed['reader_cpu']:.2f} s CPU, "
                        f"{timed['reader_wall']:.2f} s wall; {timed['classes']} classes; default options; "
                        f"load {timed['load']}"})
    return table


def main(args) -> int:
    try:
        names = chosen_datasets(args.datasets)
        if args.work_dir:
            refuse_existing(Path(args.work_dir), names)
        xrv_data()
        print_measured(lambda: run(args))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
