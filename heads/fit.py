"""Training and inference of one head: fit on train with early stopping on validation,
predict probabilities, save and load its checkpoint. No I/O beyond the checkpoint."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from heads.data import HeadData, HeadsError
from heads.evaluate import fast_auc_per_class, mean_auc
from heads.model import build_head, class_weights, weighted_bce

PREDICT_CHUNK = 65536  # rows per forward pass when scoring: bounds activation memory


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
