"""Many heads per pass (heads.fit.fit_heads): a pass equals its heads trained alone, each head
stops, is pruned or fails on its own, and nothing touches the process-wide RNG."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cache.synthetic import write_synthetic_cache
from heads import settings as head_settings
from heads.data import HeadsError, load_head_data
from heads.metrics import auc_on_device
from heads.fit import Training, fit_head, fit_heads, predict_proba

BASE = {**head_settings.DEFAULTS, "max_epochs": 4, "patience": 2, "batch_size": 256}
# Differ in every per-head setting, and in shape (two stacks of depth 1, one of depth 0).
VARIED = [
    {**BASE, "lr": 3e-3},
    {**BASE, "lr": 1e-3, "weight_decay": 1e-3, "class_weighting": "sqrt"},
    {**BASE, "lr": 1e-2, "optimizer": "adamw", "weight_decay": 1e-2, "max_epochs": 3},
    {**BASE, "depth": 1, "width": 32, "dropout": 0.3, "lr": 3e-3, "class_weighting": "none"},
    {**BASE, "depth": 1, "width": 32, "dropout": 0.0, "lr": 1e-3, "patience": 1},
    {**BASE, "depth": 1, "width": 16, "lr": 3e-3},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("stack") / "features.h5"
    write_synthetic_cache(path, rows={"train": 2000, "val": 600, "test": 400}, dim=24, separation=1.0)
    return load_head_data(path)


def _same(a, b, *, atol=1e-5):
    assert a.status == b.status and a.best_epoch == b.best_epoch and len(a.history) == len(b.history)
    assert [h["val_mean_auc"] for h in a.history] == pytest.approx([h["val_mean_auc"] for h in b.history], abs=atol)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(x, y, atol=atol), name


@pytest.fixture(scope="module")
def alone(data):
    return [fit_head(train=data.train, val=data.val, settings=s, device="cpu") for s in VARIED]


def test_a_pass_equals_each_head_trained_alone(data, alone):
    together = fit_heads(train=data.train, val=data.val, settings_list=VARIED, device="cpu")
    assert [r.settings for r in together] == VARIED
    for single, stacked in zip(alone, together):
        _same(single, stacked)
    # the heads really differ: a stack that mixed them up could not pass the comparison above
    assert len({round(r.best_val_auc, 6) for r in together}) == len(VARIED)
    assert together[4].best_epoch + 1 == len(together[4].history) or len(together[4].history) == 4


def test_a_bounded_stack_trains_in_several_passes_with_the_same_results(data, alone):
    tiny_budget = fit_heads(train=data.train, val=data.val, settings_list=VARIED, device="cpu", max_stack_bytes=1)
    for single, stacked in zip(alone, tiny_budget):
        _same(single, stacked)


def test_pruning_stops_one_head_and_leaves_its_neighbours(data, alone):
    calls = []

    def prune_second_at_epoch_2(index, epoch, val_auc):
        calls.append((index, epoch))
        return not (index == 1 and epoch == 2)

    results = fit_heads(train=data.train, val=data.val, settings_list=VARIED, device="cpu",
                        on_epoch=prune_second_at_epoch_2)
    assert results[1].status == "pruned" and len(results[1].history) == 2
    assert (1, 3) not in calls and (0, 3) in calls  # a pruned head is never scored again
    for position in (0, 2, 3, 4, 5):
        _same(alone[position], results[position])


def test_a_diverging_head_fails_alone(data, alone):
    exploding = {**BASE, "depth": 1, "width": 32, "lr": 1e20}
    results = fit_heads(train=data.train, val=data.val, settings_list=[VARIED[3], exploding, VARIED[4]],
                        device="cpu")
    assert results[1].status == "failed" and "training loss became" in results[1].fail_reason
    _same(alone[3], results[0])
    _same(alone[4], results[2])
    with pytest.raises(HeadsError, match="training loss became"):
        fit_head(train=data.train, val=data.val, settings=exploding, device="cpu")


def test_callback_errors_propagate_and_shared_settings_are_enforced(data):
    def broken(index, epoch, val_auc):
        raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        fit_heads(train=data.train, val=data.val, settings_list=VARIED[:2], device="cpu", on_epoch=broken)
    with pytest.raises(ValueError, match="batch_size"):
        fit_heads(train=data.train, val=data.val, settings_list=[BASE, {**BASE, "batch_size": 512}], device="cpu")
    with pytest.raises(ValueError, match="seed"):
        fit_heads(train=data.train, val=data.val, settings_list=[BASE, {**BASE, "seed": 1}], device="cpu")
    with pytest.raises(ValueError, match="precision"):  # the search builds its passes with Training directly
        Training([0, 1], [BASE, {**BASE, "precision": "bf16"}], train=data.train, val=data.val, device="cpu")


def test_the_process_rng_is_neither_used_nor_seeded(data, alone):
    torch.manual_seed(12345)
    state = torch.get_rng_state()
    again = fit_head(train=data.train, val=data.val, settings=VARIED[3], device="cpu")  # dropout draws
    assert torch.equal(torch.get_rng_state(), state)
    _same(alone[3], again, atol=0)  # and the head is exactly reproducible


def test_best_weights_reproduce_the_best_validation_auc(data, alone):
    for fit in alone:
        scores = predict_proba(fit.model, data.val.features)
        labels = data.val.labels.numpy()
        restored = np.mean([roc_auc_score(labels[:, c], scores[:, c]) for c in range(labels.shape[1])])
        assert restored == pytest.approx(fit.best_val_auc, abs=1e-6)
        assert fit.best_val_auc == max(h["val_mean_auc"] for h in fit.history)


def test_auc_on_device_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    labels = (rng.random((300, 3)) < 0.3).astype(np.float32)
    labels[:, 2] = 0  # one class cannot be scored
    scores = np.round(rng.random((2, 300, 3)) + labels * 0.3, 1)  # rounding makes many ties
    result = auc_on_device(torch.from_numpy(labels), torch.from_numpy(scores)).numpy()
    for head in range(2):
        for c in range(2):
            assert result[head, c] == pytest.approx(roc_auc_score(labels[:, c], scores[head, :, c]), abs=1e-12)
        assert np.isnan(result[head, 2])


def test_the_stacks_fused_loss_is_the_weighted_bce_of_each_head(data):
    from heads.model import class_weights, weighted_bce
    from heads.stack import HeadStack

    settings_list = [{**BASE, "class_weighting": scheme} for scheme in ("balanced", "sqrt", "none")]
    stack = HeadStack(settings_list=settings_list, in_dim=24, train_labels=data.train.labels, device="cpu")
    logits = torch.randn(3, 50, 14) * 3
    targets = data.train.labels[:50]
    losses = stack.losses(logits, targets)
    for head, settings in enumerate(settings_list):
        w_pos, w_neg = class_weights(data.train.labels, settings["class_weighting"])
        assert losses[head].item() == pytest.approx(weighted_bce(logits[head], targets, w_pos, w_neg).item(), rel=1e-5)
