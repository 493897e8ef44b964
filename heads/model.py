"""The head network and its class-weighted loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTING_FORMULA = ("loss = mean over rows and classes of -[w_pos y log s(z) + w_neg (1-y) log(1-s(z))], an "
                     "unknown label's term 0; per class, from its known train labels (N of them, P positive): "
                     "balanced w_pos = N/(2P), w_neg = N/(2(N-P)); sqrt: their square roots; none: 1 and 1")


def build_head(*, in_dim: int, n_classes: int, depth: int, width: int, dropout: float) -> nn.Sequential:
    """depth 0: one linear layer (logistic regression per class). depth k: k hidden layers of
    `width` units with ReLU and dropout. Outputs are logits; apply a sigmoid for probabilities."""
    layers, features = [], in_dim
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU(), nn.Dropout(dropout)]
        features = width
    layers.append(nn.Linear(features, n_classes))
    return nn.Sequential(*layers)


def class_weights(train_labels: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (positive, negative) loss weights from train-split frequencies.

    balanced: w_pos = N / (2 P), w_neg = N / (2 (N - P)): positives and negatives of each class
              carry equal total weight (Wang et al. 2017 use twice these, which Adam cannot tell apart);
    sqrt:     the square roots of the balanced weights, a milder correction;
    none:     1 and 1, plain BCE.
    N counts a class's known train rows (label 1 or 0; an unknown one is NaN and weighs nothing).
    A class with no positives (or no negatives) in train gets weight 1 for both."""
    positives = (train_labels == 1).float().sum(dim=0)
    negatives = (train_labels == 0).float().sum(dim=0)
    n_rows = positives + negatives
    if scheme == "none":
        return torch.ones_like(positives), torch.ones_like(positives)
    usable = (positives > 0) & (negatives > 0)
    w_pos = torch.where(usable, n_rows / (2 * positives.clamp(min=1)), torch.ones_like(positives))
    w_neg = torch.where(usable, n_rows / (2 * negatives.clamp(min=1)), torch.ones_like(positives))
    if scheme == "sqrt":
        return w_pos.sqrt(), w_neg.sqrt()
    if scheme == "balanced":
        return w_pos, w_neg
    raise ValueError(f"unknown class weighting {scheme!r}: use balanced, sqrt or none")


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, w_pos: torch.Tensor, w_neg: torch.Tensor) -> torch.Tensor:
    """mean over rows and classes of -[w_pos y log s(z) + w_neg (1-y) log(1-s(z))], computed from
    logits (log-sum-exp form, stable for any z). An unknown target (NaN) contributes 0 to the
    sum and still counts in the mean, so a batch's loss scale does not depend on how many of its
    labels are known."""
    known = ~torch.isnan(targets)
    targets = torch.nan_to_num(targets)
    per_element = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    weights = (targets * w_pos + (1 - targets) * w_neg) * known
    return (per_element * weights).mean()
