"""The caches' done rows as in-memory tensors, one per split, standardized with train statistics.

Features are held in float16, half the memory of float32 (docs/performance.md has the figures).
They are standardized block by block (in place for a float16 cache, in float32 before the cast
for a float32 one), so no float32 copy of the whole matrix ever exists and an affine rescale of
the cache changes nothing; training converts one minibatch at a time.

Labels are float32 1, 0 or NaN where the cache says unknown (255: an uncertain label masked by
the policy, unmentioned, not annotated); the loss leaves unknown entries out and every figure of
a class is computed over the rows where it is known (heads/metrics.py).

Several caches of the same images (e.g. two encoders) load as one matrix whose columns are the
caches' feature blocks side by side, joined by image id; `HeadData.select` picks a subset of
blocks without reading anything again.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import hashlib

import numpy as np
import torch

import cache
from cache.schema import SPLITS, TEST, TRAIN, VAL

# Rows read and standardized per block: a 8192 x 2048 float32 block is 64 MiB, the only
# full-precision memory the loader needs beyond the float16 matrix.
BLOCK_ROWS = 8192
FLOAT16_MAX = float(np.finfo(np.float16).max)
# sha256 of the 25,596 image ids of NIH's official test_list.txt, sorted, joined by newlines
# (tests recompute it from the file when the metadata is at hand). Published figures are
# printed beside a run only when its cache's test split is exactly this list.
NIH_TEST_IDS_SHA256 = "38ca5ef7f756092946f57c1a59faca882ed589a1ab1f72590b45dc06c6d5e1cc"


class HeadsError(Exception):
    """Input or training state that makes a head's numbers meaningless; nothing is written."""


@dataclass
class Split:
    name: str
    image_ids: np.ndarray
    patient_ids: np.ndarray
    features: torch.Tensor  # (n, D) float16, standardized with train mean and std
    labels: torch.Tensor  # (n, C) float32: 1, 0, or NaN where unknown
    metadata: dict | None = None  # the cache's per-row sex, age, view, study_id (None: it has none)
    source: np.ndarray | None = None  # pooled data (heads/pool.py): the dataset of each row

    def __post_init__(self):
        # what the loss reads: targets with unknowns as 0 and the mask that zeroes their terms
        # (None when every label is known, the NIH case, so training pays nothing for it)
        unknown = torch.isnan(self.labels)
        self.known = ~unknown if bool(unknown.any()) else None
        self.targets = torch.nan_to_num(self.labels) if self.known is not None else self.labels

    def __len__(self):
        return len(self.image_ids)


