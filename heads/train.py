"""`python -m heads.train`: train a multi-label head on the cached features, choose its epoch
on validation, score it once on test, and write a run directory (see heads/report.py).

    python -m heads.train --cache outputs/cache/features.h5 --depth 1 --width 512
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sklearn
import torch

import cache
from heads import settings as head_settings
from heads.data import HeadData, HeadsError, load_head_data
from heads.evaluate import fast_auc_per_class, mean_auc
from heads.model import WEIGHTING_FORMULA, build_head, class_weights, weighted_bce
from heads.report import finish_out_dir, format_table, per_class_table, prepare_out_dir, write_run

PREDICT_CHUNK = 65536  # rows per forward pass when scoring: bounds activation memory


def get_args_parser(add_help=True, description="Train a multi-label head on the feature cache."):
    parser = argparse.ArgumentParser("python -m heads.train", add_help=add_help, description=description)
    add_io_args(parser, out_help="run directory (default: outputs/runs/head-<time>)")
    head_settings.add_setting_args(parser)
    return parser


def add_io_args(parser, *, out_help: str, overwrite: bool = True) -> None:
    parser.add_argument("--cache", default=cache.DEFAULT_CACHE, help="the HDF5 feature cache")
    parser.add_argument("--out", default=None, help=out_help)
    if overwrite:
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for the test CIs")


def main(args) -> int:
    out = args.out or f"outputs/runs/head-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    try:
        train_and_report(cache_path=args.cache, settings=head_settings.settings_from_args(args), out=out,
                         device=resolve_device(args.device), overwrite=args.overwrite, n_bootstrap=args.bootstrap)
    except (cache.CacheError, HeadsError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HeadsError("--device cuda, but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


@dataclass
class FitResult:
    model: torch.nn.Module
    best_epoch: int
    best_val_auc: float
    seconds: float
    history: list = field(default_factory=list)
    class_weights: dict = field(default_factory=dict)


def fit_head(*, train, val, settings: dict, device, on_epoch=None) -> FitResult:
    """Train on `train`, pick the epoch with the best validation mean AUC (restoring its
    weights), stop after `patience` epochs without improvement. Only train and val come in:
    test cannot reach any choice made here. `on_epoch(epoch, val_auc)` may raise to stop
    (Optuna pruning)."""
    start = time.perf_counter()
    torch.manual_seed(settings["seed"])
    shuffle = torch.Generator(device="cpu").manual_seed(settings["seed"])
    model = build_head(in_dim=train.features.shape[1], n_classes=train.labels.shape[1], depth=settings["depth"],
                       width=settings["width"], dropout=settings["dropout"]).to(device)
    optimizer_class = torch.optim.AdamW if settings["optimizer"] == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    w_pos, w_neg = class_weights(train.labels, settings["class_weighting"])
    result = FitResult(model=model, best_epoch=0, best_val_auc=-1.0, seconds=0.0,
                       class_weights={"scheme": settings["class_weighting"], "w_pos": w_pos.tolist(),
                                      "w_neg": w_neg.tolist()})
    best_state = None
    for epoch in range(1, settings["max_epochs"] + 1):
        loss = _train_one_epoch(model, optimizer, train, w_pos, w_neg, batch_size=settings["batch_size"],
                                shuffle=shuffle)
        if not np.isfinite(loss):
            raise HeadsError(f"training loss became {loss} at epoch {epoch} (lr={settings['lr']:g}); "
                             f"lower --lr or check the features with `python -m cache verify`")
        val_auc = mean_auc(fast_auc_per_class(val.labels.cpu().numpy(), predict_proba(model, val.features)))
        result.history.append({"epoch": epoch, "train_loss": loss, "val_mean_auc": val_auc,
                               "seconds": round(time.perf_counter() - start, 3)})
        if val_auc > result.best_val_auc:
            result.best_val_auc, result.best_epoch = val_auc, epoch
            best_state = copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(epoch, val_auc)
        if epoch - result.best_epoch >= settings["patience"]:
            break
    model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    return result


def _train_one_epoch(model, optimizer, train, w_pos, w_neg, *, batch_size, shuffle) -> float:
    """One pass over the (already shuffled) train rows in contiguous slices: a random offset
    and a random slice order each epoch vary the batches without gathering rows."""
    model.train()
    n_rows = len(train)
    offset = int(torch.randint(batch_size, (1,), generator=shuffle)) if n_rows > batch_size else 0
    starts = [0] + list(range(offset, n_rows, batch_size))
    stops = starts[1:] + [n_rows]
    total = torch.zeros((), device=train.features.device)
    for index in torch.randperm(len(starts), generator=shuffle).tolist():
        start, stop = starts[index], stops[index]
        if stop <= start:
            continue
        loss = weighted_bce(model(train.features[start:stop]), train.labels[start:stop], w_pos, w_neg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * (stop - start)
    return float(total) / n_rows  # one host sync per epoch, not per step


@torch.inference_mode()
def predict_proba(model, features: torch.Tensor) -> np.ndarray:
    model.eval()
    chunks = [torch.sigmoid(model(features[i:i + PREDICT_CHUNK])).float().cpu()
              for i in range(0, len(features), PREDICT_CHUNK)]
    return torch.cat(chunks).numpy()


def train_and_report(*, cache_path, settings: dict, out, device, overwrite=False, n_bootstrap=1000,
                     data: HeadData | None = None, extra_config: dict | None = None, quiet=False):
    """Fit one head and write its complete run directory; returns (run dir, metrics)."""
    data = data or load_head_data(cache_path, device=device)
    partial = prepare_out_dir(out, overwrite=overwrite)
    try:
        fit = fit_head(train=data.train, val=data.val, settings=settings, device=device)
        val_scores = predict_proba(fit.model, data.val.features)
        test_scores = predict_proba(fit.model, data.test.features)  # the one use of test
        config = run_config(cache_path=cache_path, data=data, settings=settings, device=device,
                            class_weights_used=fit.class_weights,
                            n_bootstrap=n_bootstrap, extra=extra_config)
        metrics = write_run(
            partial, classes=data.classes, config=config, val=data.val, val_scores=val_scores, test=data.test,
            test_scores=test_scores, checkpoint=head_checkpoint(fit.model, data=data, settings=settings),
            n_bootstrap=n_bootstrap, seed=settings["seed"],
            fit={"best_epoch": fit.best_epoch, "epochs_run": len(fit.history), "train_seconds": round(fit.seconds, 3),
                 "rows": {name: len(split) for name, split in data.splits.items()},
                 "rows_not_done": data.excluded, "history": fit.history},
        )
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    run_dir = finish_out_dir(partial, out)
    if not quiet:
        print_summary(run_dir, data=data, metrics=metrics)
    return run_dir, metrics


def run_config(*, cache_path, data, settings, device, class_weights_used: dict, n_bootstrap, extra=None) -> dict:
    return {
        "model": "head", "settings": settings, "cache": str(Path(cache_path).resolve()),
        "cache_fingerprint": data.attrs["fingerprint"],
        "cache_attrs": {k: v for k, v in data.attrs.items() if k not in ("versions", "created")},
        "device": str(device), "class_weights": {**class_weights_used, "formula": WEIGHTING_FORMULA},
        "standardization": "features minus train mean, divided by train std (stored in head.pt)",
        "selection": "epoch with the best validation mean AUC; test is scored once, after training",
        "bootstrap": {"resamples": n_bootstrap, "unit": "patient", "seed": settings["seed"]},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "scikit-learn": sklearn.__version__},
        **(extra or {}),
    }


def head_checkpoint(model, *, data: HeadData, settings: dict) -> dict:
    """Plain tensors, numbers and strings only, so torch.load(weights_only=True) reads it."""
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "settings": dict(settings),
            "in_dim": int(data.train.features.shape[1]), "classes": list(data.classes),
            "feature_mean": data.feature_mean.cpu(), "feature_std": data.feature_std.cpu(),
            "cache_fingerprint": data.attrs["fingerprint"]}


def load_head(checkpoint_path, *, device="cpu"):
    """(model, checkpoint) from a run's head.pt."""
    checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
    s = checkpoint["settings"]
    model = build_head(in_dim=checkpoint["in_dim"], n_classes=len(checkpoint["classes"]), depth=s["depth"],
                       width=s["width"], dropout=s["dropout"]).to(device)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint


def print_summary(run_dir, *, data: HeadData, metrics: dict) -> None:
    print(format_table(per_class_table(data.classes, metrics)))
    rows = ", ".join(f"{n} {metrics['rows'][n]}" for n in ("train", "val", "test"))
    skipped = {k: v for k, v in data.excluded.items() if v}
    print(f"\nrows: {rows}" + (f" (not done, excluded: {skipped})" if skipped else ""))
    if metrics["test"]["not_scorable"]:
        print(f"not scorable on test (one label value only), left out of the mean: {metrics['test']['not_scorable']}")
    print(f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']} (validation mean AUC "
          f"{metrics['val']['mean_auc']:.4f}); trained in {metrics['train_seconds']:.1f}s")
    print(f"run directory: {run_dir}")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
