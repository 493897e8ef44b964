"""Readers check a cache before they trust it: each way a cache can be broken after it was
written is caught by `cache.check_readable` (one line naming the problem) and by `verify`."""
import json

import h5py
import numpy as np
import pytest

import cache
from cache.check import find_problems
from cache.synthetic import write_synthetic_cache
from conftest import call_main, run_cli

ROWS = {"train": 30, "val": 12, "test": 18}
DIM = 8


@pytest.fixture
def sound_cache(tmp_path):
    path = tmp_path / "c.h5"
    table = write_synthetic_cache(path, rows=ROWS, dim=DIM, images_per_patient=3)
    return path, table


def _recreate(f, name, data):
    del f[name]
    f.create_dataset(name, data=data)


def _leak_patients(f, table):
    train_patient = table["patient_id"][table["split"] == "train"][0]
    patients = f["patient_id"][()]
    patients[table["split"] == "test"] = train_patient  # every test row now a train patient
    f["patient_id"][...] = patients


def _set_unknown_version(f, table):
    attrs = {key: f.attrs[key] for key in f.attrs}
    attrs["schema_version"] = 3
    f.attrs["schema_version"] = 3
    f.attrs["fingerprint"] = cache.compute_fingerprint(attrs)  # a consistent, newer cache


def _set_classes(value):
    """Replace the classes attribute and sign the result: a consistent cache with odd classes."""
    def tamper(f, table):
        f.attrs["classes"] = value
        attrs = {key: f.attrs[key] for key in f.attrs}
        attrs["preprocessing"] = json.loads(attrs["preprocessing"])  # as read_attrs decodes it
        f.attrs["fingerprint"] = cache.compute_fingerprint(attrs)
    return tamper


TAMPERINGS = {
    "patient in two splits": (_leak_patients, "patients are in both train and test"),
    "unknown split name": (lambda f, t: f["split"].__setitem__(0, "validation"), "unknown split names ['validation']"),
    "edited attribute": (lambda f, t: f.attrs.__setitem__("image_size", 512), "fingerprint does not match"),
    "unknown schema version": (_set_unknown_version, "schema_version 3 is not one this kit reads (it reads 1, 2)"),
    "features with fewer rows": (lambda f, t: _recreate(f, "features", f["features"][:-5]),
                                 "features has shape (55, 8), expected (60, 8)"),
    "features of another width": (lambda f, t: _recreate(f, "features", f["features"][:, :-1]),
                                  "features has shape (60, 7), expected (60, 8)"),
    "a label of 2": (lambda f, t: f["labels"].__setitem__((3, 2), 2), "labels hold values other than 0/1: [2]"),
    "a row dataset cut short": (lambda f, t: _recreate(f, "done", f["done"][:-1]), "done has shape (59,), expected (60,)"),
    "missing features": (lambda f, t: f.__delitem__("features"), "datasets missing: ['features']"),
    "missing labels": (lambda f, t: f.__delitem__("labels"), "datasets missing: ['labels']"),
    "missing attribute": (lambda f, t: f.attrs.__delitem__("backbone"), "attributes missing: ['backbone']"),
    "classes as one string": (_set_classes("Atelectasis"), "attribute classes is 'Atelectasis', not a list"),
    "classes as numbers": (_set_classes(np.arange(14)), "not a list of class names"),
    "a class named twice": (_set_classes(["Edema"] * 14), "names a class twice: ['Edema']"),
    "a class name with an escape sequence": (_set_classes([f"c{i}" for i in range(13)] + ["Mass\x1b[2J"]),
                                             "a name with control characters: 'Mass\\x1b[2J'"),
    "an attribute that is not UTF-8": (lambda f, t: f.attrs.__setitem__("backbone", np.bytes_(b"\xff\xfe")),
                                       "attribute backbone is not UTF-8 text"),
}


def test_a_sound_cache_passes(sound_cache):
    path, _ = sound_cache
    cache.check_readable(path)
    assert find_problems(path) == []