@dataclass
class HeadData:
    splits: dict  # name -> Split
    classes: list
    attrs: dict  # the first cache's attributes (all caches: `caches`)
    feature_mean: torch.Tensor  # (D,) float32, train mean of the raw features
    feature_std: torch.Tensor  # (D,) float32, train std (1 where a feature is constant)
    excluded: dict  # split -> rows not done (in any of the caches)
    caches: list = field(default_factory=list)  # one dict per cache: path, fingerprint, attrs, columns
    blocks: dict = field(default_factory=dict)  # block name -> (first column, end column)
    official_nih: bool = False  # the test split is exactly NIH's official test_list.txt
    pooled: list = field(default_factory=list)  # the datasets pooled row-wise (heads/pool.py), else []

    @property
    def train(self):
        return self.splits[TRAIN]

    @property
    def val(self):
        return self.splits[VAL]

    @property
    def test(self):
        return self.splits["test"]

    @property
    def fingerprints(self) -> list:
        return [entry["fingerprint"] for entry in self.caches]

    def select(self, names) -> "HeadData":
        """The same rows with only the named feature blocks, in the order given. Blocks that are
        adjacent columns come back as a view (no copy); other combinations are copied once."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = [name for name in names if name not in self.blocks]
        if unknown or not names:
            raise HeadsError(f"unknown feature blocks {unknown or names}; the blocks are {list(self.blocks)}")
        spans = [self.blocks[name] for name in names]
        contiguous = all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
        if contiguous:
            columns = slice(spans[0][0], spans[-1][1])
        else:
            columns = torch.cat([torch.arange(lo, hi) for lo, hi in spans])
        splits = {name: replace(split, features=split.features[:, columns]) for name, split in self.splits.items()}
        blocks, start = {}, 0
        for name, (lo, hi) in zip(names, spans):
            blocks[name] = (start, start + hi - lo)
            start += hi - lo
        chosen = [entry for name in names for entry in self.caches if entry["name"] == name]
        caches = [dict(entry, columns=blocks[entry["name"]]) for entry in chosen]
        return replace(self, splits=splits, feature_mean=self.feature_mean[columns],
                       feature_std=self.feature_std[columns], caches=caches, blocks=blocks,
                       attrs=caches[0]["attrs"])


# Train rows are held in a seeded random order, so that a batch can be a contiguous slice of
# the matrix rather than a gather of scattered rows, which is slower per epoch on a CPU.
TRAIN_ORDER_SEED = 0


def load_head_data(cache_paths, *, device="cpu", dtype=np.float16) -> HeadData:
    """Read the done rows of every split from one cache or a list of caches of the same images,
    check them, standardize with train mean/std into float16. Val and test rows keep the
    cache's order; train rows are shuffled once (seeded). Several caches are joined by image
    id: their ids, patients, labels and splits must agree, and a row is used only where every
    cache has it done. `dtype=np.float32` keeps full precision (to measure what float16 costs)."""
    paths = [cache_paths] if isinstance(cache_paths, (str, Path)) else list(cache_paths)
    if not paths:
        raise HeadsError("no cache given; pass --cache PATH")
    if len({str(Path(p).resolve()) for p in paths}) < len(paths):
        raise HeadsError(f"the same cache is given twice in {[str(p) for p in paths]}; give each cache once")
    tables, attrs_list = [], []
    for path in paths:
        cache.check_readable(path)
        attrs_list.append(cache.read_attrs(path))
        tables.append(cache.read_table(path))
        pending = cache.pending_part_rows(path)
        if pending:
            raise HeadsError(f"{path} has {pending} extracted rows not merged yet (an interrupted "
                             f"extract); rerun `python -m extract` with the same settings to finish it")
    for path, attrs, table in zip(paths[1:], attrs_list[1:], tables[1:]):
        _check_same_rows(paths[0], tables[0], attrs_list[0], path, table, attrs)
    table = tables[0]
    done = np.logical_and.reduce([t["done"] for t in tables])
    rows, excluded = _split_rows(table, done, paths)
    dims = [int(a["feature_dim"]) for a in attrs_list]
    matrices, mean, std = _read_standardized(paths, rows, dims, table, attrs_list, dtype=dtype)
    metadata = cache.read_metadata(paths[0])
    splits = {}
    for split in SPLITS:
        splits[split] = Split(
            name=split, image_ids=table["image_id"][rows[split]], patient_ids=table["patient_id"][rows[split]],
            features=torch.from_numpy(matrices.pop(split)).to(device),
            labels=torch.from_numpy(float_labels(table["labels"][rows[split]])).to(device),
            metadata=None if metadata is None else {k: v[rows[split]] for k, v in metadata.items()},
        )
    _check_val_scorable(splits[VAL], paths)
    caches, blocks = _describe_caches(paths, attrs_list, dims)
    return HeadData(splits=splits, classes=list(attrs_list[0]["classes"]), attrs=attrs_list[0],
                    feature_mean=torch.from_numpy(mean), feature_std=torch.from_numpy(std), excluded=excluded,
                    caches=caches, blocks=blocks,
                    official_nih=is_official_nih_test(table["image_id"][table["split"] == TEST]))


def float_labels(labels: np.ndarray) -> np.ndarray:
    """A cache's uint8 labels as float32, its UNKNOWN (255) as NaN."""
    values = labels.astype(np.float32)
    values[labels == cache.UNKNOWN] = np.nan
    return values


def image_ids_sha256(image_ids) -> str:
    """sha256 of a set of image ids: sorted, joined by newlines."""
    return hashlib.sha256("\n".join(sorted(map(str, image_ids))).encode()).hexdigest()


def is_official_nih_test(image_ids) -> bool:
    """True when `image_ids` are exactly NIH's official test list (25,596 images)."""
    return len(image_ids) == 25_596 and image_ids_sha256(image_ids) == NIH_TEST_IDS_SHA256


def _check_same_rows(first_path, first, first_attrs, path, table, attrs) -> None:
    """Two caches join only if they describe the same images identically."""
    if list(attrs["classes"]) != list(first_attrs["classes"]):
        raise HeadsError(f"{path} has other classes than {first_path}; caches to combine must share classes")
    if len(table["image_id"]) != len(first["image_id"]) or not np.array_equal(table["image_id"], first["image_id"]):
        raise HeadsError(f"{path} and {first_path} hold different image ids; combine only caches of the same "
                         f"images (same label CSV, split lists and val fraction)")
    for name, what in (("patient_id", "patient ids"), ("labels", "labels"), ("split", "splits")):
        differ = np.flatnonzero((table[name] != first[name]).reshape(len(table[name]), -1).any(axis=1))
        if len(differ):
            raise HeadsError(f"{path} and {first_path} disagree on the {what} of {len(differ)} images "
                             f"(e.g. {first['image_id'][differ[0]]}); make both caches from the same labels and split")


