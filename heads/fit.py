"""Training and inference of heads: fit one or many on train with early stopping on
validation, predict probabilities, save and load a checkpoint. No I/O beyond the checkpoint.

`fit_heads` trains any number of heads in one pass over the same minibatches (stacked by
shape, heads/stack.py); `fit_head` is the one-head case. `Training` is one such pass, one epoch
at a time, for callers that train several side by side and stop heads between epochs."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cache.runtime import cpu_has_native_bf16
from heads.data import HeadData, HeadsError
from heads.metrics import auc_on_device
from heads.model import build_head
from heads.stack import HeadStack, bytes_per_head, shape_of

PREDICT_CHUNK = 65536  # rows per forward pass when scoring: bounds activation memory
# Memory the stacked heads of one pass may take (weights, optimizer state, activations);
# more heads than fit are trained in further passes over the same minibatch order.
STACK_BYTES = 2 * 2**30
VALIDATION_BYTES = 256 * 2**20  # activations of one validation chunk, all heads of a stack
SHARED_SETTINGS = ("batch_size", "seed", "precision")  # what heads sharing minibatches must agree on


@dataclass
class FitResult:
    model: torch.nn.Module | None  # the head with its best-epoch weights (None: failed before any)
    best_epoch: int
    best_val_auc: float
    seconds: float
    history: list = field(default_factory=list)
    class_weights: dict = field(default_factory=dict)
    status: str = "complete"  # "complete" | "pruned" | "failed"
    fail_reason: str | None = None
    settings: dict = field(default_factory=dict)


def fit_head(*, train, val, settings: dict, device, on_epoch=None) -> FitResult:
    """Train one head on `train`, pick the epoch with the best validation mean AUC (restoring
    its weights), stop after `patience` epochs without improvement. Only train and val come
    in: test cannot reach any choice made here. `on_epoch(epoch, val_auc)` may raise or return
    False to stop. A non-finite loss raises HeadsError."""
    callback = None if on_epoch is None else (lambda _index, epoch, auc: on_epoch(epoch, auc) is not False)
    result = fit_heads(train=train, val=val, settings_list=[settings], device=device, on_epoch=callback)[0]
    if result.status == "failed":
        raise HeadsError(result.fail_reason)
    return result


def fit_heads(*, train, val, settings_list: list, device, on_epoch=None, max_stack_bytes: int = STACK_BYTES) -> list:
    """Train every head of `settings_list` on the same stream of minibatches; returns one
    FitResult per entry, in order. The entries must share batch_size and seed (ValueError);
    each keeps its own lr, weight decay, optimizer, dropout, class weighting, patience and
    max_epochs. `on_epoch(index, epoch, val_auc) -> bool` is called for each live head after
    each epoch; False stops that head (status "pruned"); exceptions propagate. A head whose
    loss becomes non-finite stops with status "failed"; the others go on. Results equal
    training each head alone with the same settings, to float rounding."""
    settings_list = [dict(s) for s in settings_list]
    if not settings_list:
        return []
    check_shared(settings_list)
    results = [None] * len(settings_list)
    for group in plan_passes(settings_list, in_dim=train.features.shape[1], n_classes=train.labels.shape[1],
                             max_stack_bytes=max_stack_bytes):
        _run_pass(group, settings_list, results, train=train, val=val, device=torch.device(device),
                  on_epoch=on_epoch)
    return results


def plan_passes(settings_list: list, *, in_dim: int, n_classes: int, max_stack_bytes: int) -> list:
    """Head indices per pass over the data: as many heads as fit in `max_stack_bytes`, at least
    one. Heads are taken in their given order so that a pass mixes shapes as they come."""
    passes, current, used = [], [], 0
    for index, settings in enumerate(settings_list):
        cost = bytes_per_head(in_dim=in_dim, n_classes=n_classes, shape=shape_of(settings),
                              batch_size=settings["batch_size"])
        if current and used + cost > max_stack_bytes:
            passes.append(current)
            current, used = [], 0
        current.append(index)
        used += cost
    return passes + [current]


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on a CUDA GPU that has it and on a CPU with native bf16 units (AVX512-BF16
    or AMX), fp32 elsewhere, where bf16 is emulated and slower than fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def _autocast_for(precision: str, device: torch.device):
    """bf16 autocast of the forward pass (fp32 master weights and Adam state in the stack), or none."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def check_shared(settings_list: list) -> None:
    """Heads on one stream of minibatches must agree on SHARED_SETTINGS (ValueError)."""
    for name in SHARED_SETTINGS:
        values = {s.get(name) for s in settings_list}
        if len(values) > 1:
            raise ValueError(f"heads trained in one pass share {name}; got {sorted(values)}")


def _run_pass(indices: list, settings_list: list, results: list, *, train, val, device, on_epoch) -> None:
    training = Training(indices, settings_list, train=train, val=val, device=device)
    while training.live():
        training.run_epoch(on_epoch=on_epoch)
    for index in indices:
        results[index] = training.results[index]


