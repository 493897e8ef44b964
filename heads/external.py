"""A trained head scored on another cache: the library of `heads.evaluate` and `heads.transfer`.

Design. A run's head is fixed: nothing is chosen on the target, so its train and val rows are
never read with --split test. The target's features go through the run's own train
standardisation (head.pt) and the float16 rounding training used, so a run scored on its own
cache reproduces its predictions_test.csv. The run's classes and the target's meet through the
shared label vocabulary (cache/vocabulary.py); a pair is named on both sides, e.g.
`Effusion (NIH) vs Pleural Effusion (CheXpert)`, and each class is scored over the rows where
the target knows its label. The evaluation folder has the files heads.compare reads from a run:

    predictions_test.csv  image_id, patient_id, label_<class>, prob_<class> (target class names;
                          an unknown label is an empty cell): every figure recomputes from it
    metrics.json          per-class AUC with patient-bootstrap CIs, the mean and the classes it
                          averages, n_pos / n_neg / n_unknown, the class pairs, the source run,
                          the target cache (path, fingerprint, split); `val`: the SOURCE run's
                          validation AUCs of the classes evaluated, which heads.compare chooses
                          its reference by (no target row takes part in any choice)
    config.json           the source run's settings and the target cache's recipe, as a run's
    roc_curves.png        one ROC panel per class pair
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import torch

import cache
from cache.vocabulary import mapping
from heads.data import Split, standardized
from heads.fit import predict_proba
from heads.metrics import auc_per_class, bootstrap_auc, confidence_intervals, mean_auc, plot_roc_curves
from heads.operating import write_operating_report
from heads.predict import PredictError, read_checkpoint, read_run
from heads.report import recipe_marks, write_json, write_predictions

# What decides what a feature means: two caches agreeing on these hold the same encoder's
# features (precision and storage dtype only round them).
RECIPE_KEYS = ("backbone", "weights", "weights_sha256", "image_size", "preprocessing", "feature_dim")
DATASET_NAMES = {"nih": "NIH", "chexpert": "CheXpert", "mimic": "MIMIC-CXR", "padchest": "PadChest",
                 "vindr": "VinDr-CXR", "rsna": "RSNA", "siim": "SIIM"}
SPLIT_CHOICES = ("test", "all")
# heads.compare's default seed: its per-run intervals on these predictions draw the same patients
BOOTSTRAP_SEED = 0


class ExternalError(Exception):
    """A run and a cache that cannot be scored together; one line naming what and what to do."""


def dataset_of(attrs: dict) -> str:
    """The reader that made a cache; a version-1 cache (no `dataset` attribute) is NIH."""
    return attrs.get("dataset") or "nih"


def dataset_title(dataset: str) -> str:
    if "+" in dataset:  # a pooled run
        return "pooled " + " + ".join(DATASET_NAMES.get(part, part) for part in dataset.split("+"))
    return DATASET_NAMES.get(dataset, dataset)


def recipe_differences(expected: dict, found: dict) -> list[str]:
    """The RECIPE_KEYS on which two caches' attributes differ."""
    return [key for key in RECIPE_KEYS if _recipe_value(expected, key) != _recipe_value(found, key)]


def _recipe_value(attrs: dict, key: str):
    value = attrs.get(key)
    if key == "preprocessing" and isinstance(value, str):  # HDF5 keeps it as JSON text
        value = json.loads(value)
    return value


@dataclass(frozen=True)
class ClassPair:
    source: str  # the run's class name
    target: str  # the target cache's class name
    shared: str  # their shared vocabulary name

    def text(self, *, source_dataset: str, target_dataset: str) -> str:
        return f"{self.source} ({dataset_title(source_dataset)}) vs {self.target} ({dataset_title(target_dataset)})"


def class_pairs(*, source_dataset, source_classes, target_dataset, target_classes) -> tuple[list, list, list]:
    """(pairs in the target's class order, run classes without counterpart, target classes without
    counterpart), matched through the shared vocabulary."""
    source_by_shared = {shared: own for own, shared in mapping(source_dataset, source_classes).items()}
    target_shared = mapping(target_dataset, target_classes)
    pairs = [ClassPair(source_by_shared[shared], own, shared) for own, shared in target_shared.items()
             if shared in source_by_shared]
    paired_source = {pair.source for pair in pairs}
    return (pairs, [c for c in source_classes if c not in paired_source],
            [c for c in target_classes if target_shared[c] not in source_by_shared])


