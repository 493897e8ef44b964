"""A run directory: everything a report says, and what it takes to recompute it.

    config.json          every resolved setting, the cache and its fingerprint, versions
    metrics.json         per-class val/test AUC, macro means, 95% CIs, best epoch, timing, rows
    per_class_auc.csv    the table printed at the end; published figures beside it only for a
                         cache of the real NIH data with the official test split
    predictions_val.csv  image_id, patient_id, prob_<class> x C, label_<class> x C
    predictions_test.csv (recompute any AUC with sklearn; the CI needs patient_id)
    train_log.jsonl      one line per epoch: loss and validation mean AUC
    head.pt              state dict, settings and standardization (torch.load(weights_only=True))
    roc_curves.png       test ROC curve of every class
    grid.csv             (a grid run) every head of the grid on validation; the chosen one marked
    .cxr14-kit           marker: a run folder the kit wrote, so --overwrite may replace it (cache/outdir.py)

The directory is built under a temporary name and renamed when complete, so a failed run
never leaves something that looks like a result (the folder rules of every command: cache/outdir.py).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from heads.metrics import auc_per_class, bootstrap_auc, confidence_intervals, mean_auc, plot_roc_curves

LITERATURE_NOTE = ("published test AUCs under other protocols, for context only: Wang et al. 2017 "
                   "(ResNet-50, official split), CheXNet (DenseNet-121 fine-tuned, its own split)")


def literature_auc() -> pd.DataFrame:
    with resources.files("heads").joinpath("literature_auc.csv").open() as handle:
        return pd.read_csv(handle).set_index("class")


def evaluate_split(split, scores: np.ndarray) -> dict:
    aucs = auc_per_class(split.labels.cpu().numpy(), scores)
    return {"auc": aucs, "mean_auc": mean_auc(aucs), "rows": len(split),
            "not_scorable": [i for i, a in enumerate(aucs) if a is None]}


def score_run(*, classes, val, val_scores, test, test_scores, fit: dict, n_bootstrap: int, seed: int) -> dict:
    """metrics.json's content: per-class AUCs, means, the test CI from a patient bootstrap."""
    metrics = {"val": evaluate_split(val, val_scores), "test": evaluate_split(test, test_scores), **fit}
    resampled = bootstrap_auc(test.labels.cpu().numpy(), test_scores, test.patient_ids,
                              n_resamples=n_bootstrap, seed=seed)
    metrics["test"]["ci95"] = confidence_intervals(resampled)
    metrics["test"]["bootstrap"] = {"resamples": n_bootstrap, "unit": "patient", "seed": seed}
    if test.source is not None:
        metrics["by_dataset"] = {name: {"val": _dataset_figures(classes, val, val_scores, name),
                                        "test": _dataset_figures(classes, test, test_scores, name,
                                                                 n_bootstrap=n_bootstrap, seed=seed)}
                                 for name in dict.fromkeys(test.source)}
    for name in ("val", "test"):
        metrics[name]["mean_over"] = [c for c, a in zip(classes, metrics[name]["auc"]) if a is not None]
        metrics[name]["auc"] = dict(zip(classes, metrics[name]["auc"]))
        metrics[name]["not_scorable"] = [classes[i] for i in metrics[name]["not_scorable"]]
    return metrics


def _dataset_figures(classes, split, scores, dataset: str, *, n_bootstrap: int = 0, seed: int = 0) -> dict:
    """A pooled split's figures on the rows of one dataset (heads/pool.py): per-class AUCs over
    its known labels, their mean and over which classes, and (given n_bootstrap) the CIs."""
    rows = split.source == dataset
    labels = split.labels.cpu().numpy()[rows]
    aucs = auc_per_class(labels, scores[rows])
    figures = {"rows": int(rows.sum()), "auc": dict(zip(classes, aucs)), "mean_auc": mean_auc(aucs),
               "mean_over": [c for c, a in zip(classes, aucs) if a is not None]}
    if n_bootstrap:
        resampled = bootstrap_auc(labels, scores[rows], split.patient_ids[rows], n_resamples=n_bootstrap, seed=seed)
        figures["ci95"] = confidence_intervals(resampled)
    return figures


