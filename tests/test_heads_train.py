"""heads.train as a user meets it: settings checked at parse time, a grid of heads in one
pass, test rows that reach no choice, float16 features, published figures only beside the
real NIH test split."""
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cache.schema import CLASSES
from cache.synthetic import write_synthetic_cache
from conftest import NIH_METADATA, call_main, run_cli
from heads import settings as head_settings
from heads.data import NIH_TEST_IDS_SHA256, is_official_nih_test, load_head_data, image_ids_sha256
from heads.estimator import HeadGrid
from heads.fit import fit_head
from heads.report import format_table, per_class_table
from heads.training import fit_and_report

FAST = {**head_settings.DEFAULTS, "max_epochs": 6, "patience": 2}


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "features.h5"
    write_synthetic_cache(path, rows={"train": 1500, "val": 500, "test": 500}, dim=24, separation=1.0)
    return path


@pytest.mark.parametrize("flag, value, allowed", [
    ("--dropout", "1.5", "[0, 1)"), ("--dropout", "-0.5", "[0, 1)"),
    ("--lr", "-1", "(0, 1]"), ("--lr", "nan", "(0, 1]"), ("--lr", "1e6", "(0, 1]"), ("--lr", "0", "(0, 1]"),
    ("--batch-size", "0", "[1, "), ("--max-epochs", "0", "[1, "), ("--patience", "0", "[1, "),
    ("--weight-decay", "-1", "[0, inf)"), ("--depth", "-1", "[0, 8]"), ("--depth", "1000", "[0, 8]"),
    ("--width", "0", "[1, 8192]"), ("--bootstrap", "0", "[1, "), ("--lr", "1e-3,abc", "(0, 1]"),
    ("--batch-size", "1.5", "[1, "),
])
def test_bad_settings_are_one_line_naming_the_range(capsys, flag, value, allowed):
    from heads.train import get_args_parser

    with pytest.raises(SystemExit) as stop:
        get_args_parser().parse_args([flag, value])
    message = capsys.readouterr().err
    assert stop.value.code == 2 and message.count("\n") == 1
    assert flag in message and allowed in message and "Traceback" not in message


