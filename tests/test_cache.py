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


# Per-row metadata ----------------------------------------------------------------------------

METADATA = {"sex": np.array(["M", "F", "", "F", "M"] * 2, dtype=object),
            "age": np.array([45, np.nan, 30.5, np.nan, 60] * 2, dtype=np.float32),
            "view": np.array(["PA", "AP", "PA", "", "PA"] * 2, dtype=object),
            "study_id": np.array(["0", "1", "0", "2", "0"] * 2, dtype=object)}


def _make_v1(path, **metadata):
    table = {"image_id": [f"{i:03d}.png" for i in range(10)], "patient_id": np.arange(10) // 2,
             "labels": np.eye(3, dtype=np.uint8)[np.arange(10) % 3],
             "split": np.array(["train"] * 6 + ["val"] * 2 + ["test"] * 2, dtype=object), **metadata}
    cache.create_cache(path, table=table, feature_dim=4, feature_dtype="float32", attrs=_settings())
    return table


def test_a_version_1_cache_holds_the_metadata_group_outside_the_fingerprint(tmp_path):
    _make_v1(tmp_path / "old.h5")
    _make_v1(tmp_path / "new.h5", **METADATA)
    old, new = cache.read_attrs(tmp_path / "old.h5"), cache.read_attrs(tmp_path / "new.h5")
    assert new["schema_version"] == old["schema_version"] == 1 and new["fingerprint"] == old["fingerprint"]
    assert cache.read_metadata(tmp_path / "old.h5") is None
    metadata = cache.read_metadata(tmp_path / "new.h5")
    for name, values in METADATA.items():
        np.testing.assert_array_equal(metadata[name], values)  # NaN ages and "" stay missing
    assert find_problems(tmp_path / "old.h5") == [] and find_problems(tmp_path / "new.h5") == []


@pytest.mark.parametrize("tamper, problem", [
    (lambda group: group.__delitem__("age"), "datasets missing: ['metadata/age']"),
    (lambda group: (group.__delitem__("sex"), group.create_dataset("sex", data=np.zeros(9))),
     "metadata/sex has shape (9,), expected (10,)"),
])
def test_a_version_1_metadata_group_is_checked_like_version_2s(tmp_path, tamper, problem):
    path = tmp_path / "c.h5"
    _make_v1(path, **METADATA)
    with h5py.File(path, "r+") as f:
        tamper(f["metadata"])
    assert any(problem in found for found in find_problems(path))
    with pytest.raises(cache.CacheError, match=problem.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        cache.check_readable(path)


@pytest.mark.parametrize("column, value, problem", [
    ("sex", "male", "metadata/sex holds values other than M/F/\"\": ['male']"),
    ("age", np.inf, "metadata/age holds 1 infinite values; missing is NaN"),
])
def test_verify_finds_metadata_values_outside_the_contract(tmp_path, column, value, problem):
    path = tmp_path / "c.h5"
    _make_v1(path, **{**METADATA, column: np.concatenate([[value], METADATA[column][1:]]).astype(METADATA[column].dtype)})
    assert find_problems(path) == [problem]
    cache.check_readable(path)  # readers do not decode the metadata strings


def test_info_shows_each_metadata_column_and_how_many_rows_miss_it(tmp_path):
    _make_v1(tmp_path / "new.h5", **METADATA)
    lines = describe(tmp_path / "new.h5").splitlines()
    block = lines[next(i for i, line in enumerate(lines) if line.startswith("metadata")):][:5]
    missing = {line.split()[0]: int(line.split()[1]) for line in block[1:]}
    assert missing == {"sex": 2, "age": 4, "view": 2, "study_id": 0}
    assert "10 rows" in block[0] and "F 4, M 4" in block[1] and "30.5 to 60 years" in block[2]
    _make_v1(tmp_path / "old.h5")
    text = describe(tmp_path / "old.h5")
    assert "metadata: none" in text and "rerun the extract command that made it" in text
    assert cache.no_metadata_reason(tmp_path / "old.h5") in text


def test_add_metadata_gives_an_old_cache_its_group_and_changes_nothing_else(tmp_path):
    path = tmp_path / "old.h5"
    table = _make_v1(path)
    writer = cache.PartWriter(path, fingerprint=cache.read_attrs(path)["fingerprint"])
    writer.write(rows=[0, 3], features=np.ones((2, 4), np.float32), failed_rows=[5], failed_reasons=["bad"])
    cache.merge_parts(path)
    before = (cache.read_attrs(path), cache.read_table(path), cache.read_features(path, {"all": np.arange(10)}))
    with pytest.raises(cache.CacheError, match="its rows differ"):
        cache.add_metadata(path, {**table, "image_id": table["image_id"][::-1], **METADATA})
    cache.add_metadata(path, {**table, **METADATA})
    after = (cache.read_attrs(path), cache.read_table(path), cache.read_features(path, {"all": np.arange(10)}))
    assert after[0] == before[0]
    for name in before[1]:
        np.testing.assert_array_equal(after[1][name], before[1][name])
    np.testing.assert_array_equal(after[2]["all"], before[2]["all"])
    np.testing.assert_array_equal(cache.read_metadata(path)["age"], METADATA["age"])
    content = path.read_bytes()
    cache.add_metadata(path, {**table, **METADATA})  # a cache with the group is left as it is
    assert path.read_bytes() == content and find_problems(path) == []
    assert not list(tmp_path.glob("*.metadata"))