@dataclass
class SourceRun:
    """A run directory's head, checked (heads.predict's checks), and what it records."""
    path: Path
    config: dict
    recipe: dict  # the cache attributes the head's features were made with
    head: torch.nn.Module
    checkpoint: dict
    val_auc: dict  # class -> the run's validation AUC (None: not scorable or not recorded)

    @property
    def classes(self) -> list:
        return list(self.checkpoint["classes"])

    @property
    def dataset(self) -> str:
        """The dataset the head was trained on; a pooled run's datasets joined by "+" (its classes
        are already shared names, which every dataset's mapping leaves as they are)."""
        pooled = self.config.get("pooled")
        if isinstance(pooled, dict) and pooled.get("datasets"):
            return "+".join(map(str, pooled["datasets"]))
        return dataset_of(self.recipe)

    @property
    def name(self) -> str:
        name = self.config.get("name")
        return name if isinstance(name, str) and name else self.path.resolve().name


def read_source_run(run_dir, *, device="cpu") -> SourceRun:
    """The run's head and records; ExternalError for a folder that is not a single-cache head run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExternalError(f"{run_dir} is not a folder; give a run directory written by heads.train or search")
    try:
        config, recipes = read_run(run_dir)
        head, checkpoint = read_checkpoint(run_dir / "head.pt", device=device)
    except PredictError as err:
        raise ExternalError(str(err)) from None
    if len(recipes) > 1 and "pooled" not in config:  # a pooled run's caches share one recipe
        raise ExternalError(f"{run_dir} joins {len(recipes)} caches side by side; heads.evaluate scores a run on "
                            f"one cache: evaluate a run trained on one cache")
    if checkpoint["in_dim"] != recipes[0]["feature_dim"] or \
            checkpoint.get("cache_fingerprint", recipes[0]["fingerprint"]) != recipes[0]["fingerprint"]:
        raise ExternalError(f"{run_dir}: head.pt and config.json describe different caches; use an untouched "
                            f"run directory")
    return SourceRun(path=run_dir, config=config, recipe=recipes[0], head=head, checkpoint=checkpoint,
                     val_auc=_recorded_val_auc(run_dir))


def _recorded_val_auc(run_dir: Path) -> dict:
    try:
        recorded = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["val"]["auc"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


@dataclass
class Target:
    """The rows of a cache a run is scored on: done rows of the chosen split, labels as float32
    with NaN where the cache says unknown."""
    path: Path
    attrs: dict
    split: str
    image_ids: np.ndarray
    patient_ids: np.ndarray  # as text, as predictions_test.csv writes them
    labels: np.ndarray  # (n, C) float32: 1, 0 or NaN
    features: np.ndarray  # (n, D) float32 as the cache stores them
    rows_not_done: int
    metadata: dict | None = field(default=None)  # per-row sex / age / view (v2), for subgroups

    @property
    def classes(self) -> list:
        return list(self.attrs["classes"])

    @property
    def dataset(self) -> str:
        return dataset_of(self.attrs)


def check_target(path) -> dict:
    """The target cache's attributes, after the structural checks every reader runs."""
    cache.check_readable(path)
    pending = cache.pending_part_rows(path)
    if pending:
        raise ExternalError(f"{path} has {pending} extracted rows not merged yet (an interrupted extract); rerun "
                            f"`python -m extract` with the same settings to finish it")
    return cache.read_attrs(path)


def check_same_recipe(run: SourceRun, attrs: dict, path) -> None:
    differ = recipe_differences(run.recipe, attrs)
    if differ:
        raise ExternalError(f"{path} holds other features than {run.path} was trained on (differ: "
                            f"{', '.join(differ)}); extract the target with the run's encoder recipe")


def check_split(run: SourceRun, attrs: dict, *, split: str) -> None:
    """--split all on a cache the run was trained on (any of a pooled run's) would score the rows
    it was trained and chosen on."""
    trained_on = [entry.get("fingerprint") for entry in run.config.get("caches", [])] + [run.recipe["fingerprint"]]
    if split == "all" and attrs["fingerprint"] in trained_on:
        raise ExternalError(f"--split all on a cache {run.path} was trained on would score its train and val "
                            f"rows; use --split test (the run's own test AUCs), or another dataset's cache")


