"""Google's expert labels on NIH ChestX-ray14 (Majkowska et al., Radiology 2020): 4,376 NIH
images whose four findings were graded by radiologists and adjudicated, a cleaner reference
than NIH's NLP-mined labels. torchxrayvision ships the file; docs/expert.md describes it.

    experts = load_google2019()            # or load_google2019("google2019.csv.gz")
    reference = expert_reference(experts, image_ids=..., patient_ids=..., splits=...,
                                 classes=..., scores=..., nlp_labels=...)

`expert_reference` scores a run's probabilities against the expert labels for the findings
that map onto NIH classes (NIH_MAPPING), with the AUC against NIH's own labels on the same
images beside it. Only images in NIH's official test list that are also in the cache's test
split make a test figure; the file's other images are in the official train/val list, where a
head may have been trained or chosen, and are counted, never scored.
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cache.schema import TEST
from heads.data import HeadsError
from heads.metrics import auc_per_class, bootstrap_auc, confidence_intervals

FILE_NAME = "google2019_nih-chest-xray-labels.csv.gz"
IMAGE_COLUMN = "Image Index"
SPLIT_COLUMN = "Set Id"
FINDINGS = ("Fracture", "Pneumothorax", "Airspace opacity", "Nodule or mass")
# The file's spellings (compared after stripping spaces, in any case); an empty cell is a
# finding not given.
LABEL_VALUES = {"YES": 1.0, "NO": 0.0, "": math.nan}
# The file's "val" images are Google's validation set, drawn from NIH's train/val list (the
# tests check both sets against test_list.txt and train_val_list.txt).
SET_IDS = {"test": "test", "val": "train_val"}
NIH_IMAGE_ID = re.compile(r"\d{8}_\d{3}\.png")


class Mapping(NamedTuple):
    nih_classes: tuple  # combined by max (probabilities and NLP labels); () = not mapped
    why: str


# Expert finding -> the NIH score it is compared with. A finding is mapped only where NIH has a
# class (or an exact union of classes) with the same meaning: a near match would make the AUC
# measure the mapping as much as the head.
NIH_MAPPING = {
    "Pneumothorax": Mapping(("Pneumothorax",), "the same finding"),
    "Nodule or mass": Mapping(
        ("Nodule", "Mass"),
        "NIH splits the finding by size (a mass is a nodule over 3 cm): the higher of the Nodule and Mass "
        "probabilities, and positive where either NLP label is"),
    "Airspace opacity": Mapping(
        (), "not mapped: NIH has no airspace-opacity class; Consolidation, Infiltration and Pneumonia (and "
            "Edema, Atelectasis) each cover part of it and none equals it, so any combination would be a score "
            "no head was trained to give"),
    "Fracture": Mapping((), "not mapped: NIH has no fracture class"),
}


class ExpertLabelsError(HeadsError):
    """A labels file that cannot serve as Google's expert labels, or cache rows with no image
    to score: one line naming the file, line and column, and what to do."""


def default_path() -> Path:
    """The copy in torchxrayvision's data folder, found without importing torchxrayvision (whose
    import loads torch and scikit-image)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        raise ExpertLabelsError(f"torchxrayvision is not installed, so its copy of {FILE_NAME} is not at hand; "
                                f"pass --labels-csv FILE or install the [xrv] extra (pip install -e '.[xrv]')")
    return Path(spec.origin).parent / "data" / FILE_NAME


def load_google2019(path=None) -> pd.DataFrame:
    """The checked expert labels, one row per image: image_id, official_split ("test" = in NIH's
    test_list.txt, "train_val" = in train_val_list.txt, "" where the file has no Set Id column)
    and the four FINDINGS as float (1, 0, NaN where not given). `path` None: torchxrayvision's
    copy. The table's attrs["path"] names the file read."""
    path = Path(path) if path is not None else default_path()
    raw = _read_csv(path)
    _check_columns(raw, path)
    table = pd.DataFrame({"image_id": _image_ids(raw, path), "official_split": _official_split(raw, path)})
    for finding in FINDINGS:
        table[finding] = _label_column(raw, finding, path)
    _check_one_row_per_image(raw, path)
    table.attrs["path"] = str(path)
    return table