class Training:
    """Heads that share one stream of minibatches (one batch size, seed and precision), trained
    one epoch at a time, so that a caller can train several of these side by side and stop heads
    between epochs (successive halving in search/passes.py). `results[index]` is set when the
    head at `index` of `settings_list` stops."""

    def __init__(self, indices: list, settings_list: list, *, train, val, device):
        device = torch.device(device)
        self.start = time.perf_counter()
        self.train, self.val = train, val
        check_shared([settings_list[i] for i in indices])
        shared = settings_list[indices[0]]
        self.batch_size = shared["batch_size"]
        self.shuffle = torch.Generator(device="cpu").manual_seed(shared["seed"])
        by_shape = {}
        for index in indices:
            by_shape.setdefault(shape_of(settings_list[index]), []).append(index)
        self.stacks = []
        for members in by_shape.values():
            stack = HeadStack(settings_list=[settings_list[i] for i in members], in_dim=train.features.shape[1],
                              train_labels=train.labels, device=device)
            stack.indices = members
            self.stacks.append(stack)
        self.tracks = {i: _Track(settings_list[i]) for i in indices}
        self.results = {}
        self.autocast = _autocast_for(resolve_precision(shared.get("precision", "auto"), device), device)
        self.convert = self.autocast is contextlib.nullcontext  # float16 features -> float32
        self.epoch = 0  # epochs begun; the current one is done when `slices` is None
        self.slices, self.next_slice = None, 0

    def live(self) -> list:
        """Indices of the heads still training."""
        return [index for stack in self.stacks for index in stack.indices]

    def best_val_auc(self, index: int) -> float:
        return self.tracks[index].best_val_auc

    def run_epoch(self, *, on_epoch=None) -> None:
        """One epoch of every live head, then score, record and stop the heads that are done."""
        self.run_until(self.epoch + (self.slices is None), on_epoch=on_epoch)

    def run_until(self, point: float, *, on_epoch=None) -> None:
        """Train every live head until `point` epochs (a fraction stops inside an epoch, after that
        share of its minibatches); each epoch that ends is scored, recorded and may stop heads.
        Stopping inside an epoch changes nothing: the rest of it follows the same minibatches."""
        while self.live():
            if self.slices is None:
                if self.epoch >= point:
                    return
                self.epoch += 1
                self.slices, self.next_slice = epoch_slices(len(self.train), self.batch_size, self.shuffle), 0
            share = min(1.0, point - (self.epoch - 1))
            until = len(self.slices) if share >= 1 else round(share * len(self.slices))
            for first, stop in self.slices[self.next_slice:until]:
                self._step(first, stop)
            self.next_slice = max(self.next_slice, until)
            if self.next_slice < len(self.slices):
                return  # inside the epoch: `point` reached
            self.slices = None
            for stack in self.stacks:
                _end_epoch(stack, self.epoch, self.tracks, self.results, train=self.train, val=self.val,
                           start=self.start, on_epoch=on_epoch)
            self.stacks = [stack for stack in self.stacks if len(stack)]

    def _step(self, first: int, stop: int) -> None:
        x = self.train.features[first:stop]
        x = x.float() if self.convert else x
        targets = self.train.targets[first:stop]
        known = None if self.train.known is None else self.train.known[first:stop]
        for stack in self.stacks:
            stack.train_step(x, targets, autocast=self.autocast, known=known)

    def current_val_aucs(self) -> dict:
        """{index: validation mean AUC of its weights now} for every live head; records nothing
        (a rung inside an epoch ranks heads by it)."""
        return {index: auc for stack in self.stacks for index, auc in zip(stack.indices, _val_aucs(stack, self.val))}

    def stop(self, indices, *, status: str, reason: str | None = None) -> None:
        """Stop the live heads at `indices` (of `settings_list`) with `status`; their results keep
        the best weights and history so far."""
        indices = set(indices)
        for stack in self.stacks:
            positions = [p for p, index in enumerate(stack.indices) if index in indices]
            for position in positions:
                _finish(stack, position, self.tracks, self.results, status=status, reason=reason, start=self.start)
            _keep(stack, [p for p in range(len(stack)) if p not in positions])
        self.stacks = [stack for stack in self.stacks if len(stack)]

    def abandon(self, reason: str) -> None:
        """Fail every live head with `reason` (the group itself failed: out of memory)."""
        for index in self.live():
            self.results[index] = FitResult(model=None, best_epoch=0, best_val_auc=float("nan"),
                                            seconds=time.perf_counter() - self.start, status="failed",
                                            fail_reason=reason, settings=self.tracks[index].settings)
        self.stacks = []


@dataclass
class _Track:
    """What one head has done so far."""
    settings: dict
    history: list = field(default_factory=list)
    best_epoch: int = 0
    best_val_auc: float = -1.0