def check_unseen_patients(run: SourceRun, target: "Target") -> None:
    """Another cache of a dataset the run was trained on may hold, in its test split, patients
    the run trained or chose on (another split seed or val fraction): refused, naming how many.
    The run's own cache must be where config.json says, to be checked against."""
    for entry in run.config.get("caches", []):
        if dataset_of(entry.get("attrs", {})) != target.dataset:
            continue
        source = Path(entry.get("path", ""))
        if not source.is_file():
            raise ExternalError(f"{target.path} is a {dataset_title(target.dataset)} cache, as {source} that "
                                f"{run.path} was trained on; that cache is not there to check that none of the "
                                f"target's patients were in its train or val split: put it back at that path")
        table = cache.read_table(source)
        seen = set(map(str, table["patient_id"][np.isin(table["split"], ["train", "val"])]))
        shared = sorted(seen.intersection(target.patient_ids))
        if shared:
            raise ExternalError(f"{len(shared)} of the patients scored in {target.path} (e.g. {shared[0]}) were in "
                                f"the train or val split of {source}, which {run.path} was trained and chosen on; "
                                f"score it on caches of other datasets, or on its own cache's test split")


def read_target(path, *, split: str) -> Target:
    """The done rows of `split` ("all": every split) of a checked cache."""
    attrs = check_target(path)
    table = cache.read_table(path)
    in_split = np.ones(len(table["split"]), bool) if split == "all" else table["split"] == split
    rows = np.flatnonzero(in_split & table["done"])
    if not len(rows):
        raise ExternalError(f"{path}: no done rows in the {split} split; extract them first")
    features = cache.read_features(path, {"rows": rows})["rows"]
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise ExternalError(f"{path}: {int(bad.sum())} rows have NaN or infinite features; `python -m cache verify "
                            f"{path}` and re-extract them")
    labels = table["labels"][rows].astype(np.float32)
    labels[table["labels"][rows] == cache.UNKNOWN] = np.nan
    metadata = cache.read_metadata(path)
    return Target(path=Path(path), attrs=attrs, split=split, image_ids=table["image_id"][rows],
                  patient_ids=np.asarray([str(p) for p in table["patient_id"][rows]], dtype=object), labels=labels,
                  features=features, rows_not_done=int((in_split & ~table["done"]).sum()),
                  metadata=None if metadata is None else {k: v[rows] for k, v in metadata.items()})


def head_probabilities(run: SourceRun, features: np.ndarray) -> np.ndarray:
    """(n, C) probabilities of the run's head: the run's train standardisation, then float16 as
    the head's own test features were held (heads.data), so its own cache gives its own numbers."""
    features = standardized(features.copy(), run.checkpoint["feature_mean"].cpu().numpy(),
                            run.checkpoint["feature_std"].cpu().numpy())
    return predict_proba(run.head, torch.from_numpy(features.astype(np.float16)))


def score_known(labels: np.ndarray, scores: np.ndarray, patient_ids, *, n_bootstrap: int, seed: int) -> dict:
    """Per class (column): AUC over the rows whose label is known, None when the class has no
    known positive or no known negative; patient-bootstrap 95% CIs from one set of resamples
    for every class (so the mean has one too); counts of positives, negatives and unknowns."""
    aucs = auc_per_class(labels, scores)
    resampled = bootstrap_auc(labels, scores, patient_ids, n_resamples=n_bootstrap, seed=seed)
    return {"auc": aucs, "mean_auc": mean_auc(aucs), "ci95": confidence_intervals(resampled),
            "n_pos": (labels == 1).sum(axis=0).tolist(), "n_neg": (labels == 0).sum(axis=0).tolist(),
            "n_unknown": np.isnan(labels).sum(axis=0).tolist()}


@dataclass
class Evaluation:
    run: SourceRun
    target: Target
    pairs: list
    run_unpaired: list  # the run's classes the target lacks: not evaluated
    target_unpaired: list  # the target's classes the run lacks
    labels: np.ndarray  # (n, P) the target's labels of the pairs
    scores: np.ndarray  # (n, P) the head's probabilities of the pairs
    metrics: dict = field(default_factory=dict)

    @property
    def classes(self) -> list:
        return [pair.target for pair in self.pairs]

    def pair_text(self, pair: ClassPair) -> str:
        return pair.text(source_dataset=self.run.dataset, target_dataset=self.target.dataset)


def evaluate(run: SourceRun, target: Target, *, n_bootstrap: int) -> Evaluation:
    """Score the run's head on the target's rows, class pair by class pair."""
    pairs, run_unpaired, target_unpaired = class_pairs(
        source_dataset=run.dataset, source_classes=run.classes, target_dataset=target.dataset,
        target_classes=target.classes)
    if not pairs:
        raise ExternalError(f"{run.path} ({dataset_title(run.dataset)}: {', '.join(run.classes)}) and {target.path} "
                            f"({dataset_title(target.dataset)}: {', '.join(target.classes)}) share no class in the "
                            f"label vocabulary (cache/vocabulary.py); nothing can be scored")
    probabilities = head_probabilities(run, target.features)
    scores = probabilities[:, [run.classes.index(p.source) for p in pairs]]
    labels = target.labels[:, [target.classes.index(p.target) for p in pairs]]
    evaluation = Evaluation(run=run, target=target, pairs=pairs, run_unpaired=run_unpaired,
                            target_unpaired=target_unpaired, labels=labels, scores=scores)
    evaluation.metrics = evaluation_metrics(evaluation, n_bootstrap=n_bootstrap)
    return evaluation


