"""Pooled training: the union of the rows of several datasets' caches, made by one encoder.

`heads.train --pool --cache nih.h5 --cache chexpert.h5` trains one head on every dataset's
train rows together, as torchxrayvision's "all" models are trained. The classes are the union
of the caches' classes under the shared vocabulary (cache/vocabulary.py); a row's label is
unknown (NaN) for a class its dataset does not have, so the loss and every AUC leave it out.
Each dataset keeps its own splits (patients never cross them, and no patient is shared between
datasets), and each split's rows carry the dataset they came from, so that the pooled test is
also reported per dataset. Features are standardized with the mean and std of all the pooled
train rows.

This is not `--cache A --cache B` without --pool, which joins caches of the same images column
by column (two encoders' features side by side).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import cache
from cache.schema import SPLITS, TRAIN
from cache.vocabulary import shared_name
from heads.data import (HeadData, HeadsError, Split, _check_val_scorable, _Moments, _RowPlan, _split_rows,
                        TRAIN_ORDER_SEED, float_labels, standardized)
from heads.external import dataset_of, recipe_differences


def load_pooled_data(cache_paths, *, device="cpu", dtype=np.float16) -> HeadData:
    """Read several datasets' caches as one HeadData whose splits are the union of theirs, in
    the order given; image and patient ids become `dataset:id` (two datasets may use the same
    ids). Refuses caches of different encoder recipes, the same dataset twice, a cache with
    unmerged rows."""
    paths = [Path(p) for p in cache_paths]
    if len(paths) < 2:
        raise HeadsError("--pool needs at least two caches (--cache A.h5 --cache B.h5)")
    attrs_list, tables = [], []
    for path in paths:
        cache.check_readable(path)
        attrs_list.append(cache.read_attrs(path))
        tables.append(cache.read_table(path))
        if cache.pending_part_rows(path):
            raise HeadsError(f"{path} has extracted rows not merged yet; rerun `python -m extract` with the same "
                             f"settings to finish it")
    _check_poolable(paths, attrs_list)
    names = [dataset_of(a) for a in attrs_list]
    classes = _union_classes(names, attrs_list)
    rows = [_split_rows(table, table["done"], [path])[0] for table, path in zip(tables, paths)]
    mean, std = _pooled_moments(paths, tables, rows, int(attrs_list[0]["feature_dim"]))
    metadata = [cache.read_metadata(path) for path in paths]
    splits = {split: _pooled_split(split, paths, tables, rows, names, attrs_list, classes, mean, std, metadata,
                                   dtype=dtype, device=device) for split in SPLITS}
    _check_val_scorable(splits["val"], paths)
    excluded = {split: int(sum(((t["split"] == split) & ~t["done"]).sum() for t in tables)) for split in SPLITS}
    dim = int(attrs_list[0]["feature_dim"])
    entries = [{"name": f"{name}:{path}", "path": str(path.resolve()), "fingerprint": attrs["fingerprint"],
                "attrs": attrs, "columns": (0, dim), "dataset": name}
               for name, path, attrs in zip(names, paths, attrs_list)]
    return HeadData(splits=splits, classes=classes, attrs=attrs_list[0], feature_mean=torch.from_numpy(mean),
                    feature_std=torch.from_numpy(std), excluded=excluded, caches=entries,
                    blocks={"pooled": (0, dim)}, official_nih=False, pooled=names)


def _check_poolable(paths, attrs_list) -> None:
    names = [dataset_of(a) for a in attrs_list]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise HeadsError(f"--pool: two caches of the dataset {repeated[0]}; pool one cache per dataset")
    for path, attrs in zip(paths[1:], attrs_list[1:]):
        differ = recipe_differences(attrs_list[0], attrs)
        if differ:
            raise HeadsError(f"--pool: {path} and {paths[0]} were made by different encoders (they differ in "
                             f"{', '.join(differ)}); pool caches extracted with the same encoder and settings")


def _union_classes(names, attrs_list) -> list[str]:
    classes = []
    for name, attrs in zip(names, attrs_list):
        for label in attrs["classes"]:
            shared = shared_name(name, str(label))
            if shared not in classes:
                classes.append(shared)
    return classes


def _pooled_moments(paths, tables, rows, dim) -> tuple[np.ndarray, np.ndarray]:
    moments = _Moments(dim)
    for path, table, split_rows in zip(paths, tables, rows):
        for _, block in _RowPlan(split_rows).blocks(path, table, train_only=True):
            moments.add(block)
    return moments.mean_std()


def _pooled_split(split, paths, tables, rows, names, attrs_list, classes, mean, std, metadata, *, dtype,
                  device) -> Split:
    parts = {"features": [], "labels": [], "image_ids": [], "patient_ids": [], "source": [], "metadata": []}
    for path, table, split_rows, name, attrs, meta in zip(paths, tables, rows, names, attrs_list, metadata):
        chosen = np.sort(split_rows[split])
        plan = _RowPlan({s: (chosen if s == split else np.empty(0, int)) for s in SPLITS})
        matrix = np.empty((len(chosen), len(mean)), dtype)
        for positions, block in plan.blocks(path, table):
            matrix[plan.destination[positions]] = standardized(block, mean, std)
        parts["features"].append(matrix)
        parts["labels"].append(_labels_in(classes, name, attrs["classes"], table["labels"][chosen]))
        parts["image_ids"].append(np.asarray([f"{name}:{i}" for i in table["image_id"][chosen]], dtype=object))
        parts["patient_ids"].append(np.asarray([f"{name}:{p}" for p in table["patient_id"][chosen]], dtype=object))
        parts["source"].append(np.full(len(chosen), name, dtype=object))
        parts["metadata"].append(None if meta is None else {key: values[chosen] for key, values in meta.items()})
    features = np.concatenate(parts["features"])
    labels = np.concatenate(parts["labels"])
    # train rows in a seeded random order, as heads.data holds them (a batch is a contiguous slice)
    order = (np.random.default_rng(TRAIN_ORDER_SEED).permutation(len(features)) if split == TRAIN
             else np.arange(len(features)))
    # subgroups of a pooled split need every dataset's metadata
    pooled_metadata = (None if any(m is None for m in parts["metadata"]) else
                       {key: np.concatenate([m[key] for m in parts["metadata"]])[order] for key in parts["metadata"][0]})
    return Split(name=split, metadata=pooled_metadata, image_ids=np.concatenate(parts["image_ids"])[order],
                 patient_ids=np.concatenate(parts["patient_ids"])[order],
                 features=torch.from_numpy(features[order]).to(device),
                 labels=torch.from_numpy(labels[order]).to(device), source=np.concatenate(parts["source"])[order])


def _labels_in(classes, name, own_classes, labels) -> np.ndarray:
    """A cache's labels in the pooled class order: NaN where its dataset lacks the class."""
    pooled = np.full((len(labels), len(classes)), np.nan, np.float32)
    values = float_labels(labels)
    for column, label in enumerate(own_classes):
        pooled[:, classes.index(shared_name(name, str(label)))] = values[:, column]
    return pooled

