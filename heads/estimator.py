"""Heads as estimators in scikit-learn's sense: settings in `__init__`, `fit(train, val)` learns
(validation only for early stopping and choices) and returns self, `predict_proba(features)`
gives (n, C) probabilities. A head, a grid of heads and the scikit-learn baseline share this
shape, so one run-directory writer (heads.training.fit_and_report) serves all three."""
from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd

from heads.data import HeadsError
from heads.fit import fit_head, fit_heads, head_checkpoint, predict_proba


class Head:
    """One head (heads.model) trained with early stopping on validation."""

    kind = "head"

    def __init__(self, settings: dict, *, device="cpu", on_epoch=None):
        self.settings = dict(settings)
        self.device = device
        self.on_epoch = on_epoch

    def fit(self, train, val):
        self.fit_ = fit_head(train=train, val=val, settings=self.settings, device=self.device, on_epoch=self.on_epoch)
        self.model_ = self.fit_.model
        return self

    def predict_proba(self, features) -> np.ndarray:
        return predict_proba(self.model_, features)

    def chosen_settings(self) -> dict:
        return self.settings

    def class_weights_used(self) -> dict:
        return self.fit_.class_weights

    def checkpoint(self, data) -> dict:
        return head_checkpoint(self.model_, data=data, settings=self.chosen_settings())

    def fit_summary(self) -> dict:
        fit = self.fit_
        # early stopping keeps the earliest of tied epochs (a later one must beat it strictly)
        tied = sum(line["val_mean_auc"] == fit.best_val_auc for line in fit.history)
        return {"best_epoch": fit.best_epoch, "epochs_run": len(fit.history), "epochs_tied": tied,
                "train_seconds": round(fit.seconds, 3), "history": fit.history}

    def tables(self) -> dict:
        """Extra CSV files for the run directory: name -> DataFrame."""
        return {}


class HeadGrid(Head):
    """Every settings dict of a grid trained in one pass per batch size (fit_heads), the best
    chosen on validation mean AUC; only the chosen head is ever used to score."""

    kind = "head grid"

    def __init__(self, settings_list: list, *, device="cpu"):
        super().__init__(settings_list[0], device=device)
        self.settings_list = [dict(s) for s in settings_list]

    def fit(self, train, val):
        start = time.perf_counter()
        by_batch = {}
        for index, settings in enumerate(self.settings_list):
            by_batch.setdefault((settings["batch_size"], settings["seed"]), []).append(index)
        self.results_ = [None] * len(self.settings_list)
        for members in by_batch.values():
            fitted = fit_heads(train=train, val=val, settings_list=[self.settings_list[i] for i in members],
                               device=self.device)
            for index, result in zip(members, fitted):
                self.results_[index] = result
        finished = [i for i, r in enumerate(self.results_) if r.status == "complete" and r.model is not None]
        if not finished:
            reasons = "; ".join(sorted({r.fail_reason for r in self.results_ if r.fail_reason}))
            raise HeadsError(f"every head of the grid failed: {reasons}")
        # max() keeps the first of tied heads: a tie goes to the earlier grid entry
        self.best_index_ = max(finished, key=lambda i: self.results_[i].best_val_auc)
        best = self.results_[self.best_index_].best_val_auc
        self.tied_ = sum(self.results_[i].best_val_auc == best for i in finished)
        self.fit_ = self.results_[self.best_index_]
        self.model_ = self.fit_.model
        self.seconds_ = time.perf_counter() - start
        return self

    def chosen_settings(self) -> dict:
        return self.settings_list[self.best_index_]

    def fit_summary(self) -> dict:
        return {**super().fit_summary(), "grid": {"heads": len(self.settings_list), "chosen": self.best_index_,
                                                  "tied": self.tied_, "pass_seconds": round(self.seconds_, 3)}}

    def tables(self) -> dict:
        varied = [name for name in self.settings_list[0]
                  if len({repr(s[name]) for s in self.settings_list}) > 1]
        rows = []
        for index, (settings, result) in enumerate(zip(self.settings_list, self.results_)):
            rows.append({**{name: settings[name] for name in varied}, "status": result.status,
                         "best_epoch": result.best_epoch, "epochs_run": len(result.history),
                         "val_mean_auc": result.best_val_auc if result.best_epoch else np.nan,
                         "seconds": round(result.seconds, 3), "chosen": index == self.best_index_,
                         "fail_reason": result.fail_reason or ""})
        return {"grid.csv": pd.DataFrame(rows)}


class LogisticBaseline:
    """scikit-learn's LogisticRegression, one per class, with class_weight="balanced" (the heads'
    default weighting), on the same standardized features and each class's known train rows (as
    one-vs-rest, which cannot leave out a class's unknown labels). Validation is not used."""

    kind = "sklearn LogisticRegression one per class"

    def __init__(self, *, C: float = 1.0, max_iter: int = 1000, seed: int = 0):
        self.C, self.max_iter, self.seed = C, max_iter, seed

    def fit(self, train, val=None):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        features, labels = train.features.float().cpu().numpy(), train.labels.cpu().numpy()
        start = time.perf_counter()
        self.classifiers_ = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for column in labels.T:
                known = ~np.isnan(column)
                values = np.unique(column[known])
                if len(values) < 2:  # nothing to learn: the one value seen (0 if none)
                    self.classifiers_.append(float(values[0]) if len(values) else 0.0)
                    continue
                model = LogisticRegression(C=self.C, max_iter=self.max_iter, class_weight="balanced")
                self.classifiers_.append(model.fit(features[known], column[known].astype(int)))
        self.seconds_ = time.perf_counter() - start
        return self

    def predict_proba(self, features) -> np.ndarray:
        features = features.float().cpu().numpy()
        return np.stack([np.full(len(features), model) if isinstance(model, float) else model.predict_proba(features)[:, 1]
                         for model in self.classifiers_], axis=1)

    def chosen_settings(self) -> dict:
        return {"C": self.C, "max_iter": self.max_iter, "class_weight": "balanced", "seed": self.seed}

    def class_weights_used(self) -> dict:
        return {"scheme": "sklearn class_weight='balanced' (same formula)"}

    def checkpoint(self, data):
        return None

    def fit_summary(self) -> dict:
        return {"train_seconds": round(self.seconds_, 3)}

    def tables(self) -> dict:
        return {}
