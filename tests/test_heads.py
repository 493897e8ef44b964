import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

import cache
from cache.synthetic import known_auc, write_synthetic_cache
from conftest import call_main, predict_saved_test_images
from heads import settings as head_settings
from heads.data import HeadsError, load_head_data
from heads.metrics import auc_per_class, bootstrap_auc, roc_points, weighted_auc
from heads.model import class_weights, weighted_bce
from heads.fit import fit_head, load_head, predict_proba
from heads.training import train_and_report

FAST = {**head_settings.DEFAULTS, "max_epochs": 40, "patience": 5, "lr": 1e-2}


@pytest.fixture(scope="module")
def known_cache(tmp_path_factory):
    """Features with a known best AUC of 0.80 per class."""
    path = tmp_path_factory.mktemp("known") / "features.h5"
    write_synthetic_cache(path, rows={"train": 6000, "val": 1500, "test": 4000}, dim=32, separation=1.19)
    return path


@pytest.fixture(scope="module")
def known_data(known_cache):
    return load_head_data(known_cache)


def test_weighted_bce_matches_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w_pos, w_neg = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 0.25])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    by_hand = (-2.0 * math.log(sig(2.0)) - 0.25 * math.log(1 - sig(-1.0))
               - 0.5 * math.log(1 - sig(0.5)) - 3.0 * math.log(sig(3.0))) / 4
    assert weighted_bce(logits, targets, w_pos, w_neg).item() == pytest.approx(by_hand, rel=1e-6)
    # stable where a naive log(sigmoid) would give inf
    assert torch.isfinite(weighted_bce(torch.tensor([[200.0]]), torch.tensor([[0.0]]), w_pos[:1], w_neg[:1]))


def test_class_weights_follow_train_frequencies():
    labels = torch.tensor([[1, 0, 0]] * 1 + [[0, 1, 0]] * 3, dtype=torch.float32)  # 4 rows; class 2 never positive
    w_pos, w_neg = class_weights(labels, "balanced")
    assert w_pos.tolist() == pytest.approx([4 / 2, 4 / 6, 1.0])
    assert w_neg.tolist() == pytest.approx([4 / 6, 4 / 2, 1.0])
    sqrt_pos, _ = class_weights(labels, "sqrt")
    assert sqrt_pos.tolist() == pytest.approx([math.sqrt(2), math.sqrt(4 / 6), 1.0])
    assert class_weights(labels, "none")[0].tolist() == [1.0, 1.0, 1.0]


def test_aucs_and_bootstrap_equal_scikit_learn():
    rng = np.random.default_rng(0)
    labels = (rng.random((500, 3)) < 0.3).astype(int)
    scores = np.round(rng.random((500, 3)) + labels * 0.3, 2)  # rounding makes ties
    expected = [roc_auc_score(labels[:, c], scores[:, c]) for c in range(3)]
    assert auc_per_class(labels, scores) == pytest.approx(expected, abs=1e-12)
    # integer weights are the same as repeating rows
    counts = rng.integers(0, 3, size=500)
    repeated = np.repeat(np.arange(500), counts)
    weighted = weighted_auc(labels[:, 0], scores[:, 0], counts[None].astype(float))[0]
    assert weighted == pytest.approx(roc_auc_score(labels[repeated, 0], scores[repeated, 0]), abs=1e-12)
    resampled = bootstrap_auc(labels, scores, patient_ids=np.arange(500) // 4, n_resamples=50)
    assert resampled.shape == (50, 3) and abs(resampled.mean(axis=0) - expected).max() < 0.03


def test_roc_points_equal_scikit_learn():
    rng = np.random.default_rng(1)
    labels = (rng.random(400) < 0.2).astype(int)
    scores = np.round(rng.random(400) + labels * 0.4, 2).astype(np.float32)  # float32 with ties
    fpr, tpr = roc_points(labels, scores)
    expected_fpr, expected_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, expected_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr, expected_tpr, atol=1e-15)


