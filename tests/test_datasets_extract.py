"""`python -m extract --dataset NAME`: the registry through the CLI into a version-2 cache
(string patient ids, UNKNOWN labels, the metadata group, every label policy fingerprinted),
`cache verify`/`info` on it, and every reader's cache through heads.train and heads.compare. NIH keeps its version-1 cache, now with the optional metadata group (tests/test_extract.py)."""
import h5py
import numpy as np
import pandas as pd
import pytest

import cache
import dataset_layouts
from conftest import TINY, call_main
from extract import datasets
from extract.datasets.table import Options
from extract.synthetic import write_dataset


@pytest.fixture(scope="module")
def chexpert_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    data_dir, _ = dataset_layouts.chexpert(root)
    path = root / "chexpert.h5"
    call_main("extract", "--dataset", "chexpert", "--data-dir", data_dir, "--views", "PA,AP,LATERAL",
              "--cache", path, *TINY, check_rc=0)
    return data_dir, path


def test_list_prints_every_registered_dataset_and_what_it_expects():
    result = call_main("extract", "--dataset", "list", check_rc=0)
    for name in datasets.names():
        assert f"\n{name}\n" in f"\n{result.stdout}"
    assert "expects:" in result.stdout


def test_chexpert_cache_is_version_2_with_unknown_labels_metadata_and_policies(chexpert_cache):
    data_dir, path = chexpert_cache
    rows, _ = datasets.load("chexpert", data_dir, Options(views=("PA", "AP", "LATERAL")))
    attrs, table, metadata = cache.read_attrs(path), cache.read_table(path), cache.read_metadata(path)
    assert attrs["schema_version"] == 2 and attrs["dataset"] == "chexpert"
    assert (attrs["uncertain"], list(attrs["views"]), attrs["raters"], attrs["label_method"]) == \
        ("mask", ["PA", "AP", "LATERAL"], "n/a", "n/a")
    assert list(table["image_id"]) == list(rows["image_id"]) and table["done"].all()
    np.testing.assert_array_equal(table["labels"], rows["labels"])
    assert (table["labels"] == cache.UNKNOWN).any()
    assert list(table["patient_id"]) == list(rows["patient_id"]) and table["patient_id"][0].startswith("patient")
    assert list(metadata["view"]) == list(rows["view"]) and list(metadata["sex"]) == list(rows["sex"])
    np.testing.assert_array_equal(metadata["age"], rows["age"])
    assert list(metadata["study_id"]) == list(rows["study_id"])


def test_verify_accepts_the_v2_cache_and_info_prints_the_vocabulary(chexpert_cache):
    _, path = chexpert_cache
    assert call_main("cache", "verify", path, check_rc=0).stdout.strip().endswith("OK")
    info = call_main("cache", "info", path, check_rc=0).stdout
    assert "Pleural Effusion -> Effusion" in info and "unknown" in info


