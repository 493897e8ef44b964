"""Tiny caches of several "datasets" with a known answer, for heads.evaluate and heads.transfer.

Every dataset names its classes its own way (NIH, CheXpert, PadChest spellings), and a class's
signal sits on the feature column of its SHARED name (cache/vocabulary.py), shifted by
`separation` on positives: a head trained anywhere finds it at the same place, with AUC
Phi(separation / sqrt 2) (cache.synthetic.known_auc). A planted shift `rotate={class: angle}`
moves part of that class's signal onto a column no class uses: heads trained elsewhere still
read only cos(angle) of it, AUC Phi(cos(angle) separation / sqrt 2), while the dataset's own
head reads both columns and keeps the full AUC.
"""
from __future__ import annotations

import math

import numpy as np

from cache.store import PartWriter, create_cache, exclusive_lock, merge_parts, read_attrs
from cache.synthetic import known_auc
from cache.vocabulary import SHARED, shared_name

DIM = len(SHARED) + 4  # a column per shared name, and spare ones for rotated signal
SPARE = len(SHARED)
ROWS = {"train": 600, "val": 300, "test": 600}
CLASSES = {"nih": ["Effusion", "Cardiomegaly", "Nodule", "Hernia"],
           "chexpert": ["Pleural Effusion", "Cardiomegaly", "Edema"],
           "padchest": ["pleural effusion", "cardiomegaly", "nodule", "scoliosis"]}


def write_dataset_cache(path, *, dataset: str, classes=None, rows=None, separation: float = 2.0,
                        rotate: dict | None = None, weights: str = "synthetic-encoder-a", seed: int = 0,
                        unknown: float = 0.0, prevalence: float = 0.3) -> dict:
    """Write a finished cache; returns its row table. `dataset` "nih" writes a version-1 cache
    (no dataset attribute, integer patient ids), any other a version-2 one. Labels and rows
    depend on `seed` only, features also on `weights`: two "encoders" of one dataset share
    every row and label. `unknown`: the fraction of labels stored as 255."""
    classes, rows = list(classes or CLASSES[dataset]), dict(rows or ROWS)
    rng = np.random.default_rng(seed)
    split = np.concatenate([np.full(n, name, dtype=object) for name, n in rows.items()])
    patient = np.arange(len(split)) // 2  # two images per patient, never across splits (even sizes)
    labels = (rng.random((len(split), len(classes))) < prevalence).astype(np.uint8)
    labels[rng.random(labels.shape) < unknown] = 255
    table = {"image_id": [f"{dataset}{i:06d}.png" for i in range(len(split))], "labels": labels, "split": split,
             "patient_id": patient if dataset == "nih" else [f"{dataset}-p{p}" for p in patient]}
    attrs = {"classes": classes, "backbone": "synthetic-gaussian", "weights": weights, "weights_sha256": "",
             "image_size": 0, "precision": "fp32", "preprocessing": {"none": True}, "val_fraction": 0.0,
             "split_seed": seed, "split_source": "synthetic", "source_csv": "", "source_csv_sha256": "",
             "split_lists_sha256": ""}
    if dataset != "nih":
        attrs.update(dataset=dataset, views="n/a", uncertain="n/a", raters="n/a", label_method="n/a")
    create_cache(path, table=table, feature_dim=DIM, feature_dtype="float32", attrs=attrs)
    features = np.random.default_rng([seed, sum(map(ord, weights))]).standard_normal((len(split), DIM))
    positive = (labels == 1).astype(np.float64)
    for c, name in enumerate(classes):
        angle = (rotate or {}).get(name, 0.0)
        column = SHARED.index(shared_name(dataset, name)) if shared_name(dataset, name) in SHARED else SPARE + 1
        features[:, column] += separation * math.cos(angle) * positive[:, c]
        features[:, SPARE] += separation * math.sin(angle) * positive[:, c]
    writer = PartWriter(path, fingerprint=read_attrs(path)["fingerprint"])
    writer.write(rows=np.arange(len(split)), features=features.astype(np.float32))
    with exclusive_lock(path):
        merge_parts(path)
    return table


def planted_auc(separation: float, angle: float = 0.0) -> float:
    """The AUC a head trained on unshifted data gets on a class rotated by `angle`."""
    return known_auc(separation * math.cos(angle))
