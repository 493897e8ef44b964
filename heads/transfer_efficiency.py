"""`heads.transfer --train-fraction 0.01,0.1,1 --repeats 5`: label efficiency across datasets. For
each source cache, the label-efficiency run of heads/efficiency.py (the same nested patient
subsets, seeds and head choices on the source's validation split); every head it fits is also
scored on every cache's test split (its own included) on the classes the two share, as a
transfer cell scores them. How many labels does a head need to hold in another hospital?

    runs/<source>/                        the source's efficiency run (heads.train --train-fraction)
    evaluations/<source>-on-<target>/<f>-r<repeat>_test.csv
                                          each fit's probabilities on the target's test rows
                                          (the class pairs' columns, heads/report.py's format)
    transfer_efficiency.csv               source, target, fraction, repeat, n_train_images,
                                          n_train_patients, class (shared name), source_class,
                                          target_class, n_pos, n_neg, test_auc: one row per pair
    transfer_efficiency.md / .png         mean test AUC per (source, target, fraction) over repeats,
                                          with the min-max over repeats; a panel per source

Every AUC recomputes from the evaluation files. A fit's mean is over the class pairs its target
test split can score; no interval per fit (the spread over repeats is the figure, as in
efficiency.png), and no operating points or subgroups here (heads.transfer without
--train-fraction gives them).
"""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

import cache
from cache.runtime import versions
from heads.data import load_head_data, standardized
from heads.efficiency import check_fractions, run_efficiency
from heads.external import class_pairs, dataset_title, read_target
from heads.metrics import auc_per_class
from heads.report import recipe_marks, write_json, write_predictions

COLUMNS = ["source", "target", "fraction", "repeat", "n_train_images", "n_train_patients", "class", "source_class",
           "target_class", "n_pos", "n_neg", "test_auc"]


def check_train_patients(sources, fractions) -> None:
    """Every fraction keeps a patient of every source's train split: refused before any work."""
    for source in sources:
        table = cache.read_table(source.path)
        train = table["patient_id"][(table["split"] == cache.TRAIN) & table["done"]]
        check_fractions(sorted(fractions), len(np.unique(train)))


def run_transfer_efficiency(partial: Path, sources: list, *, grid, device, fractions, repeats: int) -> pd.DataFrame:
    """Every source's efficiency run, each fit scored on every target; returns the table."""
    targets = {source.name: read_target(source.path, split="test") for source in sources}
    rows = []
    for source in sources:
        data = load_head_data([source.path], device=device)
        scorers = {name: TargetScorer(target, data=data, source_dataset=source.dataset)
                   for name, target in targets.items()}
        scorers = {name: scorer for name, scorer in scorers.items() if scorer.pairs}

        def on_fit(fit, source=source, scorers=scorers):
            for name, scorer in scorers.items():
                folder = partial / "evaluations" / f"{source.name}-on-{name}"
                rows.extend(scorer.score(fit, folder=folder, source=source.name, target=name))
            print(f"{source.name}: fraction {fit.fraction:g} repeat {fit.repeat}: {fit.n_train_images} train images, "
                  f"scored on {', '.join(scorers)} ({fit.seconds:.1f}s)", flush=True)
        run_efficiency(grid=grid, data=data, cache_path=[source.path], out=partial / "runs" / source.name,
                       device=device, fractions=fractions, repeats=repeats, name=source.name, quiet=True,
                       on_fit=on_fit)
    return pd.DataFrame(rows, columns=COLUMNS)