def _split_rows(table, done, paths) -> tuple[dict, dict]:
    rows, excluded = {}, {}
    for split in SPLITS:
        in_split = table["split"] == split
        rows[split] = np.flatnonzero(in_split & done)
        if split == TRAIN:
            rows[split] = np.random.default_rng(TRAIN_ORDER_SEED).permutation(rows[split])
        excluded[split] = int((in_split & ~done).sum())
        if len(rows[split]) == 0:
            where = paths[0] if len(paths) == 1 else " + ".join(map(str, paths))
            raise HeadsError(f"{where}: no done rows in the {split} split "
                             f"({excluded[split]} not done); run `python -m extract --data-dir DIR --split {split}` with the same settings")
    return rows, excluded


def _read_standardized(paths, rows: dict, dims: list, table, attrs_list, *, dtype) -> tuple[dict, np.ndarray, np.ndarray]:
    """Per split, the matrix of standardized features in `dtype` (caches side by side in
    columns), with the train mean and std of the raw features.

    A cache whose stored values `dtype` holds exactly (float16 features held as float16) is read
    once: raw values go into the matrix and are standardized there. A cache stored in more
    precision than `dtype` (float32 held as float16) is standardized in float32 block by block
    before the cast, which needs its train statistics first: its train rows are read twice.
    Casting raw float32 values to float16 first would clip them at +-65,504 and round away
    whatever varies below a large offset (features x*1000 + 1e6 lose every signal)."""
    plan = _RowPlan(rows)
    matrices = {split: np.empty((len(r), sum(dims)), dtype) for split, r in rows.items()}
    mean, std = np.empty(sum(dims), np.float32), np.empty(sum(dims), np.float32)
    column = 0
    for path, dim, attrs in zip(paths, dims, attrs_list):
        span = slice(column, column + dim)
        exact = np.dtype(attrs["feature_dtype"]).itemsize <= np.dtype(dtype).itemsize
        moments = _Moments(dim)
        for chosen, block in plan.blocks(path, table, train_only=not exact):
            moments.add(block[plan.split_index[chosen] == 0])
            if exact:
                plan.store(matrices, chosen, span, block)
        mean[span], std[span] = moments.mean_std()
        if exact:
            for matrix in matrices.values():
                _standardize_in_place(matrix, span, mean[span], std[span])
        else:
            for chosen, block in plan.blocks(path, table):
                plan.store(matrices, chosen, span, standardized(block, mean[span], std[span]))
        column += dim
    return matrices, mean, std


class _RowPlan:
    """Where each wanted cache row goes (split, row of that split's matrix), visited in file order."""

    def __init__(self, rows: dict):
        self.wanted = np.concatenate([rows[s] for s in SPLITS])
        self.split_index = np.concatenate([np.full(len(rows[s]), i) for i, s in enumerate(SPLITS)])
        self.destination = np.concatenate([np.arange(len(rows[s])) for s in SPLITS])
        self.order = np.argsort(self.wanted, kind="stable")

    def blocks(self, path, table, *, train_only: bool = False):
        """(positions in the plan, float32 features) per block of rows, checked finite."""
        order = self.order[self.split_index[self.order] == 0] if train_only else self.order
        for start in range(0, len(order), BLOCK_ROWS):
            chosen = order[start:start + BLOCK_ROWS]
            block = cache.read_features(path, {"block": self.wanted[chosen]})["block"]
            _check_finite(block, table["image_id"][self.wanted[chosen]], path)
            yield chosen, block

    def store(self, matrices: dict, chosen, columns: slice, block) -> None:
        for index, split in enumerate(SPLITS):
            mine = self.split_index[chosen] == index
            matrices[split][self.destination[chosen[mine]], columns] = block[mine]


