"""Reading and writing the feature cache (schema in `cache/__init__.py`)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)

# Everything that decides which rows exist and what their features are. Two caches with the
# same fingerprint hold interchangeable rows; a mismatch on any key refuses the reuse.
FINGERPRINT_KEYS = (
    "schema_version", "classes", "backbone", "weights", "weights_sha256", "image_size",
    "precision", "feature_dim", "feature_dtype", "preprocessing", "val_fraction",
    "split_seed", "split_source", "source_csv_sha256", "split_lists_sha256",
)
# Version 2 also fingerprints the reader and every label policy ("n/a" where one does not apply).
V2_KEYS = ("dataset", "views", "uncertain", "raters", "label_method")
ROW_DATASETS = ("image_id", "patient_id", "labels", "split", "done", "error")
METADATA = "metadata"  # the group of per-row metadata: required in version 2, optional in version 1
METADATA_DATASETS = ("sex", "age", "view", "study_id")
_STR = h5py.string_dtype("utf-8")
# Rows per HDF5 chunk: a 128 x 2048 float16 chunk is 512 KiB, large enough for fast whole
# reads and small enough that a slice of a few rows does not read megabytes.
_CHUNK_ROWS = 128


# Why a row whose embedding came out NaN or infinite is not done (NaN weights, fp16 overflow).
NON_FINITE_REASON = "embedding is not finite (NaN or infinite values: check the weights and --precision)"


class CacheError(Exception):
    """A cache that cannot be used as asked: missing, unfinished, mismatched or damaged."""


class DiskFull(CacheError):
    """No space left on the device that holds the cache or its part files. Raised before the
    cache is touched, or after the half-written copy is removed: the cache stays intact."""


def real_path(path) -> Path:
    """The file a cache path names, symlinks resolved: the kit locks and replaces this file, so
    that two aliases of one cache share one lock and a link keeps pointing at the cache."""
    return Path(os.path.realpath(path))


def safe_text(text) -> str:
    """`text` as valid UTF-8: what cannot be encoded (a surrogate-escaped byte from a non-UTF-8
    file name) is written as a backslash escape, and so is NUL, which HDF5 strings cannot
    hold, so storing a reason can never fail."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8").replace("\0", "\\x00")


def fingerprint_keys(version) -> tuple:
    """The attributes the fingerprint covers in a cache of schema `version`."""
    return FINGERPRINT_KEYS + V2_KEYS if version == 2 else FINGERPRINT_KEYS