def evaluation_metrics(evaluation: Evaluation, *, n_bootstrap: int) -> dict:
    """metrics.json's content (see the module docstring)."""
    run, target, classes = evaluation.run, evaluation.target, evaluation.classes
    scored = score_known(evaluation.labels, evaluation.scores, target.patient_ids, n_bootstrap=n_bootstrap,
                         seed=BOOTSTRAP_SEED)
    by_class = {key: dict(zip(classes, scored[key])) for key in ("auc", "n_pos", "n_neg", "n_unknown")}
    val = {pair.target: run.val_auc.get(pair.source) for pair in evaluation.pairs}
    val_scored = [value for value in val.values() if isinstance(value, (int, float))]
    return {
        "kind": "evaluation",
        "source_run": {"path": str(run.path.resolve()), "name": run.name,
                       "dataset": run.dataset, "cache": run.config.get("cache"),
                       "cache_fingerprint": run.recipe["fingerprint"]},
        "target": {"cache": str(target.path.resolve()), "fingerprint": target.attrs["fingerprint"],
                   "dataset": target.dataset, "split": target.split, "rows": len(target.image_ids),
                   "patients": len(np.unique(target.patient_ids)), "rows_not_done": target.rows_not_done},
        "pairs": [{"source_class": p.source, "target_class": p.target, "shared": p.shared,
                   "pair": evaluation.pair_text(p)} for p in evaluation.pairs],
        "not_evaluated": {"run_classes_without_counterpart": evaluation.run_unpaired,
                          "target_classes_without_counterpart": evaluation.target_unpaired},
        "test": {**by_class, "mean_auc": scored["mean_auc"],
                 "mean_over": [c for c in classes if by_class["auc"][c] is not None],
                 "not_scorable": [c for c in classes if by_class["auc"][c] is None],
                 "ci95": scored["ci95"], "rows": len(target.image_ids),
                 "bootstrap": {"resamples": n_bootstrap, "unit": "patient", "seed": BOOTSTRAP_SEED},
                 "unknown_labels": "left out of their class's AUC, counts and resamples"},
        "val": {"auc": val, "mean_auc": float(np.mean(val_scored)) if val_scored else None,
                "source": "the source run's own validation split (metrics.json), on the classes evaluated: what "
                          "heads.compare chooses its reference by; no target row is used for any choice"},
    }


def evaluation_config(evaluation: Evaluation, *, run_path=None) -> dict:
    """config.json: what heads.compare reads from a run (settings, the cache and its recipe),
    with the source run's own config kept whole."""
    run, target = evaluation.run, evaluation.target
    recipe = {k: v for k, v in target.attrs.items() if k not in ("versions", "created")}
    return {
        "kind": "evaluation", "model": run.config.get("model", "head"),
        "name": f"{run.name} on {target.path.stem}", "settings": run.config.get("settings", {}),
        "cache": str(target.path.resolve()), "cache_fingerprint": target.attrs["fingerprint"],
        "caches": [{"name": str(target.path), "path": str(target.path.resolve()),
                    "fingerprint": target.attrs["fingerprint"], "columns": [0, int(target.attrs["feature_dim"])],
                    "attrs": recipe}],
        "cache_attrs": recipe, "split": target.split,
        "source_run": {"path": str(Path(run_path or run.path).resolve()), "config": run.config},
    }