@pytest.mark.parametrize("name", [n for n in datasets.names() if n not in ("nih", "csv")])
def test_every_reader_end_to_end_extract_verify_train_compare(name, tmp_path):
    """Each registered reader's layout (tests/dataset_layouts.py) through extract, cache verify,
    two heads and their paired comparison; unknown labels are left out, never read as 0."""
    data_dir, _ = getattr(dataset_layouts, name)(tmp_path / "data")
    path = tmp_path / f"{name}.h5"
    call_main("extract", "--dataset", name, "--data-dir", data_dir, "--cache", path, "--val-fraction", 0.5,
              *TINY, check_rc=0)
    call_main("cache", "verify", path, check_rc=0)
    runs = []
    for seed in (0, 1):
        runs.append(tmp_path / f"run{seed}")
        result = call_main("heads.train", "--cache", path, "--out", runs[-1], "--max-epochs", 2, "--seed", seed,
                           "--bootstrap", 20, "--device", "cpu", "--precision", "fp32")
        if result.returncode == 2 and "val split" in result.stderr:
            pytest.skip(f"the {name} layout's val split scores no class: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr
    predictions = pd.read_csv(runs[0] / "predictions_test.csv")
    labels = cache.read_table(path)["labels"]
    assert predictions.filter(like="label_").isna().any().any() == bool((labels == cache.UNKNOWN).any()) or \
        not (labels[cache.read_table(path)["split"] == "test"] == cache.UNKNOWN).any()
    call_main("heads.compare", *runs, "--out", tmp_path / "cmp", "--bootstrap", 50, check_rc=0)
    assert (tmp_path / "cmp" / "paired_differences.csv").exists()


def test_another_label_policy_on_the_same_cache_is_refused(chexpert_cache, tmp_path):
    data_dir, path = chexpert_cache
    copy = tmp_path / "copy.h5"
    copy.write_bytes(path.read_bytes())
    result = call_main("extract", "--dataset", "chexpert", "--data-dir", data_dir, "--views", "PA,AP,LATERAL",
                       "--uncertain", "ones", "--cache", copy, *TINY, check_rc=2)
    assert "uncertain: cache has 'mask', this run asks 'ones'" in result.stderr


def test_default_cache_name_includes_the_dataset(tmp_path, monkeypatch):
    data_dir, _ = dataset_layouts.padchest(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    call_main("extract", "--dataset", "padchest", "--data-dir", data_dir, *TINY, check_rc=0)
    assert [p.name for p in (tmp_path / "outputs" / "cache").glob("*.h5")] == ["padchest-resnet50-64-random.h5"]


@pytest.mark.parametrize("args, message", [
    (["--dataset", "chexpert"], "does not hold the CheXpert files: expected train.csv"),
    (["--dataset", "rsna", "--uncertain", "ones"], "rsna does not use --uncertain"),
    (["--dataset", "padchest", "--views", ","], "--views ',' names no view"),
    (["--dataset", "nope"], "'nope' is not a registered dataset"),
])
def test_bad_dataset_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = call_main("extract", *args, "--data-dir", tmp_path, "--cache", tmp_path / "c.h5", *TINY, check_rc=2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.h5").exists()


def test_own_csv_end_to_end_extract_verify_train_compare(tmp_path):
    """A user's CSV over the synthetic images (string patient ids, every label known): the v2
    cache trains heads and compares runs like an NIH cache."""
    info = write_dataset(tmp_path / "images", patients=60, images_per_patient=3, size=64, seed=0)
    classes = ["Effusion", "Mass", "Pneumothorax"]
    index = {name: cache.CLASSES.index(name) for name in classes}
    paths = sorted((tmp_path / "images").glob("images_*/images/*.png"))
    by_name = {p.name: str(p.relative_to(tmp_path / "images")) for p in paths}
    frame = pd.DataFrame({"path": [by_name[i] for i in info["image_ids"]],
                          "patient_id": [f"pat-{i[:8]}" for i in info["image_ids"]]})
    for name in classes:
        frame[name] = info["labels"][:, index[name]]
    frame.to_csv(tmp_path / "labels.csv", index=False)
    path = tmp_path / "own.h5"
    call_main("extract", "--dataset", "csv", "--data-dir", tmp_path / "images", "--labels-csv", tmp_path / "labels.csv",
              "--cache", path, *TINY, check_rc=0)
    assert cache.read_attrs(path)["schema_version"] == 2 and cache.read_table(path)["patient_id"][0].startswith("pat-")
    call_main("cache", "verify", path, check_rc=0)
    for seed in (0, 1):
        call_main("heads.train", "--cache", path, "--out", tmp_path / f"run{seed}", "--max-epochs", 4, "--seed", seed,
                  "--bootstrap", 20, "--device", "cpu", check_rc=0)
    call_main("heads.compare", tmp_path / "run0", tmp_path / "run1", "--out", tmp_path / "cmp", "--bootstrap", 50,
              check_rc=0)
    assert (tmp_path / "cmp" / "paired_differences.csv").exists()


def test_nih_default_still_writes_a_version_1_cache(extracted_cache):
    attrs = cache.read_attrs(extracted_cache)
    assert attrs["schema_version"] == 1 and "dataset" not in attrs
    assert cache.read_table(extracted_cache)["patient_id"].dtype == np.int64
    assert set(cache.read_metadata(extracted_cache)["sex"]) == {"M", "F"}  # outside the fingerprint


def _v2_copy(chexpert_cache, tmp_path):
    copy = tmp_path / "v2.h5"
    copy.write_bytes(chexpert_cache[1].read_bytes())
    return copy


@pytest.mark.parametrize("tamper, problem", [
    (lambda f: f["labels"].__setitem__((0, 0), 7), "labels hold values other than 0/1/255: [7]"),
    (lambda f: f["metadata"].__delitem__("age"), "datasets missing: ['metadata/age']"),
    (lambda f: f.attrs.__delitem__("uncertain"), "attributes missing: ['uncertain']"),
])
def test_verify_checks_the_v2_rules(chexpert_cache, tmp_path, tamper, problem):
    copy = _v2_copy(chexpert_cache, tmp_path)
    with h5py.File(copy, "r+") as f:
        tamper(f)
    result = call_main("cache", "verify", copy, check_rc=1)
    assert problem in result.stdout