def test_a_bad_flag_stops_the_real_cli_before_any_work(tmp_path):
    result = run_cli("heads.train", "--cache", tmp_path / "missing.h5", "--out", tmp_path / "run", "--width", "0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--width" in result.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_the_baseline_takes_no_device(capsys):
    from heads.baseline import get_args_parser

    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--device", "cuda"])
    assert "unrecognized arguments: --device" in capsys.readouterr().err


def test_a_grid_trains_every_combination_and_scores_the_best(small_cache, tmp_path):
    out = tmp_path / "grid"
    result = call_main("heads.train", "--cache", small_cache, "--out", out, "--lr", "1e-2,1e-4",
                       "--weight-decay", "0,1e-2", "--max-epochs", "6", "--patience", "2", "--bootstrap", "20",
                       check_rc=0)
    assert "grid: 4 heads" in result.stdout
    grid = pd.read_csv(out / "grid.csv")
    assert len(grid) == 4 and set(zip(grid["lr"], grid["weight_decay"])) == {(1e-2, 0), (1e-2, 1e-2), (1e-4, 0),
                                                                            (1e-4, 1e-2)}
    chosen = grid[grid["chosen"]]
    assert len(chosen) == 1 and chosen["val_mean_auc"].iloc[0] == grid["val_mean_auc"].max()
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert (config["settings"]["lr"], config["settings"]["weight_decay"]) == (chosen["lr"].iloc[0],
                                                                            chosen["weight_decay"].iloc[0])
    assert metrics["val"]["mean_auc"] == pytest.approx(chosen["val_mean_auc"].iloc[0], abs=1e-6)
    # the chosen head is the same head trained alone with its settings
    alone = tmp_path / "alone"
    call_main("heads.train", "--cache", small_cache, "--out", alone, "--lr", str(chosen["lr"].iloc[0]),
              "--weight-decay", str(chosen["weight_decay"].iloc[0]), "--max-epochs", "6", "--patience", "2",
              "--bootstrap", "20", check_rc=0)
    a, b = (pd.read_csv(d / "predictions_test.csv") for d in (out, alone))
    probabilities = [c for c in a.columns if c.startswith("prob_")]
    assert np.allclose(a[probabilities], b[probabilities], atol=1e-5)


def test_test_rows_reach_no_choice(small_cache, tmp_path, monkeypatch):
    import heads.estimator

    grid = [{**FAST, "lr": lr} for lr in (1e-2, 1e-3, 1e-4)]
    clean = load_head_data(small_cache)
    _, first = fit_and_report(HeadGrid(grid), cache_path=small_cache, data=clean, out=tmp_path / "a", device="cpu",
                              n_bootstrap=10, quiet=True)
    poisoned = load_head_data(small_cache)
    poisoned.test.features = torch.randn_like(poisoned.test.features)  # test rows replaced by noise
    poisoned.test.labels = 1 - poisoned.test.labels
    seen = []
    real_fit_heads = heads.estimator.fit_heads

    def watching(*, train, val, **kwargs):
        seen.extend([train.features.data_ptr(), val.features.data_ptr()])
        return real_fit_heads(train=train, val=val, **kwargs)

    monkeypatch.setattr(heads.estimator, "fit_heads", watching)
    _, second = fit_and_report(HeadGrid(grid), cache_path=small_cache, data=poisoned, out=tmp_path / "b",
                               device="cpu", n_bootstrap=10, quiet=True)
    assert seen and poisoned.test.features.data_ptr() not in seen  # training never holds test rows
    assert second["grid"]["chosen"] == first["grid"]["chosen"] and second["best_epoch"] == first["best_epoch"]
    untimed = [[{k: v for k, v in line.items() if k != "seconds"} for line in m["history"]] for m in (first, second)]
    assert second["val"] == first["val"] and untimed[0] == untimed[1]
    a, b = (torch.load(tmp_path / d / "head.pt", weights_only=True) for d in ("a", "b"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert second["test"]["mean_auc"] < 0.6 < first["test"]["mean_auc"]  # test was scored, once, on what it held


def test_float16_features_cost_under_0002_of_validation_auc(small_cache):
    import numpy as np_

    half, full = load_head_data(small_cache), load_head_data(small_cache, dtype=np_.float32)
    assert half.train.features.dtype == torch.float16 and full.train.features.dtype == torch.float32
    for settings in ({**FAST, "lr": 3e-3}, {**FAST, "depth": 1, "width": 64, "lr": 1e-3}):
        a = fit_head(train=half.train, val=half.val, settings=settings, device="cpu")
        b = fit_head(train=full.train, val=full.val, settings=settings, device="cpu")
        assert abs(a.best_val_auc - b.best_val_auc) < 0.002


def test_published_figures_only_beside_the_official_nih_test_split():
    official = [f"{i:08d}_000.png" for i in range(25_596)]
    assert not is_official_nih_test(official)  # right size, wrong images
    metrics = {"test": {"auc": {"Atelectasis": 0.8}, "mean_auc": 0.8, "ci95": {"per_class": [[0.7, 0.9]],
                                                                             "mean": [0.7, 0.9]}},
               "val": {"auc": {"Atelectasis": 0.8}, "mean_auc": 0.8}}
    real = per_class_table(["Atelectasis"], metrics, official_nih=True)
    assert real["wang2017_resnet50"].iloc[0] == pytest.approx(0.716) and "Wang17" in format_table(real)
    other = per_class_table(["Atelectasis"], metrics, official_nih=False)
    assert other["wang2017_resnet50"].isna().all() and "Wang17" not in format_table(other)
    assert "not the official NIH test split" in format_table(other)


def test_the_official_test_ids_constant_matches_test_list():
    test_list = Path(os.environ.get("CXR14_NIH_METADATA", NIH_METADATA)) / "test_list.txt"
    if not test_list.exists():
        pytest.skip(f"{test_list} not found")
    ids = [line.strip() for line in test_list.read_text().splitlines() if line.strip()]
    assert image_ids_sha256(ids) == NIH_TEST_IDS_SHA256 and is_official_nih_test(ids[::-1])
    assert not is_official_nih_test(ids[1:])


def test_bootstrap_ci_matches_an_independent_resampling(small_cache, tmp_path):
    _, metrics = fit_and_report(HeadGrid([FAST]), cache_path=small_cache, out=tmp_path / "run", device="cpu",
                                n_bootstrap=40, quiet=True)
    predictions = pd.read_csv(tmp_path / "run" / "predictions_test.csv")
    patients = np.unique(predictions["patient_id"])
    rows_of = {p: np.flatnonzero(predictions["patient_id"].to_numpy() == p) for p in patients}
    rng = np.random.default_rng(FAST["seed"])  # the documented draw: patients with replacement, seeded
    draws = rng.integers(0, len(patients), size=(40, len(patients)))
    aucs = []
    for draw in draws:  # rows repeated explicitly, scored by scikit-learn: no shared AUC code
        rows = np.concatenate([rows_of[patients[i]] for i in draw])
        aucs.append(roc_auc_score(predictions["label_Atelectasis"].to_numpy()[rows],
                                  predictions["prob_Atelectasis"].to_numpy()[rows]))
    expected = np.percentile(aucs, [2.5, 97.5])
    # the kit weighs resamples in float32: equal to about 1e-7
    assert metrics["test"]["ci95"]["per_class"][0] == pytest.approx(expected, abs=1e-6)


def test_a_tiny_validation_split_is_said_labelled_and_its_ties_explained(tmp_path):
    import h5py

    path = tmp_path / "tiny-val.h5"
    table = write_synthetic_cache(path, rows={"train": 600, "val": 6, "test": 300}, dim=16, separation=1.0)
    hernia = list(CLASSES).index("Hernia")
    with h5py.File(path, "r+") as f:
        labels = f["labels"][()]
        labels[table["split"] == "train", hernia] = 0
        f["labels"][...] = labels
    val_labels = labels[table["split"] == "val"]
    val_scored = int(((val_labels.sum(axis=0) > 0) & (val_labels.sum(axis=0) < len(val_labels))).sum())
    assert val_scored < 14  # the fixture does what it should: validation cannot score every class
    out = tmp_path / "run"
    # depth 0 ignores dropout: two identical heads, a certain tie on validation
    result = run_cli("heads.train", "--cache", path, "--out", out, "--dropout", "0,0.5", "--max-epochs", "6",
                     "--bootstrap", "10", check_rc=0)
    warnings = result.stderr.splitlines()
    assert len([w for w in warnings if f"validation (6 rows) can score {val_scored} of the 14 classes" in w]) == 1
    assert len([w for w in warnings if "no train positive for Hernia" in w]) == 1
    assert f"mean (test 14, val {val_scored})" in result.stdout
    table_csv = pd.read_csv(out / "per_class_auc.csv")
    assert table_csv["class"].iloc[-1] == f"mean (test 14, val {val_scored})"
    assert "2 heads tie at the best validation mean AUC, the first in grid order is scored" in result.stdout
    assert pd.read_csv(out / "grid.csv")["chosen"].tolist() == [True, False]
    history = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    best = max(line["val_mean_auc"] for line in history)
    tied = [line["epoch"] for line in history if line["val_mean_auc"] == best]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_epoch"] == tied[0] and metrics["epochs_tied"] == len(tied)
    assert (f"{len(tied)} epochs tie at it, the earliest is kept" in result.stdout) == (len(tied) > 1)
    assert f"over {val_scored} classes" in result.stdout
    assert json.loads((out / "config.json").read_text())["classes_without_train_positive"] == ["Hernia"]