@pytest.mark.parametrize("defect", TAMPERINGS)
def test_each_tampering_is_one_line_naming_it_and_verify(sound_cache, defect):
    path, table = sound_cache
    tamper, expected = TAMPERINGS[defect]
    with h5py.File(path, "r+") as f:
        tamper(f, table)
    with pytest.raises(cache.CacheError) as caught:
        cache.check_readable(path)
    message = str(caught.value)
    assert expected in message and f"python -m cache verify {path}" in message
    assert "\n" not in message
    assert any(expected in problem for problem in find_problems(path))
    result = call_main("cache", "verify", path)
    assert result.returncode == 1 and expected in result.stdout


def test_readers_raise_cache_error_not_key_error(sound_cache):
    path, _ = sound_cache
    with h5py.File(path, "r+") as f:
        del f["error"]
        del f.attrs["classes"]
    with pytest.raises(cache.CacheError, match=r"datasets missing: \['error'\].*python -m cache verify"):
        cache.read_table(path)
    with pytest.raises(cache.CacheError, match=r"attributes missing: \['classes'\]"):
        cache.read_attrs(path)
    result = run_cli("cache", "info", path)  # the real CLI: one line, no traceback
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "missing" in result.stderr


def test_features_cut_short_are_never_read_as_rows(sound_cache):
    path, _ = sound_cache
    with h5py.File(path, "r+") as f:
        _recreate(f, "features", f["features"][:-5])
    with pytest.raises(cache.CacheError, match="features has 55 rows, fewer than the rows asked for"):
        cache.read_features(path, {"train": np.arange(60)})
    assert cache.read_features(path, {"train": np.arange(55)})["train"].shape == (55, DIM)


def test_the_check_reads_the_row_table_but_never_the_features(sound_cache, monkeypatch):
    path, _ = sound_cache
    read = []
    original = h5py.Dataset.__getitem__

    def spy(dataset, key):
        read.append(dataset.name)
        return original(dataset, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    cache.check_readable(path)  # cheap at any scale: features is 112k x 2048 at NIH scale
    assert "/features" not in read and {"/patient_id", "/split", "/labels"} <= set(read)


def test_verify_names_a_damaged_part_file(sound_cache):
    path, _ = sound_cache
    part = cache.store.parts_dir(path) / "r0-host-1-1-000000.npz"
    part.parent.mkdir(exist_ok=True)
    part.write_bytes(b"PK\x03\x04 not a whole zip")
    result = call_main("cache", "verify", path)
    assert result.returncode == 1 and f"part file {part} is unreadable" in result.stdout


def test_a_path_that_is_not_a_cache_is_never_called_deletable(sound_cache, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's own file\n")
    for path, message in [(notes, "not an HDF5 file, so not a cache"), (tmp_path, "is a folder, not a cache")]:
        with pytest.raises(cache.CacheError, match=message) as caught:
            cache.check_readable(path)
        assert "delete" not in str(caught.value)
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(sound_cache[0].read_bytes()[:4000])  # a cache cut short: HDF5 signature, no body
    with pytest.raises(cache.CacheError, match="damaged HDF5 file .*if extract made it, delete it"):
        cache.check_readable(damaged)


def test_extract_refuses_a_cache_path_holding_another_file_and_leaves_it(tmp_path):
    from extract.synthetic import write_dataset
    write_dataset(tmp_path / "data", patients=6, images_per_patient=1, size=16)
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's own file\n")
    result = call_main("extract", "--data-dir", tmp_path / "data", "--cache", notes, "--weights", "none",
                       "--backbone", "resnet18", "--image-size", "32", "--device", "cpu", "--workers", "0",
                       check_rc=2)
    assert "not an HDF5 file" in result.stderr and "delete" not in result.stderr
    assert notes.read_text() == "the user's own file\n"


@pytest.mark.parametrize("classes", ["Atelectasis", np.arange(14)])
def test_classes_that_are_not_class_names_stop_info_and_training_in_one_line(sound_cache, tmp_path, classes):
    path, table = sound_cache
    with h5py.File(path, "r+") as f:
        _set_classes(classes)(f, table)
    for command in (("cache", "info", path), ("heads.train", "--cache", path, "--out", tmp_path / "run")):
        result = run_cli(*command)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and "attribute classes" in result.stderr
    assert not (tmp_path / "run").exists()
