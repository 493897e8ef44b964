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
created, fingerprint: the sha256 hex digest of the UTF-8 bytes of
`json.dumps({key: value for key in FINGERPRINT_KEYS}, sort_keys=True)` (Python's defaults:
separators ", " and ": ", non-ASCII as \\uXXXX; arrays as lists), i.e. over every setting
that decides which rows exist and what their features are.

`preprocessing` (JSON, `Encoder.recipe()` in extract/encoders.py) is the image-to-feature
recipe: decode (how a PNG becomes gray in [0, 1]), resize (size, interpolation; whole image,
never cropped), channels (gray replicated to 3, or 1), value_range ([low, high] the gray
[0, 1] is scaled to: [0, 1], or [-1024, 1024] for torchxrayvision), normalize_mean and
normalize_std (per channel, after scaling), layers (--layers as given; [] = the encoder's
own pooled output), blocks (what each concatenated block is, in feature order: "pooled",
module names, "block-K" for hf: last:K, "last_hidden_state", or "features" for xrv:),
block_dims (each block's width; they sum to feature_dim) and pooling ("cls" | "mean" |
"cls+mean": how transformer tokens are pooled; feature maps are always averaged over space).
`encoder_warning` is "" or a caveat the encoder carries (torchxrayvision's weights saw the
official test images); it is informational, outside the fingerprint. `versions` also names
timm / transformers / torchxrayvision when the encoder used them.

Invariants every reader checks (`check_readable`, also run by `python -m cache verify`):
schema_version is SCHEMA_VERSION; every dataset, every FINGERPRINT_KEYS attribute and the
fingerprint are present; the fingerprint matches; every row dataset has N rows and
`features` is (N, feature_dim) of feature_dtype; labels are 0/1; split names are
train/val/test; no patient is in two splits.
`verify` also checks that every done row's features are finite.

Crash safety: the HDF5 file is never modified in place. Extraction appends finished batches
to small part files in `<cache>.parts/`; merging copies the file, writes the parts into the
copy and atomically renames it over the original. A SIGKILL at any moment leaves either the
old or the new file, plus parts that a rerun merges. A cache reached through a symlink is
locked and replaced at its real path, the link kept. The writer lock is a POSIX record lock
on `<cache>.lock`: it dies with its process, and forked workers never hold it.

Writers: a row whose embedding is not finite (as stored: float16 overflow counts) is a
failed row, like a bad image: not done, its reason in `error`. Reasons are stored as UTF-8,
with what cannot be encoded backslash-escaped. A full disk raises DiskFull with the cache
intact; space for a merge is reserved before HDF5 writes, since HDF5 can crash on ENOSPC.
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

DEFAULT_CACHE = "outputs/cache/resnet50-224.h5"

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
