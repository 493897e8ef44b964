"""K heads of one shape (depth, width) trained as one set of stacked tensors.

Design. Every head of a stack sees the same minibatch, so its first layer is one matrix
multiply for all K heads: the K first-layer weights are stored side by side as a (D, K, out)
tensor and the batch is multiplied by its (D, K * out) view, the way DINOv2's linear
evaluation trains a grid of linear classifiers at once. For a linear head (depth 0) that is the
whole forward pass. Deeper layers are one batched matmul (baddbmm) over (K, in, out) weights.
Heads of different shapes go in different stacks that step on the same batches.

Each head keeps its own learning rate, weight decay (L2 for Adam, decoupled for AdamW, so
both optimizers share one stack), dropout rate and class weights as (K, ...) tensors; Adam's
moments are stacked like the weights and updated with a handful of element-wise kernels per
tensor for all K heads at once. The step count is shared (the heads start together), so the
bias corrections are host floats and a step needs no host synchronisation. Initialisation
and dropout draw from one torch.Generator per head, seeded with the head's seed: nothing
touches the process-wide RNG, so a head trains the same alone, in a stack, or in a thread.

A head that stops (early stopping, pruning, failure) is removed from the stack by
`keep(...)`, which index-selects every stacked tensor: a stopped head costs no compute.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from heads.model import build_head, class_weights

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def shape_of(settings: dict) -> tuple:
    """Heads with the same shape share a stack; width means nothing for a linear head."""
    return (settings["depth"], settings["width"] if settings["depth"] > 0 else 0)


def layer_sizes(in_dim: int, n_classes: int, shape: tuple) -> list:
    depth, width = shape
    return [in_dim] + [width] * depth + [n_classes]


def bytes_per_head(*, in_dim: int, n_classes: int, shape: tuple, batch_size: int) -> int:
    """Memory one head adds to a stack: weights, gradient, two Adam moments, the best weights
    and the update's temporaries (8 copies), plus its training activations and their gradients."""
    sizes = layer_sizes(in_dim, n_classes, shape)
    weights = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    activations = batch_size * sum(sizes[1:])
    return 4 * (8 * weights + 4 * activations)