def write_run(partial: Path, *, classes, config: dict, metrics: dict, val, val_scores, test, test_scores,
              checkpoint: dict | None, official_nih: bool, tables: dict | None = None) -> None:
    """Write every file of a run into `partial` from what was scored (nothing is computed here
    but the plot)."""
    write_json(partial / "config.json", config)
    write_json(partial / "metrics.json", metrics)
    per_class_table(classes, metrics, official_nih=official_nih).to_csv(partial / "per_class_auc.csv", index=False,
                                                                        float_format="%.4f")
    write_predictions(partial / "predictions_val.csv", val, val_scores, classes)
    write_predictions(partial / "predictions_test.csv", test, test_scores, classes)
    with open(partial / "train_log.jsonl", "w") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in metrics.get("history", []))
    for name, table in (tables or {}).items():
        table.to_csv(partial / name, index=False, float_format="%.6g")
    if checkpoint is not None:
        torch.save(checkpoint, partial / "head.pt")
    test_aucs = [metrics["test"]["auc"][c] for c in classes]
    title, marks = figure_title(config, metrics, official_nih=official_nih)
    plot_roc_curves(partial / "roc_curves.png", labels=test.labels.cpu().numpy(), scores=test_scores,
                    classes=classes, aucs=test_aucs, ci=metrics["test"]["ci95"]["per_class"], title=title, marks=marks)


def _layers(recipe: dict) -> str:
    layers = (recipe.get("preprocessing") or {}).get("layers") if isinstance(recipe.get("preprocessing"), dict) else None
    return f"[{','.join(layers)}]" if layers else ""


def figure_title(config: dict, metrics: dict, *, official_nih: bool) -> tuple[str, list]:
    """(title naming the run: encoders with their weights, caches, head and test mean; its marks,
    `figure_marks`)."""
    recipes = run_recipes(config)
    encoders = " + ".join(f"{r.get('backbone', '?')}{_layers(r)} ({r.get('weights', '?')})" for r in recipes)
    caches = ", ".join(Path(entry["path"]).name for entry in config.get("caches", [])) or Path(config["cache"]).name
    test = metrics["test"]
    title = (f"{encoders}, cache {caches}\n{config.get('model', 'head')}: test mean AUC {test['mean_auc']:.3f} "
             f"[{test['ci95']['mean'][0]:.3f}, {test['ci95']['mean'][1]:.3f}]")
    return title, figure_marks(config, official_nih=official_nih)


def run_recipes(config: dict) -> list:
    """The encoder recipe of each cache of a run's config.json."""
    return [config["cache_attrs"]] + [entry.get("attrs", {}) for entry in config.get("caches", [])[1:]]


def figure_marks(config: dict, *, official_nih: bool) -> list:
    """Red lines that keep a run's figure of random weights, synthetic features or other data
    from passing for a result."""
    marks = recipe_marks(run_recipes(config))
    if not official_nih:
        marks.append("not the official NIH test split")
    return marks


def recipe_marks(recipes: list) -> list:
    """The marks of encoder recipes: random weights, synthetic features."""
    marks = []
    if any(str(r.get("weights", "")).startswith("random(") for r in recipes):
        marks.append("RANDOM ENCODER WEIGHTS: a pipeline test, not a result")
    if any(r.get("backbone") == "synthetic-gaussian" for r in recipes):
        marks.append("SYNTHETIC FEATURES")
    return marks


