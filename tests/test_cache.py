import multiprocessing
import json

import h5py
import numpy as np
import pytest

import cache
from cache.check import describe, find_problems
from conftest import call_main, run_cli

CLASSES = ["A", "B", "C"]


def _settings(**override):
    settings = {key: 1 for key in cache.FINGERPRINT_KEYS}
    settings.update(classes=CLASSES, backbone="resnet50", weights="random(seed=0)", preprocessing={"x": 1},
                    split_source="official lists", versions={"torch": "x"})
    settings.update(override)
    return settings


def _make(path, n_rows=10, dim=4):
    table = {"image_id": [f"{i:03d}.png" for i in range(n_rows)],
             "patient_id": np.array([0, 0, 1, 1, 2] * (n_rows // 5)) + 3 * (np.arange(n_rows) // 5),
             "labels": np.eye(3, dtype=np.uint8)[np.arange(n_rows) % 3],
             "split": np.array(["train", "train", "val", "val", "test"] * (n_rows // 5), dtype=object)}
    cache.create_cache(path, table=table, feature_dim=dim, feature_dtype="float32", attrs=_settings())
    return table


def test_round_trip_and_fingerprint(tmp_path):
    path = tmp_path / "c.h5"
    table = _make(path)
    back = cache.read_table(path)
    assert list(back["image_id"]) == table["image_id"]
    assert (back["labels"] == table["labels"]).all() and not back["done"].any()
    attrs = cache.read_attrs(path)
    assert attrs["preprocessing"] == {"x": 1} and attrs["classes"] == CLASSES
    assert len(attrs["fingerprint"]) == 64  # its value: test_cache_writers, from the documented form
    with h5py.File(path) as f:  # any HDF5 tool sees plain datasets
        assert f["features"].shape == (10, 4) and np.isnan(f["features"][0]).all()


def test_parts_merge_into_done_rows_and_errors(tmp_path):
    path = tmp_path / "c.h5"
    _make(path)
    fingerprint = cache.read_attrs(path)["fingerprint"]
    writer = cache.PartWriter(path, fingerprint=fingerprint)
    features = np.arange(16, dtype=np.float32).reshape(4, 4)
    writer.write(rows=[5, 0, 1, 2], features=features, failed_rows=[7], failed_reasons=["bad.png: truncated"])
    assert cache.pending_part_rows(path) == 5
    assert cache.merge_parts(path) == 5 and cache.pending_part_rows(path) == 0
    table = cache.read_table(path)
    assert table["done"].tolist() == [True, True, True, False, False, True, False, False, False, False]
    assert table["error"][7] == "bad.png: truncated"
    got = cache.read_features(path, {"some": np.array([0, 5]), "other": np.array([1, 2])}, block_rows=3)
    assert (got["some"] == features[[1, 0]]).all() and (got["other"] == features[[2, 3]]).all()
    assert find_problems(path) == []
    assert "rows" in describe(path)


def test_a_part_for_another_cache_is_refused(tmp_path):
    path = tmp_path / "c.h5"
    _make(path)
    cache.PartWriter(path, fingerprint="other").write(rows=[0], features=np.zeros((1, 4), np.float32))
    with pytest.raises(cache.CacheError, match="written for another cache"):
        cache.merge_parts(path)
    assert cache.read_table(path)["done"].sum() == 0  # the cache itself is untouched


def test_a_damaged_part_names_the_file(tmp_path):
    path = tmp_path / "c.h5"
    _make(path)
    (cache.store.parts_dir(path)).mkdir()
    (cache.store.parts_dir(path) / "r0-1-1-000000.npz").write_bytes(b"garbage")
    with pytest.raises(cache.CacheError, match="r0-1-1-000000.npz is unreadable"):
        cache.merge_parts(path)


def test_missing_or_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(cache.CacheError, match="no cache at .*run `python -m extract --data-dir DIR --split all --cache "):
        cache.read_table(tmp_path / "none.h5")
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"0" * 100)
    with pytest.raises(cache.CacheError, match="junk.h5 is (a damaged HDF5 file|not an HDF5 file)"):
        cache.read_attrs(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(cache.CacheError, match="not a cxr14-kit cache"):
        cache.read_table(tmp_path / "other.h5")
    for command in ("info", "verify"):  # a wrong path is a usage error: one line, exit 2
        result = call_main("cache", command, tmp_path / "none.h5", check_rc=2)
        assert result.stderr.strip().splitlines() == [f"error: no cache at {tmp_path / 'none.h5'}: run "
                                                     f"`python -m extract --data-dir DIR --split all --cache {tmp_path / 'none.h5'}` first"]


def test_verify_finds_edits_nan_features_and_patient_leaks(tmp_path):
    path = tmp_path / "c.h5"
    _make(path)
    with h5py.File(path, "r+") as f:
        f.attrs["image_size"] = 999
        f["done"][0] = True  # done, but its features are still NaN
        f["patient_id"][4] = 0  # patient 0 now in train and test
    problems = "\n".join(find_problems(path))
    assert "fingerprint does not match" in problems
    assert "NaN or infinite" in problems
    assert "patients are in both train and test" in problems
    result = run_cli("cache", "verify", path)
    assert result.returncode == 1 and "3 problem(s)" in result.stdout


def _hold_lock(path, ready, release):
    with cache.exclusive_lock(path):
        ready.set()
        release.wait(30)


def test_second_writer_is_refused_and_a_dead_holder_frees_the_lock(tmp_path):
    path = tmp_path / "c.h5"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(path, ready, release))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(cache.CacheError, match=r"another extract process \(pid \d+\) is writing"):
        with cache.exclusive_lock(path):
            pass
    holder.kill()  # SIGKILL: the kernel drops the flock
    holder.join()
    with cache.exclusive_lock(path):
        pass


def test_info_cli_prints_schema_and_counts(extracted_cache):
    result = run_cli("cache", "info", extracted_cache, check_rc=0)
    for text in ("features", "fingerprint", "train", "Pneumothorax", "random(seed=0)"):
        assert text in result.stdout
    assert json.loads(next(line for line in result.stdout.splitlines() if "normalize_mean" in line).split(None, 1)[1])
    assert run_cli("cache", "verify", extracted_cache, check_rc=0).stdout.strip().endswith("OK")
