"""Reading and writing the feature cache (schema in `cache/__init__.py`)."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

SCHEMA_VERSION = 1

# Everything that decides which rows exist and what their features are. Two caches with the
# same fingerprint hold interchangeable rows; a mismatch on any key refuses the reuse.
FINGERPRINT_KEYS = (
    "schema_version", "classes", "backbone", "weights", "weights_sha256", "image_size",
    "precision", "feature_dim", "feature_dtype", "preprocessing", "val_fraction",
    "split_seed", "split_source", "source_csv_sha256", "split_lists_sha256",
)
ROW_DATASETS = ("image_id", "patient_id", "labels", "split", "done", "error")
_STR = h5py.string_dtype("utf-8")
# Rows per HDF5 chunk: a 128 x 2048 float16 chunk is 512 KiB, large enough for fast whole
# reads and small enough that a slice of a few rows does not read megabytes.
_CHUNK_ROWS = 128


class CacheError(Exception):
    """A cache that cannot be used as asked: missing, unfinished, mismatched or damaged."""


def compute_fingerprint(attrs: dict) -> str:
    """sha256 over the FINGERPRINT_KEYS of `attrs`, in a canonical JSON form."""
    missing = [key for key in FINGERPRINT_KEYS if key not in attrs]
    if missing:
        raise CacheError(f"cannot fingerprint: settings lack {missing}")
    canonical = json.dumps({key: _plain(attrs[key]) for key in FINGERPRINT_KEYS}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _plain(value):
    """HDF5 hands attributes back as numpy types; make them JSON-comparable."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def create_cache(path, *, table: dict, feature_dim: int, feature_dtype: str, attrs: dict) -> None:
    """Write a new cache with every row not done. `table` holds image_id, patient_id, labels
    and split arrays; `attrs` the settings (the fingerprint is added here)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_rows = len(table["image_id"])
    attrs = dict(attrs, schema_version=SCHEMA_VERSION, feature_dim=feature_dim,
                 feature_dtype=feature_dtype)
    attrs["fingerprint"] = compute_fingerprint(attrs)
    tmp = path.with_name(path.name + ".creating")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("image_id", data=np.asarray(table["image_id"], dtype=object), dtype=_STR)
        f.create_dataset("patient_id", data=np.asarray(table["patient_id"], dtype=np.int64))
        f.create_dataset("labels", data=np.asarray(table["labels"], dtype=np.uint8))
        f.create_dataset("split", data=np.asarray(table["split"], dtype=object), dtype=_STR)
        f.create_dataset(
            "features", shape=(n_rows, feature_dim), dtype=feature_dtype,
            chunks=(min(_CHUNK_ROWS, max(n_rows, 1)), feature_dim), fillvalue=np.nan,
        )
        f.create_dataset("done", data=np.zeros(n_rows, dtype=bool))
        f.create_dataset("error", data=np.full(n_rows, "", dtype=object), dtype=_STR)
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, dict) else value
    _durable_replace(tmp, path)


def _durable_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _open(path, mode="r"):
    path = Path(path)
    if not path.exists():
        raise CacheError(f"no cache at {path}: run `python -m extract --split all --cache {path}` first")
    try:
        handle = h5py.File(path, mode)
    except OSError as err:
        raise CacheError(f"{path} is not a readable HDF5 cache ({err}); delete it and rerun extract") from err
    with handle:
        if "schema_version" not in handle.attrs or "features" not in handle:
            raise CacheError(f"{path} is an HDF5 file but not a cxr14-kit cache (no schema_version/features)")
        yield handle


def read_attrs(path) -> dict:
    """The cache's attributes as plain Python values (JSON attributes decoded)."""
    with _open(path) as f:
        return _decode_attrs(f.attrs)


def _decode_attrs(raw) -> dict:
    attrs = {}
    for key, value in raw.items():
        value = _plain(value)
        if key in ("preprocessing", "versions") and isinstance(value, str):
            value = json.loads(value)
        attrs[key] = value
    return attrs


def read_table(path) -> dict:
    """Every per-row dataset except `features`, as numpy arrays (strings decoded)."""
    with _open(path) as f:
        table = {name: f[name][()] for name in ROW_DATASETS}
    for name in ("image_id", "split", "error"):
        table[name] = np.array([v.decode() if isinstance(v, bytes) else v for v in table[name]], dtype=object)
    return table