def write_json(path, content) -> None:
    path.write_text(json.dumps(content, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.tolist() if getattr(value, "ndim", 0) else value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_predictions(path, split, scores: np.ndarray, classes) -> None:
    """Probabilities as float32 written with 9 significant digits: every value reads back
    to the same float32, so AUCs recomputed from the file match metrics.json exactly. Labels
    are 1 or 0, an unknown one an empty cell."""
    frame = pd.DataFrame({"image_id": split.image_ids, "patient_id": split.patient_ids})
    probabilities = pd.DataFrame(scores.astype(np.float32), columns=[f"prob_{c}" for c in classes])
    label_frame = pd.DataFrame(split.labels.cpu().numpy(), columns=[f"label_{c}" for c in classes]).astype("Int8")
    pd.concat([frame, probabilities, label_frame], axis=1).to_csv(path, index=False, float_format="%.9g")


SYNTHETIC_NOTE = ("not the official NIH test split (synthetic or other data): published figures are not "
                  "comparable and are not shown")


def per_class_table(classes, metrics, *, official_nih: bool = False) -> pd.DataFrame:
    """One row per class and one for the mean. The published columns are filled only when
    the cache is the real NIH data with its official test split (`official_nih`)."""
    literature = literature_auc()
    if not official_nih:
        literature = literature * np.nan
    ci = metrics["test"]["ci95"]["per_class"]
    rows = []
    for index, name in enumerate(classes):
        rows.append({
            "class": name, "test_auc": metrics["test"]["auc"][name],
            "ci95_low": ci[index][0], "ci95_high": ci[index][1], "val_auc": metrics["val"]["auc"][name],
            "wang2017_resnet50": literature["wang2017_resnet50"].get(name, np.nan),
            "chexnet2017_densenet121": literature["chexnet2017_densenet121"].get(name, np.nan),
        })
    scored = [name for name in classes if metrics["test"]["auc"][name] is not None]
    rows.append({"class": mean_label(classes, metrics), "test_auc": metrics["test"]["mean_auc"],
                 "ci95_low": metrics["test"]["ci95"]["mean"][0], "ci95_high": metrics["test"]["ci95"]["mean"][1],
                 "val_auc": metrics["val"]["mean_auc"],
                 "wang2017_resnet50": literature["wang2017_resnet50"].reindex(scored).mean(),
                 "chexnet2017_densenet121": literature["chexnet2017_densenet121"].reindex(scored).mean()})
    table = pd.DataFrame(rows)
    table["data"] = "NIH ChestX-ray14, official test split" if official_nih else "not the official NIH test split"
    return table


def mean_label(classes, metrics) -> str:
    """`mean (N classes)` when test and validation average the same classes, else how many each
    averages: with a tiny val split the val mean can rest on far fewer classes than test's."""
    scored = {split: [c for c in classes if metrics[split]["auc"].get(c) is not None] for split in ("test", "val")}
    if scored["test"] == scored["val"]:
        return f"mean ({len(scored['test'])} classes)"
    return f"mean (test {len(scored['test'])}, val {len(scored['val'])})"


def format_table(table: pd.DataFrame) -> str:
    """The table as printed: published columns only where the data is the real NIH test split."""
    def number(value):
        return "   -  " if value is None or pd.isna(value) else f"{value:.3f}"

    official = bool(table["wang2017_resnet50"].notna().any())
    header = f"{'class':<22} {'test AUC':>8}  {'95% CI':<15} {'val AUC':>7}"
    lines = [header + (f"   {'Wang17*':>7} {'CheXNet*':>8}" if official else "")]
    for row in table.itertuples():
        line = f"{row[1]:<22} {number(row.test_auc):>8}  [{number(row.ci95_low)}, {number(row.ci95_high)}]  {number(row.val_auc):>7}"
        if official:
            line += f"   {number(row.wang2017_resnet50):>7} {number(row.chexnet2017_densenet121):>8}"
        lines.append(line)
    lines.append(f"* {LITERATURE_NOTE}" if official else f"({SYNTHETIC_NOTE})")
    return "\n".join(lines)
