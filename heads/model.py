"""The head network and its class-weighted loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTING_FORMULA = ("loss = mean of -[w_pos y log s(z) + w_neg (1-y) log(1-s(z))]; per class, from train: "
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
    A class with no positives (or no negatives) in train gets weight 1 for both."""
    n_rows = train_labels.shape[0]
    positives = train_labels.float().sum(dim=0)
    negatives = n_rows - positives
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
    logits (log-sum-exp form, stable for any z)."""
    per_element = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    weights = targets * w_pos + (1 - targets) * w_neg
    return (per_element * weights).mean()
