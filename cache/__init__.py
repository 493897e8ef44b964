"""The feature cache: one HDF5 file, the contract between `extract` (its only writer) and
`heads`/`search` (its readers). Every reader goes through the small API re-exported here.

Schema (version 1). N rows, one per image of the official split lists, sorted by image id;
D = feature_dim (2048 for ResNet50); C = len(classes) (14).

    image_id    (N,)   UTF-8 string    file name, e.g. "00000001_000.png"
    patient_id  (N,)   int64
    labels      (N, C) uint8           multi-hot in `classes` order; "No Finding" is all zeros
    split       (N,)   UTF-8 string    "train" | "val" | "test" (test = official test_list.txt)
    features    (N, D) float16|float32 pooled backbone embedding; NaN until the row is done
    done        (N,)   bool            true where `features` holds the row's embedding
    error       (N,)   UTF-8 string    "" or why the image could not be embedded

File attributes: schema_version, classes, backbone, weights, weights_sha256, image_size,
precision, feature_dim, feature_dtype, preprocessing (JSON), val_fraction, split_seed,
split_source, source_csv, source_csv_sha256, split_lists_sha256, versions (JSON),
created, fingerprint (sha256 over every attribute in FINGERPRINT_KEYS).

Crash safety: the HDF5 file is never modified in place. Extraction appends finished batches
to small part files in `<cache>.parts/`; merging copies the file, writes the parts into the
copy and atomically renames it over the original. A SIGKILL at any moment leaves either the
old or the new file, plus parts that a rerun merges.
"""
from cache.check import check_readable
from cache.schema import CLASSES, SPLITS, TEST, TRAIN, VAL
from cache.store import (
    FINGERPRINT_KEYS,
    SCHEMA_VERSION,
    CacheError,
    DiskFull,
    PartWriter,
    compute_fingerprint,
    create_cache,
    exclusive_lock,
    merge_parts,
    pending_part_rows,
    read_attrs,
    read_features,
    read_table,
)

DEFAULT_CACHE = "outputs/cache/features.h5"

__all__ = [
    "CLASSES",
    "SPLITS",
    "TEST",
    "TRAIN",
    "VAL",
    "DEFAULT_CACHE",
    "FINGERPRINT_KEYS",
    "SCHEMA_VERSION",
    "CacheError",
    "DiskFull",
    "PartWriter",
    "check_readable",
    "compute_fingerprint",
    "create_cache",
    "exclusive_lock",
    "merge_parts",
    "pending_part_rows",
    "read_attrs",
    "read_features",
    "read_table",
]
