"""The feature cache: one HDF5 file, the contract between `extract` (its only writer) and
`heads`/`search` (its readers). Every reader goes through the small API re-exported here.

Schema (version 2; version 1, what NIH caches are, is the same without the marked parts).
N rows, one per image the dataset reader kept (for NIH: of the official split lists), in the
reader's order (NIH: sorted by image id); D = feature_dim (2048 for ResNet50); C = len(classes).

    image_id    (N,)   UTF-8 string    the dataset's image id, e.g. "00000001_000.png"
    patient_id  (N,)   int64 (v1) | UTF-8 string (v2: the dataset's own ids, e.g. "patient00001")
    labels      (N, C) uint8           1 / 0 in `classes` order; v2 also UNKNOWN = 255 (masked by
                                       the uncertain policy, unmentioned or not annotated).
                                       NIH "No Finding" is all zeros.
    split       (N,)   UTF-8 string    "train" | "val" | "test" (NIH test = official test_list.txt)
    features    (N, D) float16|float32 pooled backbone embedding; NaN until the row is done
    done        (N,)   bool            true where `features` holds the row's embedding
    error       (N,)   UTF-8 string    "" or why the image could not be embedded
    metadata/   per-row metadata (v2: always; v1: see below), missing = the value given:
      sex       (N,)   UTF-8 string    "M" | "F" | "" (not published, or another value)
      age       (N,)   float32         years at the study; NaN (not published, or implausible by
                                       the reader's documented rule, e.g. above 120)
      view      (N,)   UTF-8 string    "PA" | "AP" | "LATERAL" | the dataset's own spelling | ""
      study_id  (N,)   UTF-8 string    the study / follow-up the image belongs to; ""

File attributes: schema_version, classes, backbone, weights, weights_sha256, image_size,
precision, feature_dim, feature_dtype, preprocessing (JSON), val_fraction, split_seed,
split_source, source_csv, source_csv_sha256, split_lists_sha256, versions (JSON),
created; version 2 also dataset (the reader: chexpert, padchest, ...) and the label policies
views, uncertain, raters, label_method ("n/a" where one does not apply). fingerprint: the
sha256 hex digest of the UTF-8 bytes of `json.dumps({key: value for key in
fingerprint_keys(schema_version)}, sort_keys=True)` (FINGERPRINT_KEYS, plus V2_KEYS in version
2, the ones a cache holds; Python's defaults: separators ", " and ": ", non-ASCII as \\uXXXX; arrays as lists), i.e.
over every setting that decides which rows exist, what their labels mean and what their
features are. A cache whose settings name a `dataset` is written as version 2, else version 1
(NIH caches are unchanged). Class names map onto the shared vocabulary of cache/vocabulary.py.

The metadata group is outside the fingerprint (it decides no row, label or feature), so a
version-1 cache may hold it or not with the same fingerprint: `extract` writes it into every
new NIH cache (Patient Gender, Patient Age, View Position, Follow-up # of the label CSV), and
a rerun of the extract command that made an older NIH cache adds it (`add_metadata`: the same
settings, so the same CSV by its fingerprinted sha256 and the same rows, checked; written into
a copy that atomically replaces the file; no row embedded again). `read_metadata` is None for
a version-1 cache without it, and `no_metadata_reason` is the one line that says so and what to
run; a version-2 cache without it is damaged. VinDr, RSNA and SIIM take sex, age and view from
the DICOM headers (extract/datasets `add_header_metadata`), read once as the cache is created.

`preprocessing` (JSON, `Encoder.recipe()` in extract/encoders/base.py) is the image-to-feature
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
schema_version is 1 or 2; every dataset (v2: and the metadata group), every fingerprinted
attribute and the fingerprint are present; the fingerprint matches; every row dataset (and each
metadata dataset, in whichever version holds the group) has N rows and `features` is
(N, feature_dim) of feature_dtype; labels are 0/1 (v2: or 255); split names are
train/val/test; no patient is in two splits. Unknown labels are sound: the heads leave
them out of the loss and of every figure of their class (heads/data.py).
`verify` also checks that every done row's features are finite, and that metadata/sex holds
only "M", "F" or "" and metadata/age no infinite value.

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
from cache.schema import CLASSES, SPLITS, TEST, TRAIN, UNKNOWN, VAL
from cache.store import (
    FINGERPRINT_KEYS,
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    V2_KEYS,
    CacheError,
    DiskFull,
    PartWriter,
    add_metadata,
    compute_fingerprint,
    create_cache,
    exclusive_lock,
    fingerprint_keys,
    merge_parts,
    no_metadata_reason,
    pending_part_rows,
    read_attrs,
    read_features,
    read_metadata,
    read_table,
)

DEFAULT_CACHE = "outputs/cache/resnet50-224.h5"

__all__ = [
    "CLASSES",
    "SPLITS",
    "TEST",
    "TRAIN",
    "VAL",
    "UNKNOWN",
    "READABLE_VERSIONS",
    "V2_KEYS",
    "fingerprint_keys",
    "read_metadata",
    "no_metadata_reason",
    "add_metadata",
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