def test_head_recovers_the_known_auc(known_data):
    fit = fit_head(train=known_data.train, val=known_data.val, settings=FAST, device="cpu")
    scores = predict_proba(fit.model, known_data.test.features)
    labels = known_data.test.labels.numpy()
    oracle = [roc_auc_score(labels[:, c], known_data.test.features[:, c].numpy()) for c in range(14)]
    head = [roc_auc_score(labels[:, c], scores[:, c]) for c in range(14)]
    assert np.mean(oracle) == pytest.approx(known_auc(1.19), abs=0.01)
    assert np.abs(np.array(head) - oracle).max() < 0.02


def test_training_is_deterministic_on_cpu(known_data):
    settings = {**FAST, "depth": 1, "width": 64, "dropout": 0.2, "max_epochs": 4}
    first = fit_head(train=known_data.train, val=known_data.val, settings=settings, device="cpu")
    second = fit_head(train=known_data.train, val=known_data.val, settings=settings, device="cpu")
    assert [h["val_mean_auc"] for h in first.history] == [h["val_mean_auc"] for h in second.history]
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)


def test_early_stopping_restores_the_best_epoch(known_data):
    settings = {**FAST, "depth": 2, "width": 256, "lr": 3e-3, "max_epochs": 30, "patience": 3}
    fit = fit_head(train=known_data.train, val=known_data.val, settings=settings, device="cpu")
    aucs = [h["val_mean_auc"] for h in fit.history]
    assert len(aucs) == fit.best_epoch + 3 < 30  # stopped `patience` epochs after the best
    assert fit.best_val_auc == max(aucs) and aucs[-1] < max(aucs)
    restored = auc_per_class(known_data.val.labels.numpy(), predict_proba(fit.model, known_data.val.features))
    assert np.mean(restored) == pytest.approx(fit.best_val_auc, abs=1e-12)


def test_test_data_reaches_no_choice(known_cache, tmp_path):
    data = load_head_data(known_cache)
    _, first = train_and_report(cache_path=known_cache, settings=FAST, out=tmp_path / "a", device="cpu",
                                n_bootstrap=20, data=data, quiet=True)
    data.test.features = torch.randn_like(data.test.features)  # test features replaced by noise
    data.test.labels = 1 - data.test.labels
    _, second = train_and_report(cache_path=known_cache, settings=FAST, out=tmp_path / "b", device="cpu",
                                 n_bootstrap=20, data=data, quiet=True)
    assert second["best_epoch"] == first["best_epoch"] and second["val"] == first["val"]
    assert second["test"]["mean_auc"] != first["test"]["mean_auc"]
    a, b = (torch.load(tmp_path / d / "head.pt", weights_only=True) for d in ("a", "b"))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_run_directory_recomputes_from_saved_predictions(extracted_cache, tmp_path):
    out = tmp_path / "run"
    result = call_main("heads.train", "--cache", extracted_cache, "--out", out, "--max-epochs", "5",
                       "--bootstrap", "200", check_rc=0)
    assert "test AUC" in result.stdout and str(out) in result.stdout
    # synthetic images: labelled as such, no published figures beside them
    assert "Wang17" not in result.stdout and "not the official NIH test split" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    # the synthetic images' planted findings are learnable even from a random backbone
    assert metrics["test"]["mean_auc"] > 0.6
    config = json.loads((out / "config.json").read_text())
    assert config["cache_fingerprint"] == cache.read_attrs(extracted_cache)["fingerprint"]
    assert config["settings"]["max_epochs"] == 5 and "torch" in config["versions"]
    predictions = pd.read_csv(out / "predictions_test.csv")
    classes = config["cache_attrs"]["classes"]
    for name in classes:
        recomputed = roc_auc_score(predictions[f"label_{name}"], predictions[f"prob_{name}"])
        assert recomputed == pytest.approx(metrics["test"]["auc"][name], abs=1e-12)
    assert np.mean(list(metrics["test"]["auc"].values())) == pytest.approx(metrics["test"]["mean_auc"], abs=1e-12)
    resampled = bootstrap_auc(predictions[[f"label_{c}" for c in classes]].to_numpy(),
                              predictions[[f"prob_{c}" for c in classes]].to_numpy(),
                              predictions["patient_id"].to_numpy(), n_resamples=200, seed=0)
    low, high = np.nanpercentile(resampled[:, 0], [2.5, 97.5])
    assert [low, high] == pytest.approx(metrics["test"]["ci95"]["per_class"][0], abs=1e-6)
    table = pd.read_csv(out / "per_class_auc.csv")
    assert list(table["class"][:14]) == classes and table["wang2017_resnet50"].isna().all()
    assert config["official_nih_test_split"] is False
    assert (out / "roc_curves.png").stat().st_size > 10_000
    assert len((out / "train_log.jsonl").read_text().splitlines()) == metrics["epochs_run"]
    # the checkpoint round-trips with weights_only=True and reproduces the saved predictions
    model, checkpoint = load_head(out / "head.pt")
    data = load_head_data(extracted_cache)
    again = predict_proba(model, data.test.features)
    assert np.allclose(again, predictions[[f"prob_{c}" for c in classes]].to_numpy(), atol=1e-7)
    assert torch.equal(checkpoint["feature_mean"], data.feature_mean)
    # a second run into the same folder is refused rather than overwriting it
    result = call_main("heads.train", "--cache", extracted_cache, "--out", out)
    assert result.returncode == 2 and "already holds a run" in result.stderr


