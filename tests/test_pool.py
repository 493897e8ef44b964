"""heads.train --pool: one head on the union of several datasets' rows (heads/pool.py)."""
import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import cache
from cache.synthetic import write_synthetic_cache
from conftest import call_main
from heads import train as train_cli
from heads.pool import load_pooled_data

ROWS = {"train": 450, "val": 180, "test": 180}
FAST = ["--max-epochs", "8", "--batch-size", "64", "--lr", "0.01", "--bootstrap", "40", "--precision", "fp32", "--device", "cpu"]


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    chexpert, padchest = root / "chexpert.h5", root / "padchest.h5"
    write_synthetic_cache(chexpert, rows=ROWS, dim=12, dataset="chexpert", unknown=0.2, weights="one-encoder",
                          classes=["Atelectasis", "Cardiomegaly", "Pleural Effusion"], separation=2.0, seed=1)
    write_synthetic_cache(padchest, rows=ROWS, dim=12, dataset="padchest", weights="one-encoder",
                          classes=["atelectasis", "nodule", "pleural effusion"], separation=2.0, seed=2)
    return chexpert, padchest


def test_the_union_of_rows_and_classes_with_unknown_where_a_dataset_lacks_a_class(two_datasets):
    chexpert, padchest = two_datasets
    data = load_pooled_data([chexpert, padchest])
    assert data.classes == ["Atelectasis", "Cardiomegaly", "Effusion", "Nodule"]  # the shared vocabulary
    assert data.pooled == ["chexpert", "padchest"]
    for split, n in ROWS.items():
        rows = data.splits[split]
        assert len(rows) == 2 * n and sorted(set(rows.source)) == ["chexpert", "padchest"]
        labels = rows.labels.numpy()
        from_padchest = rows.source == "padchest"
        assert np.isnan(labels[from_padchest, 1]).all()  # PadChest has no Cardiomegaly here
        assert np.isnan(labels[~from_padchest, 3]).all()  # CheXpert no Nodule
        assert not np.isnan(labels[from_padchest, 0]).any()  # PadChest's labels are all known
    # ids stay unique across datasets, and patients never cross splits or datasets
    ids = np.concatenate([s.image_ids for s in data.splits.values()])
    assert len(set(ids)) == len(ids)
    patients = [set(s.patient_ids) for s in data.splits.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    # one standardization: the pooled train rows have mean 0 and std 1 per feature
    train = data.train.features.float().numpy()
    assert np.abs(train.mean(axis=0)).max() < 0.02 and np.abs(train.std(axis=0) - 1).max() < 0.02


def test_a_pooled_run_reports_test_per_dataset_recomputably(two_datasets, tmp_path):
    chexpert, padchest = two_datasets
    out = tmp_path / "pooled"
    printed = call_main("heads.train", "--pool", "--cache", chexpert, "--cache", padchest, "--out", out, *FAST,
                        check_rc=0).stdout
    assert "pooled, chexpert rows only" in printed and "pooled, padchest rows only" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["pooled"]["datasets"] == ["chexpert", "padchest"]
    predictions = pd.read_csv(out / "predictions_test.csv")
    for dataset in ("chexpert", "padchest"):
        rows = predictions[predictions["image_id"].str.startswith(f"{dataset}:")]
        figures = metrics["by_dataset"][dataset]["test"]
        assert figures["rows"] == len(rows) == ROWS["test"]
        for name, auc in figures["auc"].items():
            labels = rows[f"label_{name}"]
            if auc is None:
                assert labels.isna().all()
                continue
            known = labels.notna()
            assert auc == pytest.approx(roc_auc_score(labels[known], rows.loc[known, f"prob_{name}"]))
    assert metrics["by_dataset"]["padchest"]["test"]["mean_over"] == ["Atelectasis", "Effusion", "Nodule"]
    assert metrics["test"]["mean_auc"] > 0.8  # the planted signal (AUC 0.92) is learnt from both datasets' rows


def test_pooling_refuses_other_encoders_and_the_same_dataset_twice(two_datasets, tmp_path, capsys):
    chexpert, padchest = two_datasets
    other = tmp_path / "other.h5"
    write_synthetic_cache(other, rows=ROWS, dim=12, dataset="vindr", weights="another-encoder",
                          classes=["Pleural effusion"], seed=3)
    for caches, said in (([chexpert, other], "different encoders (they differ in weights"),
                         ([chexpert, chexpert.with_name("copy.h5")], "two caches of the dataset chexpert"),
                         ([chexpert], "--pool needs at least two caches")):
        if caches[-1].name == "copy.h5":
            caches[-1].write_bytes(chexpert.read_bytes())
        args = ["--pool", *[x for c in caches for x in ("--cache", str(c))], "--out", str(tmp_path / "run"), *FAST]
        assert train_cli.main(train_cli.get_args_parser().parse_args(args)) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1
        assert not (tmp_path / "run").exists()


def test_by_without_metadata_is_refused_before_training(tmp_path, capsys):
    path = tmp_path / "nih.h5"
    write_synthetic_cache(path, rows=ROWS, dim=12)  # version 1: no metadata group
    if cache.read_metadata(path) is not None:
        pytest.skip("this cache version carries metadata")
    assert train_cli.main(train_cli.get_args_parser().parse_args(
        ["--cache", str(path), "--out", str(tmp_path / "run"), "--by", "sex", *FAST])) == 2
    assert "--by sex needs per-row sex, age and view" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_pooled_run_scored_elsewhere_is_named_as_pooled(two_datasets, tmp_path):
    chexpert, padchest = two_datasets
    vindr = tmp_path / "vindr.h5"
    write_synthetic_cache(vindr, rows=ROWS, dim=12, dataset="vindr", weights="one-encoder",
                          classes=["Atelectasis", "Pleural effusion", "Aortic enlargement"], separation=2.0, seed=3)
    call_main("heads.train", "--pool", "--cache", chexpert, "--cache", padchest, "--out", tmp_path / "pooled", *FAST,
              check_rc=0)
    printed = call_main("heads.evaluate", tmp_path / "pooled", "--cache", vindr, "--out", tmp_path / "on-vindr",
                        "--bootstrap", "40", check_rc=0).stdout
    assert "Effusion (pooled CheXpert + PadChest) vs Pleural effusion (VinDr-CXR)" in printed
    metrics = json.loads((tmp_path / "on-vindr" / "metrics.json").read_text())
    assert metrics["source_run"]["dataset"] == "chexpert+padchest"
    assert metrics["test"]["mean_over"] == ["Atelectasis", "Pleural effusion"]  # Nodule has no VinDr counterpart