class TargetScorer:
    """One target's test rows as one source's heads see them: the source's train
    standardisation, then float16 (as heads.data holds features), the class pairs' columns."""

    def __init__(self, target, *, data, source_dataset: str):
        self.pairs, _, _ = class_pairs(source_dataset=source_dataset, source_classes=data.classes,
                                       target_dataset=target.dataset, target_classes=target.classes)
        self.source_columns = [data.classes.index(pair.source) for pair in self.pairs]
        self.labels = target.labels[:, [target.classes.index(pair.target) for pair in self.pairs]]
        features = standardized(target.features.copy(), data.feature_mean.cpu().numpy(),
                                data.feature_std.cpu().numpy())
        self.features = torch.from_numpy(features.astype(np.float16)).to(data.train.features.device)
        self.rows = SimpleNamespace(image_ids=target.image_ids, patient_ids=target.patient_ids,
                                    labels=torch.from_numpy(self.labels))

    def score(self, fit, *, folder: Path, source: str, target: str) -> list:
        """The fit's probabilities on the target, saved; one table row per class pair."""
        scores = fit.estimator.predict_proba(self.features)[:, self.source_columns]
        folder.mkdir(parents=True, exist_ok=True)
        write_predictions(folder / f"{fit.stem}_test.csv", self.rows, scores, [pair.target for pair in self.pairs])
        aucs = auc_per_class(self.labels, scores.astype(np.float32))
        return [{"source": source, "target": target, **fit.subset(), "class": pair.shared,
                 "source_class": pair.source, "target_class": pair.target,
                 "n_pos": int((self.labels[:, c] == 1).sum()), "n_neg": int((self.labels[:, c] == 0).sum()),
                 "test_auc": aucs[c]} for c, pair in enumerate(self.pairs)]


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Per (source, target, fraction): mean training images; the mean, min and max over repeats
    of each fit's mean AUC over its scorable pairs; and the mean over repeats of the fit's drop,
    as heads.transfer defines it: its mean AUC on its own test split minus on the target's, both
    over the classes scorable in both (empty on the diagonal and where none is)."""
    scored = table.dropna(subset=["test_auc"])
    per_fit = (scored.groupby(["source", "target", "fraction", "repeat"], sort=False)
               .agg(n_train_images=("n_train_images", "first"), mean_auc=("test_auc", "mean"),
                    classes=("test_auc", "size")).reset_index())
    per_fit["drop"] = [_drop(scored, fit) for fit in per_fit.itertuples()]
    return (per_fit.groupby(["source", "target", "fraction"], sort=False)
            .agg(n_train_images=("n_train_images", "mean"), mean_auc=("mean_auc", "mean"),
                 min_auc=("mean_auc", "min"), max_auc=("mean_auc", "max"), drop=("drop", "mean"),
                 repeats=("repeat", "size"), classes=("classes", "max")).reset_index())


def _drop(scored: pd.DataFrame, fit) -> float:
    if fit.source == fit.target:
        return np.nan
    same_fit = (scored["source"] == fit.source) & (scored["fraction"] == fit.fraction) & \
        (scored["repeat"] == fit.repeat)
    home = scored[same_fit & (scored["target"] == fit.source)].set_index("class")["test_auc"]
    away = scored[same_fit & (scored["target"] == fit.target)].set_index("class")["test_auc"]
    common = home.index.intersection(away.index)
    return float(home[common].mean() - away[common].mean()) if len(common) else np.nan


def write_outputs(partial: Path, table: pd.DataFrame, *, sources, grid, fractions, repeats: int) -> pd.DataFrame:
    """The table, its summary (.md, .png) and transfer.json (the inputs); returns the summary."""
    summary = summarize(table)
    write_json(partial / "transfer.json", {
        "caches": [{"name": s.name, "path": str(s.path.resolve()), "dataset": s.dataset,
                    "fingerprint": s.attrs["fingerprint"]} for s in sources],
        "settings_grid": grid, "efficiency": {"fractions": list(fractions), "repeats": repeats},
        "versions": versions()})
    table.to_csv(partial / "transfer_efficiency.csv", index=False, float_format="%.6g")
    (partial / "transfer_efficiency.md").write_text(
        "# Label efficiency across datasets\n\n" + format_summary(summary, sources=sources) + "\n")
    plot(partial / "transfer_efficiency.png", summary, sources=sources)
    return summary


def format_summary(summary: pd.DataFrame, *, sources) -> str:
    datasets = {source.name: dataset_title(source.dataset) for source in sources}
    lines = ["mean test AUC over the class pairs each test split scores (min-max over repeats); a source's own "
             "test split marked *", "",
             "| source | target | fraction | train images | mean AUC | min-max | classes | drop |",
             "|---|---|---|---|---|---|---|---|"]
    for row in summary.itertuples():
        own = "*" if row.source == row.target else ""
        drop = "" if np.isnan(row.drop) else f"{row.drop:+.4f}"
        lines.append(f"| {row.source} | {row.target}{own} ({datasets[row.target]}) | {row.fraction:g} | "
                     f"{row.n_train_images:.0f} | {row.mean_auc:.4f} | {row.min_auc:.4f}-{row.max_auc:.4f} | "
                     f"{row.classes} | {drop} |")
    lines += ["", "drop: mean over repeats of (the fit's mean AUC on its own test split - on the target's), both over "
              "the classes scorable in both, as heads.transfer defines it"]
    return "\n".join(lines)


def plot(path: Path, summary: pd.DataFrame, *, sources) -> None:
    """A panel per source: mean test AUC against training images (log x), a line per target (its
    own test split drawn thick), the min-max over repeats as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(sources), 3)
    rows = math.ceil(len(sources) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.6 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(sources):]:
        ax.axis("off")
    for source, ax in zip(sources, axes.flat):
        for target in sources:
            curve = summary[(summary["source"] == source.name) & (summary["target"] == target.name)]
            if curve.empty:
                continue
            own = target.name == source.name
            line, = ax.plot(curve["n_train_images"], curve["mean_auc"], marker="o", ms=3, lw=2.4 if own else 1.2,
                            label=f"{target.name}{' (own test)' if own else ''}")
            ax.fill_between(curve["n_train_images"], curve["min_auc"], curve["max_auc"], color=line.get_color(),
                            alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_title(f"trained on {source.name} ({dataset_title(source.dataset)})", fontsize=9)
        ax.set_xlabel("training images (log scale)", fontsize=8)
        ax.set_ylabel("mean test AUC (shared classes)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, title="scored on", title_fontsize=7)
    fig.suptitle("Label efficiency across datasets (band: min-max over repeats)", fontsize=10)
    marks = recipe_marks([source.attrs for source in sources])
    if marks:
        fig.supxlabel(" | ".join(marks), color="red", weight="bold", fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)