def compute_fingerprint(attrs: dict) -> str:
    """sha256 over FINGERPRINT_KEYS and the V2_KEYS `attrs` holds (all of them in a version-2
    cache, none in a version-1 one), in a canonical JSON form."""
    keys = FINGERPRINT_KEYS + tuple(key for key in V2_KEYS if key in attrs)
    missing = [key for key in FINGERPRINT_KEYS if key not in attrs]
    if missing:
        raise CacheError(f"cannot fingerprint: settings lack {missing}")
    canonical = json.dumps({key: _plain(attrs[key]) for key in keys}, sort_keys=True)
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
    and split arrays; `attrs` the settings (the fingerprint is added here). Settings that name
    a `dataset` make a version-2 cache (string patient ids, UNKNOWN labels, the metadata group
    from the table's sex/age/view/study_id); without one the cache is version 1, as NIH caches
    have always been, with the metadata group when the table has any of those columns (the
    group is outside the fingerprint, so the rows and their fingerprint are what they were)."""
    path = real_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_rows = len(table["image_id"])
    version = 2 if "dataset" in attrs else 1
    if version == 2 and any(key not in attrs for key in V2_KEYS):
        raise CacheError(f"cannot create a version-2 cache: settings lack {[k for k in V2_KEYS if k not in attrs]}")
    attrs = dict(attrs, schema_version=version, feature_dim=feature_dim,
                 feature_dtype=feature_dtype)
    attrs["fingerprint"] = compute_fingerprint(attrs)
    tmp = path.with_name(path.name + ".creating")
    need = (1 << 18) + 256 * n_rows  # the row table; features are allocated as rows get done
    if shutil.disk_usage(path.parent).free < need:  # HDF5 meeting ENOSPC can crash the process
        raise disk_full_error(path, where=path.parent, doing="creating the cache", need=need)
    with _removed_on_failure(tmp, cache=path, doing="creating the cache"):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("image_id", data=np.asarray(table["image_id"], dtype=object), dtype=_STR)
            if version == 1:
                f.create_dataset("patient_id", data=np.asarray(table["patient_id"], dtype=np.int64))
            else:
                f.create_dataset("patient_id", data=np.asarray([str(p) for p in table["patient_id"]], dtype=object),
                                 dtype=_STR)
            if version == 2 or any(name in table for name in METADATA_DATASETS):
                _write_metadata(f, table, n_rows)
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


def _write_metadata(f: h5py.File, table: dict, n_rows: int) -> None:
    """The metadata group: sex ("M"/"F"/""), age (float32 years, NaN = missing), view and
    study_id (strings, "" = missing)."""
    group = f.create_group(METADATA)
    for name in METADATA_DATASETS:
        if name == "age":
            values = np.asarray(table.get("age", np.full(n_rows, np.nan)), dtype=np.float32)
            group.create_dataset(name, data=values)
        else:
            values = table.get(name, np.full(n_rows, "", dtype=object))
            group.create_dataset(name, data=np.asarray([str(v) for v in values], dtype=object), dtype=_STR)


def read_metadata(path) -> dict | None:
    """The cache's per-row sex, age, view and study_id (missing: "", NaN, "", ""); None for a
    version-1 cache made before the group was written (`no_metadata_reason` says what to do)."""
    with open_cache(path) as f:
        if METADATA not in f:
            if f.attrs.get("schema_version") == 2:
                raise _damaged(path, f"the {METADATA} group is missing")
            return None
        group = f[METADATA]
        missing = [name for name in METADATA_DATASETS if name not in group]
        if missing:
            raise _damaged(path, f"metadata datasets missing: {missing}")
        metadata = {name: group[name][()] for name in METADATA_DATASETS}
    for name in ("sex", "view", "study_id"):
        metadata[name] = _decoded(metadata[name])
    return metadata


def no_metadata_reason(path) -> str:
    """One line for a cache whose `read_metadata` is None: why, and how to add the group."""
    return (f"{path} holds no per-row metadata (sex, age, view, follow-up); extract records them in every cache "
            f"it makes now: for one it made before, rerun the extract command that made it (same --data-dir, --cache "
            f"and settings), which adds them from its label CSV ({_source_csv_name(path) or 'none recorded'}, sha256 "
            f"checked) and embeds no image again")


def _source_csv_name(path) -> str:
    with open_cache(path) as f:
        return str(_plain(f.attrs.get("source_csv", "")))


def add_metadata(path, table: dict) -> None:
    """Give a version-1 cache made before the metadata group its group, from `table` (the rows
    the same settings read again: same image ids in the same order, else CacheError). The
    caller holds `exclusive_lock(path)`; like a merge, the group is written into a copy that
    replaces the cache atomically, so a kill leaves the old file or the new one."""
    path = real_path(path)
    with open_cache(path) as f:
        if METADATA in f:
            return
        stored_ids = _decoded(f["image_id"][()])
    given_ids = np.asarray(table["image_id"], dtype=object)
    if len(stored_ids) != len(given_ids) or not np.array_equal(stored_ids, given_ids):
        raise CacheError(f"{path}: its rows differ from the ones the label CSV gives now, so its metadata cannot be "
                         f"added; extract a new cache")
    need = path.stat().st_size + (1 << 16) + 64 * len(stored_ids)
    if shutil.disk_usage(path.parent).free < need:
        raise disk_full_error(path, where=path.parent, doing="adding the metadata group", need=need)
    tmp = path.with_name(path.name + ".metadata")
    with _removed_on_failure(tmp, cache=path, doing="adding the metadata group"):
        shutil.copyfile(path, tmp)
        _reserve(tmp, need)
        with h5py.File(tmp, "r+") as f:
            _write_metadata(f, table, len(stored_ids))
        _durable_replace(tmp, path)


def _decoded(values) -> np.ndarray:
    return np.array([v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v)
                     for v in np.ravel(values)], dtype=object)


def _durable_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------------------------
# Full disks: one clear error, nothing half-written left behind


def _is_disk_full(err: OSError) -> bool:
    # HDF5 reports a failed write as a plain OSError whose text carries the C errno.
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024


def finished_size(path) -> int:
    """Bytes the cache file will take once every row is done (its features fully written)."""
    path = real_path(path)
    with h5py.File(path, "r") as f:
        features = f["features"]
        written = features.id.get_storage_size()
        full = features.shape[0] * features.shape[1] * features.dtype.itemsize
    return max(path.stat().st_size - written, 0) + full


def disk_full_error(cache, *, where: Path, doing: str, need: int | None = None) -> DiskFull:
    """The one-line DiskFull for `cache`: where space ran out, what is free, what the cache
    needs, and how to carry on on another disk."""
    cache = real_path(cache)
    free = shutil.disk_usage(where if where.is_dir() else where.parent).free
    asked = f"; this step needs {_size(need)}" if need else ""
    if not cache.exists():
        return DiskFull(f"no space left on device at {where} while {doing} ({_size(free)} free{asked}); "
                        f"free space there, or give --cache a path on a disk with room")
    try:
        total = (f"; the finished cache needs about {_size(finished_size(cache))}, and merging part files "
                 f"needs room for one more copy of it")
    except (OSError, KeyError):
        total = ""
    return DiskFull(
        f"no space left on device at {where} while {doing} ({_size(free)} free{asked}{total}); the cache is "
        f"intact: free space and rerun, or resume elsewhere by copying {cache} and {parts_dir(cache)}/ to a "
        f"disk with room and rerunning extract with --cache set to the copy")


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, *, cache: Path, doing: str):
    """Delete the kit's own temporary file `tmp` if the block fails; turn ENOSPC into DiskFull."""
    try:
        yield
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and _is_disk_full(err):
            raise disk_full_error(cache, where=tmp.parent, doing=doing) from None
        raise


def _unreadable(path: Path, err: OSError) -> CacheError:
    # Advise deleting only what looks like a damaged cache: any other file may be the user's.
    try:
        looks_hdf5 = h5py.is_hdf5(path)
    except OSError:
        looks_hdf5 = False
    if not looks_hdf5:
        return CacheError(f"{path} is not an HDF5 file, so not a cache: pass the .h5 file that extract "
                          f"wrote, or another --cache path")
    return CacheError(f"{path} is a damaged HDF5 file ({_one_line(err)}); if extract made it, delete it "
                      f"and rerun extract")


@contextlib.contextmanager
def open_cache(path):
    """The cache as a read-only h5py.File; CacheError if it is missing, not HDF5, or an HDF5
    file that is not a cxr14-kit cache (no schema_version attribute)."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"no cache at {path}: run `python -m extract --data-dir DIR --split all --cache {path}` first")
    if path.is_dir():
        raise CacheError(f"{path} is a folder, not a cache: pass the .h5 file that extract wrote")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise _unreadable(path, err) from None
    with handle:
        if "schema_version" not in handle.attrs:
            raise CacheError(f"{path} is an HDF5 file but not a cxr14-kit cache (no schema_version attribute)")
        yield handle


def _damaged(path, what: str) -> CacheError:
    return CacheError(f"{path}: {what}; run `python -m cache verify {path}` for the full report")


def read_attrs(path) -> dict:
    """The cache's attributes as plain Python values (JSON attributes decoded). Raises
    CacheError if an attribute the contract needs is missing or unreadable."""
    with open_cache(path) as f:
        attrs = _decode_attrs(path, f.attrs)
    missing = [key for key in (*FINGERPRINT_KEYS, "fingerprint") if key not in attrs]
    if missing:
        raise _damaged(path, f"attributes missing: {missing}")
    return attrs


def _decode_attrs(path, raw) -> dict:
    attrs = {}
    for key, value in raw.items():
        try:
            value = _plain(value)
        except UnicodeDecodeError:
            raise _damaged(path, f"attribute {key} is not UTF-8 text") from None
        if key in ("preprocessing", "versions") and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise _damaged(path, f"attribute {key} is not valid JSON") from None
        attrs[key] = value
    return attrs


def read_table(path) -> dict:
    """Every per-row dataset except `features`, as numpy arrays (strings decoded). Raises
    CacheError if a dataset is missing."""
    with open_cache(path) as f:
        missing = [name for name in ROW_DATASETS if name not in f]
        if missing:
            raise _damaged(path, f"datasets missing: {missing}")
        table = {name: f[name][()] for name in ROW_DATASETS}
    for name in ("image_id", "split", "error"):
        table[name] = _decoded(table[name])
    if table["patient_id"].dtype.kind in "OS":  # version 2: the dataset's own ids, as strings
        table["patient_id"] = _decoded(table["patient_id"])
    return table


def read_features(path, rows_by_name: dict, *, block_rows: int = 8192) -> dict:
    """float32 features for several row sets in one sequential pass over the file.

    `rows_by_name` maps a name (e.g. a split) to row indices in any order; each result keeps
    that order. Reading whole blocks and selecting in memory is much faster than h5py's fancy
    indexing, and peak memory stays at the float32 result plus one block."""
    order = {name: np.argsort(rows, kind="stable") for name, rows in rows_by_name.items()}
    sorted_rows = {name: np.asarray(rows)[order[name]] for name, rows in rows_by_name.items()}
    with open_cache(path) as f:
        if "features" not in f:
            raise _damaged(path, "datasets missing: ['features']")
        features = f["features"]
        n_rows, dim = features.shape
        beyond = [name for name, rows in sorted_rows.items() if len(rows) and not 0 <= rows[0] <= rows[-1] < n_rows]
        if beyond:  # np.empty below would hand back uninitialised memory for those rows
            raise _damaged(path, f"features has {n_rows} rows, fewer than the rows asked for ({beyond[0]})")
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
    """The folder of part files of the cache at `path` (next to the real file, links resolved)."""
    path = real_path(path)
    return path.with_name(path.name + ".parts")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


# A part being written: <tag>-<host>-<pid>-<ms>-<count>.tmp. The host and pid name its writer,
# so that a later run can prove a leftover temp file belongs to a dead process of the kit.
_TEMP_PART = re.compile(r"^(?P<tag>[A-Za-z0-9]+)-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-\d+-\d{6}\.tmp$")
PART_KEYS = ("rows", "features", "failed_rows", "failed_reasons", "fingerprint")


class PartWriter:
    """Appends finished rows to numbered .npz part files next to the cache. Each part is
    written to a temporary name and renamed, so a killed process leaves only whole parts."""

    def __init__(self, cache_path, *, fingerprint: str, tag: str = "r0"):
        self.cache_path = real_path(cache_path)
        self.directory = parts_dir(cache_path)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.prefix = f"{re.sub(r'[^A-Za-z0-9]', '', tag) or 'r'}-{_host()}-{os.getpid()}-{int(time.time() * 1000)}"
        self.count = 0

    def write(self, *, rows, features, failed_rows=(), failed_reasons=()) -> list:
        """Write one part. Rows whose features are not finite become failed rows (reason
        NON_FINITE_REASON), so they are embedded again by a rerun; returns those as
        (row, reason) pairs. Raises DiskFull, leaving no partial file, when the disk is full."""
        rows = np.asarray(rows, np.int64)
        features = np.asarray(features)
        failed_rows = np.asarray(failed_rows, np.int64)
        failed_reasons = [safe_text(reason) for reason in failed_reasons]
        rows, features, non_finite = split_non_finite(rows, features)
        if len(non_finite):
            failed_rows = np.concatenate([failed_rows, non_finite])
            failed_reasons += [NON_FINITE_REASON] * len(non_finite)
        if len(rows) == 0 and len(failed_rows) == 0:
            return []
        final = self.directory / f"{self.prefix}-{self.count:06d}.npz"
        tmp = final.with_suffix(".tmp")
        with _removed_on_failure(tmp, cache=self.cache_path, doing="writing a part file"):
            with open(tmp, "wb") as handle:
                np.savez(handle, rows=rows, features=features, failed_rows=failed_rows,
                         failed_reasons=np.asarray(failed_reasons, dtype=str),
                         fingerprint=np.asarray(self.fingerprint))
            os.replace(tmp, final)
        self.count += 1
        return [(int(row), NON_FINITE_REASON) for row in non_finite]


def split_non_finite(rows: np.ndarray, features: np.ndarray):
    """(finite rows, their features, rows whose features hold NaN or inf)."""
    if len(rows) == 0:
        return rows, features, np.zeros(0, np.int64)
    finite = np.isfinite(features.reshape(len(rows), -1)).all(axis=1)
    if finite.all():
        return rows, features, np.zeros(0, np.int64)
    return rows[finite], features[finite], rows[~finite]


def _part_files(path) -> list[Path]:
    directory = parts_dir(path)
    return sorted(directory.glob("*.npz")) if directory.exists() else []


_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def _bad_part(part: Path, what: str) -> CacheError:
    return CacheError(f"part file {part} is unreadable ({what}); delete it and rerun extract, "
                      f"which embeds its rows again")


def pending_part_rows(path) -> int:
    """Rows sitting in part files that are not merged into the cache yet."""
    total = 0
    for part in _part_files(path):
        try:
            with np.load(part) as data:
                total += len(data["rows"]) + len(data["failed_rows"])
        except _UNREADABLE as err:
            raise _bad_part(part, _one_line(err)) from None
    return total


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def load_part(part: Path, *, n_rows: int, dim: int, fingerprint: str) -> dict:
    """A part file's arrays, checked against the cache it is for; CacheError naming the file
    if it is not a whole, well-formed part of this cache."""
    try:
        with np.load(part) as archive:
            missing = [key for key in PART_KEYS if key not in archive.files]
            if missing:
                raise _bad_part(part, f"lacks {missing}")
            data = {key: archive[key] for key in PART_KEYS}
    except _UNREADABLE as err:
        raise _bad_part(part, _one_line(err)) from None
    if str(data["fingerprint"]) != fingerprint:
        raise CacheError(f"part file {part} was written for another cache (fingerprint differs); delete it")
    rows, features, failed = data["rows"], data["features"], data["failed_rows"]
    problem = _part_shape_problem(rows, features, failed, data["failed_reasons"], dim=dim)
    if problem is None and (_out_of_range(rows, n_rows) or _out_of_range(failed, n_rows)):
        problem = f"row numbers outside 0..{n_rows - 1}"
    if problem:
        raise _bad_part(part, problem)
    return data


def _part_shape_problem(rows, features, failed, reasons, *, dim) -> str | None:
    if rows.ndim != 1 or failed.ndim != 1 or rows.dtype.kind not in "iu" or failed.dtype.kind not in "iu":
        return "row numbers are not a list of integers"
    if len(rows) and (features.shape != (len(rows), dim) or features.dtype.kind != "f"):
        return f"features {features.shape} {features.dtype}, expected ({len(rows)}, {dim}) floats"
    if reasons.shape != failed.shape or reasons.dtype.kind not in "US":
        return "failed_reasons do not match failed_rows"
    return None


def _out_of_range(rows: np.ndarray, n_rows: int) -> bool:
    return bool(len(rows)) and (rows.min() < 0 or rows.max() >= n_rows)


def merge_parts(path) -> int:
    """Fold every part file into the cache atomically; returns the rows merged.

    The caller must hold `exclusive_lock(path)`. Temporary part files that a killed writer of
    this host left behind are removed first. The cache is replaced only by a complete merged
    copy: a damaged part (CacheError) or a full disk (DiskFull) leaves it as it was."""
    path = real_path(path)
    remove_dead_temp_parts(path)
    parts = _part_files(path)
    if not parts:
        return 0
    need = path.stat().st_size + _merge_growth_bound(path, parts)
    if shutil.disk_usage(path.parent).free < need:
        raise disk_full_error(path, where=path.parent, doing="merging part files", need=need)
    tmp = path.with_name(path.name + ".merging")
    merged = 0
    with _removed_on_failure(tmp, cache=path, doing="merging part files"):
        shutil.copyfile(path, tmp)
        _reserve(tmp, need)
        with h5py.File(tmp, "r+") as f:
            fingerprint = _plain(f.attrs["fingerprint"])
            n_rows, dim = f["features"].shape
            for part in parts:
                data = load_part(part, n_rows=n_rows, dim=dim, fingerprint=fingerprint)
                merged += _merge_one(f, data)
        _durable_replace(tmp, path)
    for part in parts:
        part.unlink()
    return merged


def _merge_growth_bound(path: Path, parts: list[Path]) -> int:
    """An upper bound on how much merging `parts` grows the cache: every feature chunk the
    parts touch written in full, plus 64 bytes of string heap per row and 64 KiB of metadata
    (measured: 34-212 KiB above the real growth without the 64 KiB)."""
    touched, n_rows = set(), 0
    with h5py.File(path, "r") as f:
        chunk_rows = f["features"].chunks[0]
        chunk_bytes = chunk_rows * f["features"].shape[1] * f["features"].dtype.itemsize
    for part in parts:
        try:
            with np.load(part) as data:
                rows = np.concatenate([data["rows"], data["failed_rows"]]).astype(np.int64)
        except _UNREADABLE:  # load_part names it when its turn comes
            continue
        touched.update(np.unique(rows // chunk_rows).tolist())
        n_rows += len(rows)
    return len(touched) * chunk_bytes + 64 * n_rows + (1 << 16)


def _reserve(tmp: Path, size: int) -> None:
    """Allocate `size` bytes for the merged copy before HDF5 writes into it: HDF5 meeting a
    full disk mid-write can crash the process (measured: a segmentation fault on a full
    tmpfs) instead of raising, so the disk must fill here, where it is a clean ENOSPC."""
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: go on
            raise
    finally:
        os.close(fd)


def _merge_one(f: h5py.File, data: dict) -> int:
    rows = data["rows"].astype(np.int64)
    # Cast to the stored dtype before the finite check: float32 beyond 65504 overflows float16.
    with np.errstate(over="ignore"):  # an overflow becomes inf, which the next line catches
        features = data["features"].astype(f["features"].dtype, copy=False)
    rows, features, non_finite = split_non_finite(rows, features)
    order = np.argsort(rows)
    rows, features = rows[order], features[order]
    for lo, hi in _contiguous_runs(rows):
        f["features"][rows[lo]:rows[hi - 1] + 1] = features[lo:hi]
        f["done"][rows[lo]:rows[hi - 1] + 1] = True
        f["error"][rows[lo]:rows[hi - 1] + 1] = np.full(hi - lo, "", dtype=object)
    failed = [*zip(data["failed_rows"].tolist(), data["failed_reasons"].tolist()),
              *((row, NON_FINITE_REASON) for row in non_finite.tolist())]
    for row, reason in failed:
        f["done"][row] = False
        f["error"][row] = safe_text(reason.decode("utf-8", "backslashreplace") if isinstance(reason, bytes) else reason)
    return len(rows) + len(failed)


def _contiguous_runs(sorted_rows: np.ndarray):
    """(lo, hi) index pairs of runs of consecutive row numbers, so each run is one slice write."""
    if len(sorted_rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    bounds = np.concatenate([[0], breaks, [len(sorted_rows)]])
    return list(zip(bounds[:-1], bounds[1:]))


def remove_dead_temp_parts(path) -> list[Path]:
    """Delete the temporary part files in the cache's parts folder that the kit can prove are
    its own and abandoned: the name pattern of PartWriter, this host, a writer pid no longer
    alive. Anything else is left alone. Returns what was removed."""
    directory = parts_dir(path)
    removed = []
    for tmp in sorted(directory.glob("*.tmp")) if directory.exists() else []:
        match = _TEMP_PART.match(tmp.name)
        if match and match["host"] == _host() and not _pid_alive(int(match["pid"])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


# ---------------------------------------------------------------------------------------------
# The writer lock

# Lock files this process holds. POSIX record locks are per process: a second lockf from this
# process would succeed, and closing its descriptor would drop the first one's lock.
_HELD = set()
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def exclusive_lock(path, *, purpose: str = "extract"):
    """Hold the writer lock of `path` (a cache, or a search folder's database), on the real
    file behind any symlink, so every alias of it shares one lock.

    A POSIX record lock (`lockf`): the kernel drops it when its process dies, even by SIGKILL,
    and fork children (DataLoader workers) do not inherit it, so no crash leaves a stale lock."""
    path = real_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with _HELD_GUARD:
        if lock_path in _HELD:
            raise _lock_refusal(path, purpose, holder=f"pid {os.getpid()}, this process")
        _HELD.add(lock_path)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)  # this process holds no lock on the file, so closing releases nothing
            raise _lock_refusal(path, purpose, holder=holder) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock
    finally:
        with _HELD_GUARD:
            _HELD.discard(lock_path)


def _lock_refusal(path: Path, purpose: str, *, holder: str) -> CacheError:
    return CacheError(
        f"another {purpose} process ({holder}) is writing {path}; wait for it to finish, "
        f"or give this one another {'--cache' if purpose == 'extract' else '--out'}")
