"""Unknown labels (a version-2 cache's 255) through the heads: the loss leaves them out, class
weights count known rows only, every AUC is over the rows where its class is known, a class
without a known positive or negative is named as not scorable, and heads.compare refuses runs
whose known labels differ."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import cache
from cache.synthetic import write_synthetic_cache
from heads import compare as compare_cli
from heads import train as train_cli
from heads.comparison import CompareError, check_same_test_rows, load_run
from heads.data import load_head_data
from heads.metrics import auc_on_device, auc_per_class, bootstrap_auc, roc_points
from heads.model import class_weights, weighted_bce
from heads.paired import delong_test
from heads.stack import HeadStack

CLASSES = ["Atelectasis", "Cardiomegaly", "Pleural Effusion", "Lung Lesion"]
ROWS = {"train": 600, "val": 240, "test": 240}


def labels_with_unknowns(rng, n=300, classes=3, unknown=0.3):
    labels = (rng.random((n, classes)) < 0.3).astype(np.float64)
    labels[rng.random((n, classes)) < unknown] = np.nan
    return labels


def test_every_auc_is_over_the_known_rows_of_its_class():
    rng = np.random.default_rng(0)
    labels = labels_with_unknowns(rng)
    scores = np.round(rng.random(labels.shape) + np.nan_to_num(labels) * 0.5, 1)  # ties on purpose
    expected = [roc_auc_score(labels[~np.isnan(labels[:, c]), c], scores[~np.isnan(labels[:, c]), c])
                for c in range(labels.shape[1])]
    assert auc_per_class(labels, scores) == pytest.approx(expected, abs=1e-12)
    on_device = auc_on_device(torch.from_numpy(labels).float(), torch.from_numpy(scores)[None]).numpy()[0]
    assert on_device == pytest.approx(expected, abs=1e-12)
    one_resample = bootstrap_auc(labels, scores, np.arange(len(labels)), n_resamples=3)
    assert np.isfinite(one_resample).all()
    known = ~np.isnan(labels[:, 0])
    assert delong_test(labels[:, 0], scores[:, 0], scores[:, 1])["auc_a"] == pytest.approx(expected[0])
    fpr, tpr = roc_points(labels[:, 0], scores[:, 0])
    assert fpr[-1] == tpr[-1] == 1 and len(fpr) <= known.sum() + 1


def test_a_class_with_no_known_negative_is_not_scorable():
    labels = np.array([[1, 0], [1, 1], [np.nan, 0], [1, np.nan]], dtype=np.float64)
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.3], [0.4, 0.2]])
    assert auc_per_class(labels, scores)[0] is None  # three positives, no known negative: not 0.5
    assert np.isnan(auc_on_device(torch.from_numpy(labels).float(), torch.from_numpy(scores)[None]).numpy()[0, 0])


def test_class_weights_count_known_labels_only():
    labels = torch.tensor([[1, 0], [0, float("nan")], [0, 1], [float("nan"), float("nan")]])
    w_pos, w_neg = class_weights(labels, "balanced")
    # class 0: 3 known, 1 positive; class 1: 2 known, 1 positive
    assert w_pos.tolist() == pytest.approx([3 / 2, 2 / 2]) and w_neg.tolist() == pytest.approx([3 / 4, 2 / 2])


def test_the_loss_and_its_gradient_ignore_what_an_unknown_label_would_say():
    torch.manual_seed(0)
    labels = torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [0.0, float("nan")]])
    logits = torch.randn(3, 2, requires_grad=True)
    w_pos, w_neg = torch.tensor([2.0, 1.5]), torch.tensor([0.5, 0.8])
    loss = weighted_bce(logits, labels, w_pos, w_neg)
    loss.backward()
    assert logits.grad[1, 0] == 0 and logits.grad[2, 1] == 0 and logits.grad[0, 0] != 0
    settings = {"depth": 0, "width": 0, "dropout": 0.0, "lr": 1e-3, "weight_decay": 0.0, "optimizer": "adam",
                "class_weighting": "balanced", "seed": 0}
    stack = HeadStack(settings_list=[settings], in_dim=4, train_labels=labels, device="cpu")
    known = ~torch.isnan(labels)
    for filler in (0.0, 1.0):  # whatever stands in for the unknown target, the loss is the same
        targets = torch.where(known, labels, torch.tensor(filler))
        value = stack.losses(logits.detach()[None], targets, known)
        assert value.item() == pytest.approx(weighted_bce(logits.detach(), labels, *stack_weights(stack)).item(),
                                             rel=1e-6)


def stack_weights(stack):
    return torch.tensor(stack.class_weights[0][0]), torch.tensor(stack.class_weights[0][1])


@pytest.fixture(scope="module")
def masked_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("unknown")
    path = root / "chexpert.h5"
    write_synthetic_cache(path, rows=ROWS, dim=16, classes=CLASSES, dataset="chexpert", unknown=0.3, seed=3,
                          separation=1.5)
    # Lung Lesion: every test label unknown, so test cannot score it
    import h5py
    with h5py.File(path, "r+") as f:
        labels, split = f["labels"][()], f["split"][()].astype(str)
        labels[split == "test", 3] = cache.UNKNOWN
        f["labels"][...] = labels
    return path


def test_heads_train_on_unknown_labels_writes_recomputable_numbers(masked_cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli.main(train_cli.get_args_parser().parse_args(
        ["--cache", str(masked_cache), "--out", str(out), "--max-epochs", "3", "--bootstrap", "50",
         "--precision", "fp32"])) == 0
    printed = capsys.readouterr().out
    assert "not scorable on test (no known positive or no known negative)" in printed and "Lung Lesion" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["auc"]["Lung Lesion"] is None and metrics["test"]["not_scorable"] == ["Lung Lesion"]
    assert metrics["test"]["mean_over"] == CLASSES[:3]
    predictions = pd.read_csv(out / "predictions_test.csv")
    assert predictions["label_Lung Lesion"].isna().all()  # unknown is an empty cell, never 0
    labels = predictions[[f"label_{c}" for c in CLASSES]].to_numpy(np.float64)
    scores = predictions[[f"prob_{c}" for c in CLASSES]].to_numpy(np.float64)
    for c, name in enumerate(CLASSES[:3]):
        known = ~np.isnan(labels[:, c])
        assert 0 < known.sum() < len(labels)
        assert metrics["test"]["auc"][name] == pytest.approx(roc_auc_score(labels[known, c], scores[known, c]))
    assert metrics["test"]["mean_auc"] == pytest.approx(np.mean([metrics["test"]["auc"][c] for c in CLASSES[:3]]))


def test_the_cache_unknowns_arrive_as_nan(masked_cache):
    data = load_head_data(masked_cache)
    stored = cache.read_table(masked_cache)
    unknown_share = float((stored["labels"] == cache.UNKNOWN).mean())
    seen = float(np.mean([torch.isnan(s.labels).float().mean().item() * len(s) for s in data.splits.values()])
                 / np.mean([len(s) for s in data.splits.values()]))
    assert unknown_share > 0.2 and seen == pytest.approx(unknown_share, abs=0.02)
    assert data.train.known is not None and not torch.isnan(data.train.targets).any()
    assert data.test.metadata is not None and set(data.test.metadata) >= {"sex", "age", "view"}


def test_compare_refuses_runs_whose_known_labels_differ(masked_cache, tmp_path, capsys):
    import h5py
    import shutil
    other = tmp_path / "other.h5"
    shutil.copy(masked_cache, other)
    with h5py.File(other, "r+") as f:  # one test label of Atelectasis known in one cache, unknown in the other
        labels, split = f["labels"][()], f["split"][()].astype(str)
        row = np.flatnonzero((split == "test") & (labels[:, 0] != cache.UNKNOWN))[0]
        labels[row, 0] = cache.UNKNOWN
        f["labels"][...] = labels
    runs = []
    for name, path in (("a", masked_cache), ("b", other)):
        assert train_cli.main(train_cli.get_args_parser().parse_args(
            ["--cache", str(path), "--out", str(tmp_path / name), "--max-epochs", "2", "--bootstrap", "20",
             "--precision", "fp32"])) == 0
        runs.append(load_run(str(tmp_path / name)))
    with pytest.raises(CompareError, match="known label of Atelectasis"):
        check_same_test_rows(runs)
    capsys.readouterr()
    code = compare_cli.main(compare_cli.get_args_parser().parse_args(
        [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]))
    assert code == 2 and "known label of Atelectasis" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