def _read_csv(path: Path) -> pd.DataFrame:
    """The file's cells as stripped text. Read with the csv module rather than pandas, which
    fills a short row with empty cells: here an empty cell means "not given"."""
    if not path.is_file():
        reason = "not a file" if path.exists() else "no such file"
        raise ExpertLabelsError(f"{path}: {reason}; pass --labels-csv with the path of {FILE_NAME}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as handle:
            lines = list(csv.reader(handle))
    except (ValueError, OSError, EOFError, csv.Error) as err:  # ValueError: not UTF-8
        raise ExpertLabelsError(f"{path}: cannot be read as a CSV ({str(err).strip().splitlines()[0]}); "
                                f"pass {FILE_NAME} as torchxrayvision ships it") from None
    if not lines:
        raise ExpertLabelsError(f"{path}: the file is empty; pass {FILE_NAME}")
    header, rows = lines[0], [(number, row) for number, row in enumerate(lines[1:], start=2) if row]
    for number, row in rows:
        if len(row) != len(header):
            raise ExpertLabelsError(f"{path}, line {number}: {len(row)} cells where the header has "
                                    f"{len(header)}; pass {FILE_NAME} as torchxrayvision ships it")
    if not rows:
        raise ExpertLabelsError(f"{path}: no image below the header; pass {FILE_NAME}")
    frame = pd.DataFrame([[cell.strip() for cell in row] for _, row in rows],
                         columns=[name.strip() for name in header])
    frame.index = [number for number, _ in rows]  # the file's line numbers, for the messages
    return frame


def _check_columns(raw: pd.DataFrame, path: Path) -> None:
    missing = [name for name in (IMAGE_COLUMN, *FINDINGS) if name not in raw.columns]
    if missing:
        raise ExpertLabelsError(f"{path}: no column {', '.join(repr(m) for m in missing)} (the columns are "
                                f"{', '.join(repr(c) for c in raw.columns[:20])}); pass {FILE_NAME}")
    twice = [name for name in (IMAGE_COLUMN, *FINDINGS, SPLIT_COLUMN) if list(raw.columns).count(name) > 1]
    if twice:
        raise ExpertLabelsError(f"{path}: the header names column {twice[0]!r} twice; pass {FILE_NAME}")


def _image_ids(raw: pd.DataFrame, path: Path) -> np.ndarray:
    ids = raw[IMAGE_COLUMN].to_numpy(dtype=object)
    bad = [i for i, image_id in enumerate(ids) if not NIH_IMAGE_ID.fullmatch(image_id)]
    if bad:
        raise ExpertLabelsError(f"{path}, line {raw.index[bad[0]]}, column {IMAGE_COLUMN!r}: {ids[bad[0]]!r} is not an "
                                f"NIH image id (like 00000013_008.png)")
    return ids


def _official_split(raw: pd.DataFrame, path: Path) -> np.ndarray:
    if SPLIT_COLUMN not in raw.columns:
        return np.full(len(raw), "", dtype=object)
    values = raw[SPLIT_COLUMN].str.lower()
    bad = np.flatnonzero(~values.isin(list(SET_IDS)))
    if len(bad):
        raise ExpertLabelsError(f"{path}, line {raw.index[bad[0]]}, column {SPLIT_COLUMN!r}: "
                                f"{raw[SPLIT_COLUMN].iloc[bad[0]]!r} is not one of {', '.join(SET_IDS)}")
    return values.map(SET_IDS).to_numpy(dtype=object)


def _label_column(raw: pd.DataFrame, finding: str, path: Path) -> np.ndarray:
    values = raw[finding].str.upper()
    bad = np.flatnonzero(~values.isin(list(LABEL_VALUES)))
    if len(bad):
        raise ExpertLabelsError(f"{path}, line {raw.index[bad[0]]}, column {finding!r}: {raw[finding].iloc[bad[0]]!r} "
                                f"is not YES, NO or empty (not given)")
    return values.map(LABEL_VALUES).to_numpy(dtype=np.float64)


def _check_one_row_per_image(raw: pd.DataFrame, path: Path) -> None:
    """The file's own aggregation rule is one adjudicated row per image: a repeated image is a
    per-reader file or two files joined, whose labels this module would have to vote on."""
    ids = raw[IMAGE_COLUMN]
    repeated = np.flatnonzero(ids.duplicated().to_numpy())
    if len(repeated):
        image_id = ids.iloc[repeated[0]]
        first = ids.index[np.flatnonzero(ids.to_numpy() == image_id)[0]]
        raise ExpertLabelsError(f"{path}, line {ids.index[repeated[0]]}, column {IMAGE_COLUMN!r}: {image_id} is "
                                f"already on line {first}; the file must hold one adjudicated row per image "
                                f"(per-reader labels are not read)")


@dataclass
class FindingAUC:
    """One mapped finding on the scored images: the run's score against the expert labels and
    against NIH's NLP labels, over the same images (those where both labels are known)."""
    finding: str
    nih_classes: tuple
    n_images: int
    n_patients: int
    expert_auc: float | None  # None: not scorable (no known positive or no known negative)
    expert_ci: list
    expert_positive: int
    expert_negative: int
    nlp_auc: float | None
    nlp_ci: list
    nlp_positive: int
    nlp_negative: int
    difference_ci: list  # expert AUC - NLP AUC, from the same patient resamples
    labels_unknown: int  # scored images left out because the expert or NLP label is not known


@dataclass
class ExpertReference:
    labels_file: str
    findings: list  # FindingAUC per mapped finding the run has scores for
    not_evaluated: dict  # finding -> why
    notes: list  # counts of images used and left out, and why
    bootstrap: dict  # resamples, unit, seed, level
    rows: pd.DataFrame = field(repr=False)  # per scored image: ids, and per finding expert_, nlp_, score_

    def to_dict(self) -> dict:
        """Everything but `rows`, for metrics.json (rows belong in a CSV beside it)."""
        content = asdict(self)
        content.pop("rows")
        return content

    def markdown(self) -> str:
        """The findings as a table, then what was not evaluated and the notes."""
        lines = ["| finding | NIH score | images (patients) | expert +/- | AUC vs expert [95% CI] | "
                 "AUC vs NLP labels [95% CI] | expert - NLP [95% CI] |", "|---|---|---|---|---|---|---|"]
        for f in self.findings:
            lines.append(f"| {f.finding} | {_score_text(f.nih_classes)} | {f.n_images} ({f.n_patients}) | "
                         f"{f.expert_positive}/{f.expert_negative} | {_auc_text(f.expert_auc, f.expert_ci)} | "
                         f"{_auc_text(f.nlp_auc, f.nlp_ci)} | {_interval_text(f.difference_ci)} |")
        lines += [""] + [f"- {finding}: {why}" for finding, why in self.not_evaluated.items()]
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _score_text(nih_classes) -> str:
    return nih_classes[0] if len(nih_classes) == 1 else f"max({', '.join(nih_classes)})"


def _interval_text(interval) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if np.isfinite(interval).all() else "-"


def _auc_text(auc, interval) -> str:
    return "not scorable" if auc is None else f"{auc:.3f} {_interval_text(interval)}"


def expert_reference(experts: pd.DataFrame, *, image_ids, patient_ids, splits, classes, scores, nlp_labels,
                     cache_test_is_official: bool = False, n_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> ExpertReference:
    """Score cache rows against the expert labels of `experts` (load_google2019's table).

    image_ids, patient_ids, splits: the cache's rows given (splits: one name per row, or one
    name for all); scores: (n, C) probabilities of `classes`; nlp_labels: (n, C) float, the
    cache's labels (NaN = unknown). A row is scored when the file puts its image in NIH's
    official test list and the cache in its test split; `cache_test_is_official` (the cache's
    test split is exactly test_list.txt: heads.data.HeadData.official_nih) lets a file without
    a Set Id column take the cache's split as the official one."""
    image_ids = np.asarray(image_ids, dtype=object)
    splits = np.broadcast_to(np.asarray(splits, dtype=object), image_ids.shape)
    scores, nlp_labels = np.asarray(scores, dtype=np.float64), np.asarray(nlp_labels, dtype=np.float64)
    classes = list(classes)
    if scores.shape != (len(image_ids), len(classes)) or nlp_labels.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and nlp_labels {nlp_labels.shape} must both be "
                         f"(rows {len(image_ids)}, classes {len(classes)})")
    path = experts.attrs.get("path", "the expert labels")
    cache_row, notes = _scored_rows(experts, image_ids, splits, cache_test_is_official, path)
    matched = experts.iloc[np.flatnonzero(cache_row >= 0)]
    rows = cache_row[cache_row >= 0]
    patients = np.asarray(patient_ids)[rows]
    table = pd.DataFrame({"image_id": image_ids[rows], "patient_id": patients})
    findings, not_evaluated = [], {}
    for finding, mapping in NIH_MAPPING.items():
        absent = [name for name in mapping.nih_classes if name not in classes]
        if not mapping.nih_classes or absent:
            not_evaluated[finding] = mapping.why if not absent else f"the run has no {' or '.join(absent)} score"
            continue
        columns = [classes.index(name) for name in mapping.nih_classes]
        score = scores[rows][:, columns].max(axis=1)
        nlp = label_union(nlp_labels[rows][:, columns])
        expert = matched[finding].to_numpy()
        table[f"expert_{finding}"], table[f"nlp_{finding}"], table[f"score_{finding}"] = expert, nlp, score
        findings.append(_finding_auc(finding, mapping.nih_classes, expert, nlp, score, patients,
                                     n_resamples=n_resamples, seed=seed, level=level))
    notes.append(f"95% CIs: {n_resamples} patient-level bootstrap resamples (seed {seed}) of the scored images' "
                 f"{len(np.unique(patients))} patients; expert and NLP AUCs of a finding use the same resamples")
    return ExpertReference(labels_file=str(path), findings=findings, not_evaluated=not_evaluated, notes=notes,
                           bootstrap={"resamples": n_resamples, "unit": "patient", "seed": seed, "level": level},
                           rows=table)


def label_union(labels: np.ndarray) -> np.ndarray:
    """Per row, 1 where any column is 1, 0 where every column is 0, else NaN (not known)."""
    positive, negative = (labels == 1).any(axis=1), (labels == 0).all(axis=1)
    return np.where(positive, 1.0, np.where(negative, 0.0, np.nan))


def _scored_rows(experts, image_ids, splits, cache_test_is_official: bool, path) -> tuple[np.ndarray, list]:
    """Per file row, the cache row it is scored on (-1: not scored), and the notes counting
    every image left out and why."""
    index = pd.Index(image_ids)
    if not index.is_unique:
        raise ValueError("image ids repeat in the cache rows given")
    position = index.get_indexer(experts["image_id"])
    cache_split = np.full(len(position), "", dtype=object)
    cache_split[position >= 0] = splits[position[position >= 0]]
    in_cache_test = cache_split == TEST
    official_test, split_note = _official_test(experts, in_cache_test, cache_test_is_official, path)
    scored = official_test & in_cache_test
    if not scored.any():
        raise ExpertLabelsError(f"none of the {int(official_test.sum())} official-test images of {path} is among the "
                                f"cache's done test rows; score a cache of NIH ChestX-ray14 with the official test split")
    notes = [split_note, f"{int(scored.sum())} of the official-test images are in the cache's test split and scored"]
    counts = {
        "official-test images are not among the cache rows given (not in the cache, or not extracted)":
            official_test & (position < 0),
        "official-test images are in the cache's train or val split, not scored (the cache's split is not "
        "NIH's official one)": official_test & (position >= 0) & ~in_cache_test,
        "images the file puts in the official train/val list are in the cache's test split, not scored"
        + (" (the file and test_list.txt disagree on them)" if cache_test_is_official else ""):
            ~official_test & in_cache_test,
    }
    notes += [f"{int(rows.sum())} {what}" for what, rows in counts.items() if rows.any()]
    return np.where(scored, position, -1), notes


def _official_test(experts, in_cache_test, cache_test_is_official: bool, path) -> tuple[np.ndarray, str]:
    """Per file row, whether the image is in NIH's official test list, and a note saying how
    that is known: the file's Set Id, or (a file without one) the cache's test split where that
    split is exactly test_list.txt."""
    official = experts["official_split"].to_numpy()
    if (official != "").all():
        official_test = official == "test"
        return official_test, (
            f"{path}: {len(experts)} expert-labelled images, {int(official_test.sum())} in NIH's official test list "
            f"and {int((~official_test).sum())} in the official train/val list; those are never scored as test "
            f"(a head may have been trained or chosen on them)")
    if not cache_test_is_official:
        raise ExpertLabelsError(f"{path} has no {SPLIT_COLUMN!r} column and the cache's test split is not NIH's "
                                f"official test_list.txt, so no image is known to be an official test image; "
                                f"use a cache made from the official lists, or a file with {SPLIT_COLUMN}")
    return in_cache_test, (
        f"{path}: {len(experts)} expert-labelled images and no {SPLIT_COLUMN} column; the {int(in_cache_test.sum())} "
        f"in the cache's test split (NIH's official test_list.txt) are the official-test ones, the others are "
        f"never scored as test")


def _finding_auc(finding, nih_classes, expert, nlp, score, patients, *, n_resamples, seed, level) -> FindingAUC:
    known = np.isin(expert, (0, 1)) & np.isin(nlp, (0, 1))
    labels = np.stack([expert[known], nlp[known]], axis=1)
    both = np.stack([score[known], score[known]], axis=1)
    aucs = auc_per_class(labels, both)
    intervals, difference = [[math.nan, math.nan]] * 2, [math.nan, math.nan]
    if any(auc is not None for auc in aucs):
        resampled = bootstrap_auc(labels, both, patients[known], n_resamples=n_resamples, seed=seed)
        intervals = confidence_intervals(resampled, level=level)["per_class"]
        if None not in aucs:
            difference = confidence_intervals(resampled[:, :1] - resampled[:, 1:], level=level)["per_class"][0]
    return FindingAUC(
        finding=finding, nih_classes=tuple(nih_classes), n_images=int(known.sum()),
        n_patients=len(np.unique(patients[known])),
        expert_auc=aucs[0], expert_ci=intervals[0], expert_positive=int((labels[:, 0] == 1).sum()),
        expert_negative=int((labels[:, 0] == 0).sum()),
        nlp_auc=aucs[1], nlp_ci=intervals[1], nlp_positive=int((labels[:, 1] == 1).sum()),
        nlp_negative=int((labels[:, 1] == 0).sum()),
        difference_ci=difference, labels_unknown=int((~known).sum()))
