"""Loading caches for the heads: float16 standardized features, several caches joined by image
id into named feature blocks."""
import json

import h5py
import numpy as np
import pytest
import torch

import cache
from cache.synthetic import write_synthetic_cache
from conftest import call_main
from heads.data import HeadsError, load_head_data

ROWS = {"train": 600, "val": 300, "test": 300}


@pytest.fixture(scope="module")
def two_caches(tmp_path_factory):
    """Two 'encoders' of the same images: same rows and labels, other features and widths."""
    folder = tmp_path_factory.mktemp("two")
    write_synthetic_cache(folder / "a.h5", rows=ROWS, dim=16, separation=1.0, seed=0)
    write_synthetic_cache(folder / "b.h5", rows=ROWS, dim=8, separation=0.5, seed=0)
    return folder / "a.h5", folder / "b.h5"


def _raw(path, ids):
    table = cache.read_table(path)
    position = {image_id: i for i, image_id in enumerate(table["image_id"])}
    rows = np.array([position[i] for i in ids])
    return cache.read_features(path, {"x": rows})["x"].astype(np.float64)


def test_features_are_float16_standardized_with_train_statistics(two_caches):
    data = load_head_data(two_caches[0])
    assert data.train.features.dtype == torch.float16
    raw_train = _raw(two_caches[0], data.train.image_ids)
    mean, std = raw_train.mean(axis=0), raw_train.std(axis=0)
    assert np.allclose(data.feature_mean.numpy(), mean, atol=1e-5)
    assert np.allclose(data.feature_std.numpy(), std, atol=1e-5)
    expected_test = (_raw(two_caches[0], data.test.image_ids) - mean) / std
    # float16 keeps about 3 significant digits of a standardized value
    assert np.abs(data.test.features.float().numpy() - expected_test).max() < 4e-3
    assert len(set(data.train.image_ids) & set(data.test.image_ids)) == 0


def test_two_caches_join_side_by_side_and_select_their_blocks(two_caches):
    a, b = two_caches
    joined = load_head_data([a, b])
    alone_a, alone_b = load_head_data(a), load_head_data(b)
    assert joined.blocks == {str(a): (0, 16), str(b): (16, 24)}
    assert [entry["fingerprint"] for entry in joined.caches] == [alone_a.attrs["fingerprint"],
                                                                 alone_b.attrs["fingerprint"]]
    for name in ("train", "val", "test"):
        split = joined.splits[name]
        assert split.features.shape[1] == 24
        assert torch.equal(split.features[:, :16], alone_a.splits[name].features)
        assert torch.equal(split.features[:, 16:], alone_b.splits[name].features)
        assert torch.equal(split.labels, alone_a.splits[name].labels)
    only_b = joined.select([str(b)])
    assert torch.equal(only_b.test.features, alone_b.test.features)
    assert torch.equal(only_b.feature_mean, alone_b.feature_mean) and only_b.attrs == alone_b.attrs
    swapped = joined.select([str(b), str(a)])  # not adjacent in this order: a copy
    assert torch.equal(swapped.val.features, torch.cat([alone_b.val.features, alone_a.val.features], dim=1))
    assert swapped.blocks == {str(b): (0, 8), str(a): (8, 24)}
    with pytest.raises(HeadsError, match="unknown feature blocks"):
        joined.select(["nope.h5"])


def test_a_row_is_used_only_where_every_cache_has_it(two_caches, tmp_path):
    a = tmp_path / "a.h5"
    a.write_bytes(two_caches[0].read_bytes())
    table = cache.read_table(a)
    missing = np.flatnonzero(table["split"] == "val")[:5]
    with h5py.File(a, "r+") as f:
        done = f["done"][()]
        done[missing] = False
        f["done"][...] = done
    joined = load_head_data([a, two_caches[1]])
    assert joined.excluded["val"] == 5 and len(joined.val) == ROWS["val"] - 5
    assert not set(table["image_id"][missing]) & set(joined.val.image_ids)