def _end_epoch(stack: HeadStack, epoch: int, tracks: dict, results: dict, *, train, val, start, on_epoch) -> None:
    """Score every live head of the stack, record, keep the best weights, stop the heads that
    are done (failed, pruned, patience or max_epochs spent) and drop them from the stack."""
    losses = stack.take_epoch_losses(n_rows=len(train))
    finite = [p for p, loss in enumerate(losses) if np.isfinite(loss)]
    for position, loss in enumerate(losses):
        if position not in finite:
            lr = stack.settings[position]["lr"]
            reason = (f"training loss became {loss} at epoch {epoch} (lr={lr:g}); lower --lr or check the "
                      f"features with `python -m cache verify`")
            _finish(stack, position, tracks, results, status="failed", reason=reason, start=start)
    _keep(stack, finite)
    if not len(stack):
        return
    val_aucs = _val_aucs(stack, val)
    improved, stopping = [], {}
    for position, (val_auc, index) in enumerate(zip(val_aucs, stack.indices)):
        track = tracks[index]
        track.history.append({"epoch": epoch, "train_loss": losses[finite[position]], "val_mean_auc": val_auc,
                              "seconds": round(time.perf_counter() - start, 3)})
        if val_auc > track.best_val_auc:
            track.best_val_auc, track.best_epoch = val_auc, epoch
            improved.append(position)
    stack.remember_best(improved)
    for position, (val_auc, index) in enumerate(zip(val_aucs, stack.indices)):
        track = tracks[index]
        if on_epoch is not None and on_epoch(index, epoch, val_auc) is False:
            stopping[position] = "pruned"
        elif epoch - track.best_epoch >= track.settings["patience"] or epoch >= track.settings["max_epochs"]:
            stopping[position] = "complete"
    for position, status in stopping.items():
        _finish(stack, position, tracks, results, status=status, reason=None, start=start)
    _keep(stack, [p for p in range(len(stack)) if p not in stopping])


def _val_aucs(stack: HeadStack, val) -> list:
    """Validation mean AUC of every head of the stack, as its weights are now."""
    chunk_rows = max(1, VALIDATION_BYTES // (4 * len(stack) * sum(stack.sizes[1:])))
    probabilities = torch.sigmoid(stack.predict_logits(val.features, chunk_rows=chunk_rows))
    per_class = auc_on_device(val.labels, probabilities)
    return torch.nanmean(per_class, dim=1).tolist()  # one host sync for all heads


def _keep(stack: HeadStack, positions: list) -> None:
    if len(positions) < len(stack):
        stack.indices = [stack.indices[p] for p in positions]
        stack.keep(positions)


def _finish(stack: HeadStack, position: int, tracks: dict, results: list, *, status, reason, start) -> None:
    index = stack.indices[position]
    track = tracks[index]
    w_pos, w_neg = stack.class_weights[position]
    results[index] = FitResult(
        model=stack.best_module(position) if track.best_epoch else None, best_epoch=track.best_epoch,
        best_val_auc=track.best_val_auc, seconds=time.perf_counter() - start, history=track.history,
        class_weights={"scheme": track.settings["class_weighting"], "w_pos": w_pos, "w_neg": w_neg},
        status=status, fail_reason=reason, settings=track.settings)


def epoch_slices(n_rows: int, batch_size: int, shuffle: torch.Generator) -> list:
    """(start, stop) of each minibatch of one epoch over the (already shuffled) train rows, as
    contiguous slices: a random offset and a random slice order each epoch vary the batches
    without gathering rows."""
    offset = int(torch.randint(batch_size, (1,), generator=shuffle)) if n_rows > batch_size else 0
    starts = [0] + list(range(offset, n_rows, batch_size))
    stops = starts[1:] + [n_rows]
    order = torch.randperm(len(starts), generator=shuffle).tolist()
    return [(starts[i], stops[i]) for i in order if stops[i] > starts[i]]


@torch.inference_mode()
def predict_proba(model, features: torch.Tensor) -> np.ndarray:
    """(n, C) float32 probabilities of one head (nn.Module) for float16 or float32 features."""
    model.eval()
    chunks = [torch.sigmoid(model(features[i:i + PREDICT_CHUNK].float())).float().cpu()
              for i in range(0, len(features), PREDICT_CHUNK)]
    return torch.cat(chunks).numpy()


def head_checkpoint(model, *, data: HeadData, settings: dict) -> dict:
    """Plain tensors, numbers and strings only, so torch.load(weights_only=True) reads it."""
    return {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "settings": dict(settings),
            "in_dim": int(data.train.features.shape[1]), "classes": list(data.classes),
            "feature_mean": data.feature_mean.cpu(), "feature_std": data.feature_std.cpu(),
            "cache_fingerprint": data.attrs["fingerprint"],
            "cache_fingerprints": list(data.fingerprints)}


def load_head(checkpoint_path, *, device="cpu"):
    """(model, checkpoint) from a run's head.pt."""
    checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
    return head_from_checkpoint(checkpoint, device=device), checkpoint


def head_from_checkpoint(checkpoint: dict, *, device="cpu"):
    """The head (eval mode) that `head_checkpoint` saved."""
    s = checkpoint["settings"]
    model = build_head(in_dim=checkpoint["in_dim"], n_classes=len(checkpoint["classes"]), depth=s["depth"],
                       width=s["width"], dropout=s["dropout"]).to(device)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