def test_unscorable_class_is_left_out_of_the_mean(tmp_path):
    path = tmp_path / "c.h5"
    table = write_synthetic_cache(path, rows={"train": 400, "val": 200, "test": 200}, dim=16)
    import h5py
    with h5py.File(path, "r+") as f:  # no Hernia in test
        labels = f["labels"][()]
        labels[table["split"] == "test", 7] = 0
        f["labels"][...] = labels
    _, metrics = train_and_report(cache_path=path, settings=FAST, out=tmp_path / "run", device="cpu",
                                  n_bootstrap=20, quiet=True)
    assert metrics["test"]["auc"]["Hernia"] is None and metrics["test"]["not_scorable"] == ["Hernia"]
    scored = [v for v in metrics["test"]["auc"].values() if v is not None]
    assert len(scored) == 13 and metrics["test"]["mean_auc"] == pytest.approx(np.mean(scored))


def _write_bad_cache(path, problem):
    table = write_synthetic_cache(path, rows={"train": 100, "val": 50, "test": 50}, dim=8)
    import h5py
    with h5py.File(path, "r+") as f:
        if problem == "nan":
            f["features"][3] = np.nan
        if problem == "no-val":
            f["done"][np.flatnonzero(table["split"] == "val")] = False
    if problem == "pending":
        cache.PartWriter(path, fingerprint=cache.read_attrs(path)["fingerprint"]).write(
            rows=[0], features=np.zeros((1, 8), np.float16))


@pytest.mark.parametrize("problem, message", [
    ("missing", "no cache at"),
    ("nan", "NaN or infinite features"),
    ("no-val", "no done rows in the val split"),
    ("pending", "not merged yet"),
])
def test_bad_caches_give_clear_errors_and_no_run(tmp_path, problem, message):
    path = tmp_path / "c.h5"
    if problem != "missing":
        _write_bad_cache(path, problem)
    result = call_main("heads.train", "--cache", path, "--out", tmp_path / "run")
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_diverging_loss_stops_with_a_message_and_no_run(known_data, known_cache, tmp_path):
    # an lr this large is refused on the command line; the library path still has to fail cleanly
    exploding = {**FAST, "lr": 1e20, "depth": 1, "width": 16}
    with pytest.raises(HeadsError, match="training loss became nan"):
        train_and_report(cache_path=known_cache, settings=exploding, out=tmp_path / "run", device="cpu",
                         data=known_data, n_bootstrap=10, quiet=True)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_sklearn_baseline_writes_the_same_table(known_cache, tmp_path):
    result = call_main("heads.baseline", "--cache", known_cache, "--out", tmp_path / "sk", "--bootstrap", "20",
                       check_rc=0)
    assert "sklearn LogisticRegression one per class trained in" in result.stdout
    metrics = json.loads((tmp_path / "sk" / "metrics.json").read_text())
    assert metrics["test"]["mean_auc"] == pytest.approx(known_auc(1.19), abs=0.02)
    assert (tmp_path / "sk" / "predictions_test.csv").exists() and metrics["train_seconds"] > 0