def write_evaluation(partial: Path, evaluation: Evaluation, *, run_path=None, by=(), sensitivity=None,
                     n_bootstrap: int = 1000) -> None:
    """Every file of an evaluation folder into `partial`: the AUCs computed by `evaluate`, the
    operating points at thresholds chosen on the SOURCE run's validation predictions (the target
    has no say in any choice), `by` subgroups of the target rows, and the ROC plot. `run_path`:
    where the source run will be (heads.transfer builds it aside, then renames)."""
    metrics = dict(evaluation.metrics)
    marks = recipe_marks([evaluation.run.recipe])
    metrics["operating"] = write_operating_report(
        partial, classes=evaluation.classes, val=source_validation(evaluation),
        test=SimpleNamespace(labels=evaluation.labels, scores=evaluation.scores,
                             patient_ids=evaluation.target.patient_ids, image_ids=evaluation.target.image_ids),
        metadata_test=evaluation.target.metadata, by=by, sensitivity=sensitivity, n_resamples=n_bootstrap,
        seed=BOOTSTRAP_SEED, marks=marks)
    metrics["source_run"] = dict(metrics["source_run"], path=str(Path(run_path or evaluation.run.path).resolve()))
    write_json(partial / "config.json", evaluation_config(evaluation, run_path=run_path))
    write_json(partial / "metrics.json", metrics)
    rows = Split(name="test", image_ids=evaluation.target.image_ids, patient_ids=evaluation.target.patient_ids,
                 features=torch.empty(0), labels=torch.from_numpy(evaluation.labels))
    write_predictions(partial / "predictions_test.csv", rows, evaluation.scores, evaluation.classes)
    test = metrics["test"]
    plot_roc_curves(partial / "roc_curves.png", labels=evaluation.labels, scores=evaluation.scores,
                    classes=[evaluation.pair_text(p) for p in evaluation.pairs],
                    aucs=[test["auc"][c] for c in evaluation.classes], ci=test["ci95"]["per_class"],
                    title=figure_title(evaluation), marks=marks)


def source_validation(evaluation: Evaluation) -> SimpleNamespace:
    """The source run's validation labels and scores of the evaluated classes (its
    predictions_val.csv), where each class's threshold is chosen."""
    from heads.comparison import CompareError, labels_and_scores, read_predictions

    path = evaluation.run.path / "predictions_val.csv"
    try:
        frame, _ = read_predictions(path)
    except CompareError as err:
        raise ExternalError(str(err)) from None
    labels, scores = labels_and_scores(frame, [pair.source for pair in evaluation.pairs])
    return SimpleNamespace(labels=labels, scores=scores, patient_ids=frame["patient_id"].to_numpy())


def figure_title(evaluation: Evaluation) -> str:
    test = evaluation.metrics["test"]
    low, high = test["ci95"]["mean"]
    return (f"run {evaluation.run.name} ({evaluation.run.recipe['backbone']}, {dataset_title(evaluation.run.dataset)})"
            f" scored on {evaluation.target.path.name} ({dataset_title(evaluation.target.dataset)}, "
            f"{evaluation.target.split} rows)\nmean AUC {test['mean_auc']:.3f} [{low:.3f}, {high:.3f}] over "
            f"{len(test['mean_over'])} shared classes")


def format_evaluation(evaluation: Evaluation) -> str:
    """The per-class table and summary printed at the end."""
    test = evaluation.metrics["test"]
    width = max(len(evaluation.pair_text(p)) for p in evaluation.pairs)
    lines = [f"{'class pair':<{width}} {'AUC':>6}  {'95% CI':<16} {'n+':>6} {'n-':>6} {'unknown':>7}"]
    for index, pair in enumerate(evaluation.pairs):
        auc, (low, high) = test["auc"][pair.target], test["ci95"]["per_class"][index]
        cells = (f"{auc:>6.3f}  [{low:.3f}, {high:.3f}]" if auc is not None else f"{'-':>6}  {'not scorable':<16}")
        lines.append(f"{evaluation.pair_text(pair):<{width}} {cells} {test['n_pos'][pair.target]:>6} "
                     f"{test['n_neg'][pair.target]:>6} {test['n_unknown'][pair.target]:>7}")
    low, high = test["ci95"]["mean"]
    mean = f"mean ({len(test['mean_over'])} classes)"
    lines.append(f"{mean:<{width}} {test['mean_auc']:>6.3f}  [{low:.3f}, {high:.3f}]")
    target = evaluation.target
    lines.append(f"\n{len(target.image_ids)} {target.split} rows of {target.path} ({dataset_title(target.dataset)}), "
                 f"{len(np.unique(target.patient_ids))} patients"
                 + (f"; {target.rows_not_done} not done, left out" if target.rows_not_done else ""))
    if test["not_scorable"]:
        lines.append(f"not scorable (no known positive or no known negative), left out of the mean: "
                     f"{', '.join(test['not_scorable'])}")
    if evaluation.run_unpaired:
        lines.append(f"not evaluated (no counterpart in {dataset_title(target.dataset)}): "
                     f"{', '.join(evaluation.run_unpaired)}")
    if evaluation.target_unpaired:
        lines.append(f"{dataset_title(target.dataset)} classes the run lacks: {', '.join(evaluation.target_unpaired)}")
    return "\n".join(lines)
