"""The datasets the kit reads, one small file each, and their registry.

Every reader turns a data folder (as its dataset is distributed) and the reading options into
one common table (see `extract.datasets.table`): the rows the cache will hold, their image
paths relative to the data folder, patient ids, splits, labels (0, 1 or UNKNOWN) and per-row
metadata, plus the provenance and label policy recorded with the cache.

Adding a dataset is one file that decorates its reader with `@register(...)` and one import
line at the bottom of this file; tests iterate `names()`, so a registered dataset is tested.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from extract.datasets.table import DatasetError, Options, check_table

_REGISTRY: dict[str, "Reader"] = {}


@dataclass(frozen=True)
class Reader:
    """A registered dataset: its reader and what it expects on disk."""
    name: str
    read: Callable  # read(data_dir: Path, options: Options) -> (rows, provenance)
    expects: str  # one line: the files and folders the reader looks for
    markers: tuple = ()  # file names (glob patterns) that identify this dataset's folder
    options: tuple = ()  # the Options fields this reader uses
    download: str = ""
    has_views: bool = True
    header_metadata: bool = False  # sex, age and view are in the DICOM headers only (see add_header_metadata)


def register(name: str, *, expects: str, markers=(), options=(), download: str = "", has_views: bool = True,
             header_metadata: bool = False):
    """Decorator: register `read` under `name`."""
    def add(read):
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is registered twice")
        _REGISTRY[name] = Reader(name=name, read=read, expects=expects, markers=tuple(markers),
                                 options=tuple(options), download=download, has_views=has_views,
                                 header_metadata=header_metadata)
        return read
    return add


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Reader:
    if name not in _REGISTRY:
        raise DatasetError(f"--dataset {name!r} is not a registered dataset; choose one of {', '.join(_REGISTRY)} "
                           f"(--dataset list describes each)")
    return _REGISTRY[name]


def looks_like(data_dir) -> list[str]:
    """The registered datasets whose marker files are in `data_dir` (or one folder below)."""
    data_dir = Path(data_dir)
    found = []
    for reader in _REGISTRY.values():
        for pattern in reader.markers:
            if any(data_dir.glob(pattern)) or any(data_dir.glob(f"*/{pattern}")):
                found.append(reader.name)
                break
    return found


def load(name: str, data_dir, options: Options | None = None) -> tuple[dict, dict]:
    """The common table of dataset `name` in `data_dir`, checked; raises DatasetError."""
    reader = get(name)
    options = options or Options()
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"--data-dir {data_dir} is not a folder")
    unused = [flag for flag, value in options.given().items() if flag not in reader.options]
    if unused:
        raise DatasetError(f"--dataset {name} does not use {', '.join('--' + u.replace('_', '-') for u in unused)}; "
                           f"it reads {', '.join('--' + o.replace('_', '-') for o in reader.options) or 'no options'}")
    try:
        rows, provenance = reader.read(data_dir, options)
    except DatasetError as err:
        raise _with_hint(err, name=name, data_dir=data_dir) from None
    check_table(rows, data_dir=data_dir, name=name)
    return rows, {"dataset": name, **provenance}


def add_header_metadata(rows: dict, data_dir, *, threads: int = 8) -> tuple[dict, int]:
    """`rows` with sex, age and view read from each row's DICOM header (the pixel data never
    read), and the number of headers that could not be read (their values stay missing).

    When: `extract` calls this once, as it creates a cache, not in the reader. Every reader
    run (each resume, `datasets.load`) would otherwise open every file again, and reading in
    the embedding workers instead would leave the rows not embedded yet (another --split, a
    failed image) without metadata and would carry it through the part files. One header
    read per image is a small cost beside decoding its pixels; threads overlap the reads."""
    from extract import dicom  # pydicom is an optional extra: imported only for DICOM datasets

    paths = [Path(data_dir) / path for path in rows["path"]]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        headers = list(pool.map(dicom.header_metadata, paths))
    filled = [header or ("", np.nan, "") for header in headers]
    rows = dict(rows, sex=np.array([h[0] for h in filled], dtype=object),
                age=np.array([h[1] for h in filled], dtype=np.float32),
                view=np.array([h[2] for h in filled], dtype=object))
    return rows, sum(header is None for header in headers)


def _with_hint(err: DatasetError, *, name: str, data_dir: Path) -> DatasetError:
    """A missing-file error says which other registered dataset the folder looks like."""
    if not getattr(err, "missing_files", False):
        return err
    others = [other for other in looks_like(data_dir) if other != name]
    if not others:
        return err
    return DatasetError(f"{err}; this folder looks like --dataset {' or '.join(others)}")


def describe() -> str:
    """The registry, one block per dataset: what it expects on disk and which options it reads."""
    lines = []
    for reader in _REGISTRY.values():
        lines.append(f"{reader.name}")
        lines.append(f"  expects: {reader.expects}")
        lines.append(f"  options: {', '.join('--' + o.replace('_', '-') for o in reader.options) or '(none)'}"
                     + ("" if reader.has_views else "; no view metadata to choose rows by")
                     + ("; sex, age and view recorded from the DICOM headers" if reader.header_metadata else ""))
        if reader.download:
            lines.append(f"  download: {reader.download}")
    return "\n".join(lines)


# One line per dataset: registering is importing.
from extract.datasets import nih  # noqa: E402,F401
from extract.datasets import chexpert  # noqa: E402,F401
from extract.datasets import mimic  # noqa: E402,F401
from extract.datasets import padchest  # noqa: E402,F401
from extract.datasets import vindr  # noqa: E402,F401
from extract.datasets import rsna  # noqa: E402,F401
from extract.datasets import siim  # noqa: E402,F401
from extract.datasets import owncsv  # noqa: E402,F401