class HeadStack:
    """K heads of one shape: stacked weights, per-head optimizer settings, per-head RNGs."""

    def __init__(self, *, settings_list: list, in_dim: int, train_labels: torch.Tensor, device):
        self.settings = list(settings_list)
        self.shape = shape_of(self.settings[0])
        self.device = torch.device(device)
        self.sizes = layer_sizes(in_dim, train_labels.shape[1], self.shape)
        self.weights, self.biases = self._initial_weights()
        self.params = self.weights + self.biases
        self.first_moments = [torch.zeros_like(p) for p in self.params]
        self.second_moments = [torch.zeros_like(p) for p in self.params]
        self.best = [p.detach().clone() for p in self.params]
        self.steps = 0
        self.lr = self._per_head([s["lr"] for s in self.settings])
        self.l2 = self._per_head([s["weight_decay"] if s["optimizer"] == "adam" else 0.0 for s in self.settings])
        self.decoupled = self._per_head([s["weight_decay"] if s["optimizer"] == "adamw" else 0.0
                                         for s in self.settings])
        self.dropout = [float(s["dropout"]) for s in self.settings]
        self.dropout_rng = [torch.Generator(device=self.device).manual_seed(s["seed"]) for s in self.settings]
        weights = [class_weights(train_labels, s["class_weighting"]) for s in self.settings]
        self.w_pos = torch.stack([w[0] for w in weights])[:, None, :].to(self.device)
        self.w_neg = torch.stack([w[1] for w in weights])[:, None, :].to(self.device)
        self.class_weights = [(w[0].tolist(), w[1].tolist()) for w in weights]
        self.loss_sum = torch.zeros(len(self), device=self.device)

    def __len__(self):
        return len(self.settings)

    def _per_head(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _initial_weights(self):
        """nn.Linear's default initialisation (uniform in +-1/sqrt(fan_in)), drawn on the CPU
        from each head's own generator, so CPU and GPU runs start from the same weights."""
        per_head = []
        for settings in self.settings:
            rng = torch.Generator().manual_seed(settings["seed"])
            layers = []
            for fan_in, fan_out in zip(self.sizes[:-1], self.sizes[1:]):
                bound = 1 / math.sqrt(fan_in)
                weight = torch.empty(fan_in, fan_out).uniform_(-bound, bound, generator=rng)
                bias = torch.empty(fan_out).uniform_(-bound, bound, generator=rng)
                layers.append((weight, bias))
            per_head.append(layers)
        weights, biases = [], []
        for layer in range(len(self.sizes) - 1):
            stacked_w = torch.stack([head[layer][0] for head in per_head], dim=1 if layer == 0 else 0)
            stacked_b = torch.stack([head[layer][1] for head in per_head])
            if layer > 0:
                stacked_b = stacked_b[:, None, :]  # (K, 1, out): broadcasts over the batch in baddbmm
            weights.append(stacked_w.to(self.device).requires_grad_())
            biases.append(stacked_b.to(self.device).requires_grad_())
        return weights, biases

    @staticmethod
    def _head_axis(layer: int, is_weight: bool) -> int:
        return 1 if (layer == 0 and is_weight) else 0

    def _axes(self):
        n_layers = len(self.weights)
        return [self._head_axis(i, True) for i in range(n_layers)] + [0] * n_layers

    def forward(self, x: torch.Tensor, *, train: bool) -> torch.Tensor:
        """(B, D) features -> (K, B, C) logits of every head."""
        first_w, first_b = self.weights[0], self.biases[0]
        k, out = first_w.shape[1], first_w.shape[2]
        hidden = (x @ first_w.reshape(first_w.shape[0], k * out)).view(len(x), k, out) + first_b
        hidden = hidden.transpose(0, 1)  # (K, B, out)
        for weight, bias in zip(self.weights[1:], self.biases[1:]):
            hidden = F.relu(hidden)
            if train and any(self.dropout):
                hidden = hidden * self._dropout_mask(hidden.shape[1], hidden.shape[2], hidden.dtype)
            hidden = torch.baddbmm(bias, hidden, weight)
        return hidden

    def _dropout_mask(self, rows: int, width: int, dtype) -> torch.Tensor:
        """(K, rows, width) inverted-dropout masks, each head's from its own generator."""
        masks = []
        for rate, rng in zip(self.dropout, self.dropout_rng):
            if rate == 0:
                masks.append(torch.ones(rows, width, device=self.device, dtype=dtype))
            else:
                keep = torch.rand(rows, width, generator=rng, device=self.device) >= rate
                masks.append(keep.to(dtype) / (1 - rate))
        return torch.stack(masks)

    def losses(self, logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        """(K,) class-weighted BCE of each head (heads.model.weighted_bce, per head); `known`
        (rows, C) bool, where given, zeroes the unknown entries' terms (their targets are 0s)."""
        # w_pos y l(z) + w_neg (1-y) l(-z) = w_neg [ (w_pos/w_neg) y l(z) + (1-y) l(-z) ]: torch's
        # weight and pos_weight give it in one fused kernel instead of five element-wise ones
        per_element = F.binary_cross_entropy_with_logits(logits.float(), targets.expand_as(logits),
                                                         weight=self.w_neg, pos_weight=self.w_pos / self.w_neg,
                                                         reduction="none")
        if known is not None:
            per_element = per_element * known
        return per_element.mean(dim=(1, 2))

    def train_step(self, x: torch.Tensor, targets: torch.Tensor, *, autocast, known=None) -> None:
        with autocast():
            logits = self.forward(x, train=True)
        losses = self.losses(logits, targets, known)
        for param in self.params:
            param.grad = None
        # The heads share no weights, so the gradient of the sum is each head's own gradient.
        losses.sum().backward()
        self._adam_step()
        self.loss_sum += losses.detach() * len(x)

    @torch.no_grad()
    def _adam_step(self) -> None:
        self.steps += 1
        beta1, beta2 = ADAM_BETAS
        correction1, correction2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        # decided from the settings (host values), not from the device tensors: no sync
        any_l2 = any(s["optimizer"] == "adam" and s["weight_decay"] > 0 for s in self.settings)
        any_decoupled = any(s["optimizer"] == "adamw" and s["weight_decay"] > 0 for s in self.settings)
        for param, m, v, axis in zip(self.params, self.first_moments, self.second_moments, self._axes()):
            grad = param.grad  # ours to change: it is dropped before the next backward
            lr = self._broadcast(self.lr, param, axis)
            if any_l2:
                grad.addcmul_(param, self._broadcast(self.l2, param, axis))
            if any_decoupled:
                param.mul_(1 - lr * self._broadcast(self.decoupled, param, axis))
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            # one full-size temporary per tensor: the denominator becomes the update in place
            update = v.sqrt().div_(math.sqrt(correction2)).add_(ADAM_EPS)
            torch.div(m, update, out=update)
            param.sub_(update.mul_(lr / correction1))

    @staticmethod
    def _broadcast(values: torch.Tensor, param: torch.Tensor, axis: int) -> torch.Tensor:
        shape = [1] * param.dim()
        shape[axis] = -1
        return values.view(shape)

    def take_epoch_losses(self, n_rows: int) -> list:
        """Mean train loss of each head over the epoch; the one host sync of an epoch's steps."""
        losses = (self.loss_sum / n_rows).tolist()
        self.loss_sum.zero_()
        return losses

    @torch.no_grad()
    def predict_logits(self, features: torch.Tensor, *, chunk_rows: int) -> torch.Tensor:
        """(K, n, C) float32 logits, in evaluation mode (no dropout), chunk by chunk."""
        chunks = [self.forward(features[i:i + chunk_rows].float(), train=False)
                  for i in range(0, len(features), chunk_rows)]
        return torch.cat(chunks, dim=1)

    @torch.no_grad()
    def remember_best(self, positions: list) -> None:
        """Copy the current weights of the heads at `positions` into their best weights."""
        if not positions:
            return
        index = torch.tensor(positions, device=self.device)
        for best, param, axis in zip(self.best, self.params, self._axes()):
            best.index_copy_(axis, index, param.detach().index_select(axis, index))

    @torch.no_grad()
    def keep(self, positions: list) -> None:
        """Drop every head not at `positions`; their tensors are freed."""
        index = torch.tensor(positions, dtype=torch.long, device=self.device)
        axes = self._axes()
        n_layers = len(self.weights)
        params = [p.detach().index_select(a, index).requires_grad_() for p, a in zip(self.params, axes)]
        self.weights, self.biases = params[:n_layers], params[n_layers:]
        self.params = params
        self.first_moments = [m.index_select(a, index) for m, a in zip(self.first_moments, axes)]
        self.second_moments = [v.index_select(a, index) for v, a in zip(self.second_moments, axes)]
        self.best = [b.index_select(a, index) for b, a in zip(self.best, axes)]
        for name in ("lr", "l2", "decoupled", "w_pos", "w_neg", "loss_sum"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        for name in ("settings", "dropout", "dropout_rng", "class_weights"):
            setattr(self, name, [getattr(self, name)[i] for i in positions])

    def best_module(self, position: int) -> torch.nn.Sequential:
        """The head at `position`, with its best weights, as the nn.Sequential of heads.model."""
        depth, width = self.shape
        with torch.device("meta"):  # no initialisation: it would draw from the process-wide RNG
            model = build_head(in_dim=self.sizes[0], n_classes=self.sizes[-1], depth=depth, width=max(width, 1),
                               dropout=self.dropout[position])
        model = model.to_empty(device=self.device)
        linears = [module for module in model if isinstance(module, torch.nn.Linear)]
        n_layers = len(self.weights)
        with torch.no_grad():
            for layer, linear in enumerate(linears):
                weight = self.best[layer][:, position] if layer == 0 else self.best[layer][position]
                bias = self.best[n_layers + layer][position].reshape(-1)
                linear.weight.copy_(weight.T)
                linear.bias.copy_(bias)
        return model