class _Moments:
    """Count, mean and sum of squared deviations per column, merged block by block in float64
    (Chan, Golub and LeVeque): exact at any offset, where sum(x^2)/n - mean^2 cancels away the
    variance of features far from zero."""

    def __init__(self, dim: int):
        self.count, self.mean, self.squares = 0, np.zeros(dim), np.zeros(dim)

    def add(self, block: np.ndarray) -> None:
        n = len(block)
        if not n:
            return
        block_mean = block.sum(axis=0, dtype=np.float64) / n
        centre = block_mean.astype(block.dtype)
        # deviations from a float32 centre, so no float64 copy of the block; the centre's own
        # rounding is taken back out exactly: sum((x-c)^2) = sum((x-m)^2) + n (m-c)^2
        squares = np.square(block - centre).sum(axis=0, dtype=np.float64) - n * (block_mean - centre) ** 2
        total = self.count + n
        delta = block_mean - self.mean
        self.mean += delta * n / total
        self.squares += np.maximum(squares, 0.0) + delta ** 2 * self.count * n / total
        self.count = total

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        std = np.sqrt(self.squares / max(self.count, 1))
        # A constant feature (std 0) would divide by zero; leave it centred instead.
        std = np.where(std > 1e-6, std, 1.0)
        return self.mean.astype(np.float32), std.astype(np.float32)


def standardized(block: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(block - mean) / std in float32, in place; a value far outside the train range would
    overflow float16 to inf, so it is held at float16's largest value."""
    block -= mean
    block /= std
    return np.clip(block, -FLOAT16_MAX, FLOAT16_MAX, out=block)


def _standardize_in_place(matrix: np.ndarray, columns: slice, mean: np.ndarray, std: np.ndarray) -> None:
    for start in range(0, len(matrix), BLOCK_ROWS):
        block = matrix[start:start + BLOCK_ROWS, columns].astype(np.float32)
        matrix[start:start + BLOCK_ROWS, columns] = standardized(block, mean, std)


def _check_finite(block: np.ndarray, image_ids, cache_path) -> None:
    bad = ~np.isfinite(block).all(axis=1)
    if bad.any():
        raise HeadsError(f"{cache_path}: {int(bad.sum())} rows have NaN or infinite features "
                         f"(e.g. {list(image_ids[bad][:3])}); `python -m cache verify` and re-extract them")


def _check_val_scorable(val: Split, paths) -> None:
    """Early stopping needs a validation AUC: at least one class with both label values known."""
    if not scorable_classes(val.labels).any():
        raise HeadsError(f"{paths[0]}: no class has both known positive and known negative rows in the val split "
                         f"({len(val)} rows), so no head can be chosen on validation; extract more val rows "
                         f"or make the cache with a larger --val-fraction")


def scorable_classes(labels: torch.Tensor) -> torch.Tensor:
    """(C,) bool: the classes an AUC can be computed for, i.e. with a known positive and a known
    negative."""
    return (labels == 1).any(dim=0) & (labels == 0).any(dim=0)


def classes_without_train_positive(data: HeadData) -> list[str]:
    """Classes the head cannot learn: not one train row has them."""
    return [name for name, n in zip(data.classes, (data.train.labels == 1).sum(dim=0).tolist()) if n == 0]


def scoring_warnings(data: HeadData) -> list[str]:
    """One line per way the choices made on validation may mislead, to say before training:
    validation scores fewer classes than test (early stopping, the grid and the search rank a
    mean over those alone), or a class has no train positive (the head cannot learn it; its
    probabilities mean nothing). Counts only: no test value is ranked or chosen here."""
    lines = []
    val, test = scorable_classes(data.val.labels).tolist(), scorable_classes(data.test.labels).tolist()
    if sum(val) < sum(test):
        missing = [name for name, v, t in zip(data.classes, val, test) if t and not v]
        lines.append(f"validation ({len(data.val)} rows) can score {sum(val)} of the {sum(test)} classes test "
                     f"scores (not {', '.join(missing)}): every choice on validation rests on a mean over "
                     f"{sum(val)} classes; extract more val rows or use a larger --val-fraction")
    absent = classes_without_train_positive(data)
    if absent:
        lines.append(f"no train positive for {', '.join(absent)}: the head cannot learn "
                     f"{'it' if len(absent) == 1 else 'them'}, and its probabilities for "
                     f"{'it' if len(absent) == 1 else 'them'} mean nothing")
    return lines


def _describe_caches(paths, attrs_list, dims) -> tuple[list, dict]:
    caches, blocks, start = [], {}, 0
    for path, attrs, dim in zip(paths, attrs_list, dims):
        name = str(path)
        blocks[name] = (start, start + dim)
        caches.append({"name": name, "path": str(Path(path).resolve()), "fingerprint": attrs["fingerprint"],
                       "attrs": attrs, "columns": (start, start + dim)})
        start += dim
    return caches, blocks