@pytest.mark.parametrize("change, message", [
    ("labels", "disagree on the labels"),
    ("split", "disagree on the splits"),
    ("rows", "different image ids"),
])
def test_caches_of_other_images_are_refused(two_caches, tmp_path, change, message):
    other = tmp_path / "other.h5"
    rows = dict(ROWS, test=ROWS["test"] - 3) if change == "rows" else ROWS
    write_synthetic_cache(other, rows=rows, dim=4, seed=0 if change != "labels" else 1)
    if change == "split":  # move whole patients from val to test keeps patients disjoint
        table = cache.read_table(other)
        val_patients = np.unique(table["patient_id"][table["split"] == "val"])[:2]
        with h5py.File(other, "r+") as f:
            split = table["split"].copy()
            split[np.isin(table["patient_id"], val_patients)] = "test"
            f["split"][...] = split.astype(object)
    with pytest.raises(HeadsError, match=message):
        load_head_data([two_caches[0], other])
    result = call_main("heads.train", "--cache", two_caches[0], "--cache", other, "--out", tmp_path / "run")
    assert result.returncode == 2 and message in result.stderr and not (tmp_path / "run").exists()


def test_a_val_split_with_nothing_to_score_stops_before_training(tmp_path):
    path = tmp_path / "c.h5"
    table = write_synthetic_cache(path, rows=ROWS, dim=4)
    with h5py.File(path, "r+") as f:
        labels = f["labels"][()]
        labels[table["split"] == "val"] = 0
        f["labels"][...] = labels
    result = call_main("heads.train", "--cache", path, "--out", tmp_path / "run")
    assert result.returncode == 2 and "no class has both known positive and known negative rows in the val split" in result.stderr


def test_train_on_two_caches_records_both(two_caches, tmp_path):
    a, b = two_caches
    out = tmp_path / "run"
    call_main("heads.train", "--cache", a, "--cache", b, "--out", out, "--max-epochs", "2", "--bootstrap", "10",
              check_rc=0)
    config = json.loads((out / "config.json").read_text())
    assert [c["path"] for c in config["caches"]] == [str(a.resolve()), str(b.resolve())]
    assert [c["columns"] for c in config["caches"]] == [[0, 16], [16, 24]]
    assert torch.load(out / "head.pt", weights_only=True)["in_dim"] == 24


def _rescale_features(path, *, scale: float, offset: float) -> None:
    """Every done row's features become x * scale + offset, stored in the cache's own dtype."""
    with h5py.File(path, "r+") as f:
        done = f["done"][()]
        features = f["features"][()]
        features[done] = features[done].astype(np.float64) * scale + offset
        f["features"][...] = features


def test_an_affine_rescale_of_a_float32_cache_changes_nothing(tmp_path):
    original, rescaled = tmp_path / "original.h5", tmp_path / "rescaled.h5"
    write_synthetic_cache(original, rows=ROWS, dim=16, separation=1.0, feature_dtype="float32")
    rescaled.write_bytes(original.read_bytes())
    _rescale_features(rescaled, scale=1000.0, offset=1e6)  # far beyond float16's +-65,504
    a, b = load_head_data(original), load_head_data(rescaled)
    assert b.train.features.dtype == torch.float16
    assert np.allclose(b.feature_mean.numpy(), a.feature_mean.numpy() * 1000 + 1e6, rtol=1e-6)
    assert np.allclose(b.feature_std.numpy(), a.feature_std.numpy() * 1000, rtol=1e-4)
    for name in ("train", "val", "test"):
        assert (a.splits[name].features.float() - b.splits[name].features.float()).abs().max() < 4e-3
    aucs = []
    for path in (original, rescaled):
        out = tmp_path / f"run-{path.stem}"
        call_main("heads.train", "--cache", path, "--out", out, "--max-epochs", "5", "--lr", "1e-2", "--batch-size", "64",
                  "--bootstrap", "10", check_rc=0)
        aucs.append(json.loads((out / "metrics.json").read_text())["val"]["mean_auc"])
    assert aucs[0] > 0.6 and aucs[1] == pytest.approx(aucs[0], abs=0.005)


def test_train_statistics_are_exact_far_from_zero(tmp_path):
    """The variance of features with a large offset, where sum(x^2)/n - mean^2 cancels."""
    path = tmp_path / "offset.h5"
    write_synthetic_cache(path, rows=ROWS, dim=4, feature_dtype="float32")
    _rescale_features(path, scale=1.0, offset=3e4)
    data = load_head_data(path, dtype=np.float32)
    raw = _raw(path, data.train.image_ids)
    assert np.allclose(data.feature_std.numpy(), raw.std(axis=0), rtol=1e-4)
    assert np.allclose(data.train.features.numpy(), (raw - raw.mean(axis=0)) / raw.std(axis=0), atol=1e-3)