def test_predict_scores_images_like_the_cache(extracted_cache, synthetic_dir, tmp_path):
    out = tmp_path / "run"
    call_main("heads.train", "--cache", extracted_cache, "--out", out, "--max-epochs", "3", "--bootstrap", "10",
              check_rc=0)
    csv = tmp_path / "p.csv"
    images, predicted, saved = predict_saved_test_images(out, synthetic_dir, csv, n=4)
    assert np.allclose(predicted, saved, atol=2e-3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnope")
    result = call_main("heads.predict", "--run", out, images[0], broken, "--out", csv, "--device", "cpu")
    assert result.returncode == 1 and "broken.png" in result.stderr and len(pd.read_csv(csv)) == 1
    config = json.loads((out / "config.json").read_text())
    config["cache_attrs"]["weights"], config["cache_attrs"]["weights_sha256"] = "file:mine.pth", "0" * 64
    (out / "config.json").write_text(json.dumps(config))
    result = call_main("heads.predict", "--run", out, images[0], "--out", csv)
    assert result.returncode == 2 and "pass that file with --weights" in result.stderr


def _captured_figure(monkeypatch):
    """Every matplotlib figure saved, by file name, kept for inspection (the PNG is still written)."""
    from matplotlib.figure import Figure

    saved, original = {}, Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, *a, **k: (saved.setdefault(Path(path).name, fig),
                                                                       original(fig, path, *a, **k))[1])
    return saved


def _texts(figure):
    return [(t.get_text(), t.get_color()) for sub in [figure, *figure.subfigs] for t in sub.texts]


def test_roc_figure_names_the_run_scores_and_lists_what_it_cannot_draw(tmp_path, monkeypatch):
    import h5py

    path = tmp_path / "figure.h5"
    table = write_synthetic_cache(path, rows={"train": 600, "val": 300, "test": 300}, dim=16, separation=1.0)
    hernia = list(cache.CLASSES).index("Hernia")
    with h5py.File(path, "r+") as f:  # no test positive for Hernia: test cannot score it
        labels = f["labels"][()]
        labels[table["split"] == "test", hernia] = 0
        f["labels"][...] = labels
    saved = _captured_figure(monkeypatch)
    out = tmp_path / "run"
    call_main("heads.train", "--cache", path, "--out", out, "--max-epochs", "2", "--bootstrap", "20", check_rc=0)
    assert (out / "roc_curves.png").stat().st_size > 10_000
    metrics = json.loads((out / "metrics.json").read_text())
    roc = saved["roc_curves.png"]
    texts = _texts(roc)
    header = " ".join(text for text, _ in texts)
    assert "synthetic-gaussian (separation=1.0)" in header and "cache figure.h5" in header
    assert "13 of 14 classes scored on test" in header
    assert "not scorable on test (no known positive or no known negative): Hernia" in header
    assert ("SYNTHETIC FEATURES", "red") in texts
    assert ("SYNTHETIC FEATURES", "red") in _texts(saved["reliability.png"])  # every figure of the run
    panels = [ax for ax in roc.get_axes() if ax.get_visible() and ax.axison]
    assert len(panels) == 13 and not any("Hernia" in ax.get_title() for ax in panels)
    test_labels = labels[table["split"] == "test"]
    for ax in panels:
        assert ax.get_xlabel() == "false positive rate" and ax.get_ylabel() == "true positive rate"
        name = ax.get_title().split(" (")[0]
        index = list(metrics["test"]["auc"]).index(name)
        low, high = metrics["test"]["ci95"]["per_class"][index]
        assert f"n+ = {int(test_labels[:, index].sum())}" in ax.get_title()
        assert f"AUC {metrics['test']['auc'][name]:.3f} [{low:.3f}, {high:.3f}]" in ax.get_title()


def test_roc_figure_of_random_encoder_weights_is_marked(extracted_cache, tmp_path, monkeypatch):
    saved = _captured_figure(monkeypatch)
    call_main("heads.train", "--cache", extracted_cache, "--out", tmp_path / "run", "--max-epochs", "1",
              "--bootstrap", "10", check_rc=0)
    texts = _texts(saved["roc_curves.png"])
    assert ("RANDOM ENCODER WEIGHTS: a pipeline test, not a result", "red") in texts
    assert any("resnet50 (random(seed=0)), cache features.h5" in text for text, _ in texts)