def read_features(path, rows_by_name: dict, *, block_rows: int = 8192) -> dict:
    """float32 features for several row sets in one sequential pass over the file.

    `rows_by_name` maps a name (e.g. a split) to row indices in any order; each result keeps
    that order. Reading whole blocks and selecting in memory is much faster than h5py's fancy
    indexing, and peak memory stays at the float32 result plus one block."""
    order = {name: np.argsort(rows, kind="stable") for name, rows in rows_by_name.items()}
    sorted_rows = {name: np.asarray(rows)[order[name]] for name, rows in rows_by_name.items()}
    with _open(path) as f:
        features = f["features"]
        n_rows, dim = features.shape
        out = {name: np.empty((len(rows), dim), np.float32) for name, rows in rows_by_name.items()}
        for start in range(0, n_rows, block_rows):
            stop = min(start + block_rows, n_rows)
            spans = {name: np.searchsorted(rows, [start, stop]) for name, rows in sorted_rows.items()}
            spans = {name: (lo, hi) for name, (lo, hi) in spans.items() if hi > lo}
            if not spans:
                continue
            block = features[start:stop]
            for name, (lo, hi) in spans.items():
                out[name][order[name][lo:hi]] = block[sorted_rows[name][lo:hi] - start]
    return out


# ---------------------------------------------------------------------------------------------
# Writing: part files and the atomic merge


def parts_dir(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".parts")


class PartWriter:
    """Appends finished rows to numbered .npz part files next to the cache. Each part is
    written to a temporary name and renamed, so a killed process leaves only whole parts."""

    def __init__(self, cache_path, *, fingerprint: str, tag: str = "r0"):
        self.directory = parts_dir(cache_path)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.prefix = f"{tag}-{os.getpid()}-{int(time.time() * 1000)}"
        self.count = 0

    def write(self, *, rows, features, failed_rows=(), failed_reasons=()) -> None:
        rows = np.asarray(rows, np.int64)
        failed_rows = np.asarray(failed_rows, np.int64)
        if len(rows) == 0 and len(failed_rows) == 0:
            return
        final = self.directory / f"{self.prefix}-{self.count:06d}.npz"
        tmp = final.with_suffix(".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, rows=rows, features=np.asarray(features), failed_rows=failed_rows,
                     failed_reasons=np.asarray(list(failed_reasons), dtype=str),
                     fingerprint=np.asarray(self.fingerprint))
        os.replace(tmp, final)
        self.count += 1


def _part_files(path) -> list[Path]:
    directory = parts_dir(path)
    return sorted(directory.glob("*.npz")) if directory.exists() else []


def pending_part_rows(path) -> int:
    """Rows sitting in part files that are not merged into the cache yet."""
    total = 0
    for part in _part_files(path):
        with np.load(part) as data:
            total += len(data["rows"]) + len(data["failed_rows"])
    return total


def merge_parts(path) -> int:
    """Fold every part file into the cache atomically; returns the rows merged.

    The caller must hold `exclusive_lock(path)`."""
    path = Path(path)
    parts = _part_files(path)
    if not parts:
        return 0
    tmp = path.with_name(path.name + ".merging")
    shutil.copyfile(path, tmp)
    merged = 0
    with h5py.File(tmp, "r+") as f:
        fingerprint = _plain(f.attrs["fingerprint"])
        for part in parts:
            merged += _merge_one(f, part, fingerprint)
    _durable_replace(tmp, path)
    for part in parts:
        part.unlink()
    return merged


def _merge_one(f: h5py.File, part: Path, fingerprint: str) -> int:
    try:
        data = dict(np.load(part))
    except (OSError, ValueError) as err:
        raise CacheError(f"part file {part} is unreadable ({err}); delete it and rerun extract") from err
    if str(data["fingerprint"]) != fingerprint:
        raise CacheError(f"part file {part} was written for another cache (fingerprint differs); delete it")
    rows, features = data["rows"], data["features"]
    order = np.argsort(rows)
    rows, features = rows[order], features[order]
    for lo, hi in _contiguous_runs(rows):
        f["features"][rows[lo]:rows[hi - 1] + 1] = features[lo:hi]
        f["done"][rows[lo]:rows[hi - 1] + 1] = True
        f["error"][rows[lo]:rows[hi - 1] + 1] = np.full(hi - lo, "", dtype=object)
    for row, reason in zip(data["failed_rows"], data["failed_reasons"]):
        f["done"][row] = False
        f["error"][row] = str(reason)
    return len(rows) + len(data["failed_rows"])


def _contiguous_runs(sorted_rows: np.ndarray):
    """(lo, hi) index pairs of runs of consecutive row numbers, so each run is one slice write."""
    if len(sorted_rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    bounds = np.concatenate([[0], breaks, [len(sorted_rows)]])
    return list(zip(bounds[:-1], bounds[1:]))


@contextlib.contextmanager
def exclusive_lock(path, *, purpose: str = "extract"):
    """Hold the writer lock of `path` (a cache, or a search folder). The kernel drops a flock when its process dies, even by
    SIGKILL, so a crashed extraction never leaves a stale lock behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    handle = open(lock_path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise CacheError(
            f"another {purpose} process ({holder}) is writing {path}; wait for it to finish, "
            f"or give this one another {'--cache' if purpose == 'extract' else '--out'}"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
