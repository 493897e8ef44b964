import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

import cache
from conftest import REPO, TINY, call_main
from extract import backbone
from extract.synthetic import write_dataset


def _features(path):
    table = cache.read_table(path)
    rows = np.flatnonzero(table["done"])
    return table, cache.read_features(path, {"done": rows})["done"]


def test_extract_fills_every_row_with_finite_features(extracted_cache, synthetic_dir):
    table, features = _features(extracted_cache)
    assert table["done"].all() and len(table["done"]) == 180
    assert features.shape == (180, 2048) and np.isfinite(features).all()
    assert features.std(axis=0).mean() > 0  # different images, different embeddings
    attrs = cache.read_attrs(extracted_cache)
    assert attrs["image_size"] == 64 and attrs["precision"] == "fp32" and attrs["weights"] == "random(seed=0)"
    assert attrs["preprocessing"]["resize"].startswith("whole image to 64x64")
    assert not cache.store.parts_dir(extracted_cache).exists() or not any(cache.store.parts_dir(extracted_cache).iterdir())


def test_summary_and_rerun_does_nothing(extracted_cache, synthetic_dir, tmp_path):
    copy = tmp_path / "copy.h5"
    shutil.copy(extracted_cache, copy)
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", copy, *TINY, check_rc=0)
    assert "extracted 0 images" in result.stdout and "train" in result.stdout


def test_bad_images_are_recorded_and_the_run_goes_on(synthetic_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    truncated = next(data.glob("images_*/images/00000002_001.png"))
    truncated.write_bytes(truncated.read_bytes()[:200])
    next(data.glob("images_*/images/00000003_000.png")).unlink()
    path = tmp_path / "c.h5"
    result = call_main("extract", "--data-dir", data, "--cache", path, *TINY)
    assert result.returncode == 1, result.stderr
    assert "2 images could not be embedded" in result.stdout
    assert "00000002_001.png:" in result.stdout and "00000003_000.png: image file not found" in result.stdout
    table = cache.read_table(path)
    assert table["done"].sum() == 178
    failed = table["image_id"][~table["done"]]
    assert sorted(failed) == ["00000002_001.png", "00000003_000.png"]
    assert "cannot decode" in table["error"][list(table["image_id"]).index("00000002_001.png")]


def test_only_the_requested_split_is_filled(synthetic_dir, tmp_path):
    path = tmp_path / "c.h5"
    call_main("extract", "--data-dir", synthetic_dir, "--cache", path, "--split", "test", *TINY, check_rc=0)
    table = cache.read_table(path)
    assert (table["done"] == (table["split"] == "test")).all()


def test_resume_after_sigkill_equals_an_uninterrupted_run(extracted_cache, synthetic_dir, tmp_path):
    path = tmp_path / "c.h5"
    command = [sys.executable, "-m", "extract", "--data-dir", str(synthetic_dir), "--cache", str(path),
               *TINY[:-2], "--batch-size", "4", "--part-rows", "4"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    parts = cache.store.parts_dir(path)
    deadline = time.time() + 120
    while time.time() < deadline and not (parts.exists() and len(list(parts.glob("*.npz"))) >= 3):
        time.sleep(0.05)
    assert process.poll() is None, "extraction finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    table = cache.read_table(path)  # the file still opens
    assert cache.pending_part_rows(path) >= 12 and not table["done"].all()
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", path, *TINY, check_rc=0)
    assert "merged" in result.stdout and "interrupted run" in result.stdout
    resumed_table, resumed = _features(path)
    full_table, full = _features(extracted_cache)
    assert resumed_table["done"].all()
    assert (resumed_table["image_id"] == full_table["image_id"]).all()
    np.testing.assert_allclose(resumed, full, rtol=2e-3, atol=2e-3)


def test_other_settings_are_refused_naming_the_difference(extracted_cache, synthetic_dir, tmp_path):
    copy = tmp_path / "copy.h5"
    shutil.copy(extracted_cache, copy)
    args = [a if a != "64" else "72" for a in TINY]
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", copy, *args)
    assert result.returncode == 2
    assert "image_size: cache has 64, this run asks 72" in result.stderr
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", copy, *TINY, "--val-fraction", "0.3")
    assert result.returncode == 2 and "val_fraction" in result.stderr


def test_second_extract_on_one_cache_is_refused(extracted_cache, synthetic_dir, tmp_path):
    copy = tmp_path / "copy.h5"
    shutil.copy(extracted_cache, copy)
    with cache.exclusive_lock(copy):
        result = call_main("extract", "--data-dir", synthetic_dir, "--cache", copy, *TINY)
    assert result.returncode == 2 and "another extract process" in result.stderr


def test_local_weights_file_is_loaded_and_recorded(synthetic_dir, tmp_path):
    torch.manual_seed(1)
    state = torchvision.models.resnet50(weights=None).state_dict()
    weights = tmp_path / "resnet50-test.pth"
    torch.save(state, weights)
    model = backbone.build_backbone(str(weights), device=torch.device("cpu"))
    reference = torchvision.models.resnet50(weights=None)
    reference.load_state_dict(state)
    reference.fc = torch.nn.Identity()
    inputs = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():  # BatchNorm folded into the convolutions: the same function
        torch.testing.assert_close(model(inputs), reference.eval()(inputs), rtol=1e-4, atol=1e-4)
    record = backbone.describe_weights(str(weights))
    assert record["weights"] == "file:resnet50-test.pth" and len(record["weights_sha256"]) == 64
    torch.save({"conv1.weight": state["conv1.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(backbone.WeightsError, match="not a ResNet50 state dict"):
        backbone.build_backbone(str(tmp_path / "partial.pth"), device=torch.device("cpu"))
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", tmp_path / "c.h5",
                     "--weights", tmp_path / "missing.pth", "--device", "cpu")
    assert result.returncode == 2 and "missing.pth: no such file" in result.stderr


def test_unfetchable_imagenet_weights_say_how_to_supply_them(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(backbone.WeightsError, match=r"cannot fetch ResNet50 IMAGENET1K_V2.*--weights /path/to/resnet50-"):
        backbone.build_backbone("imagenet", device=torch.device("cpu"))


def test_images_of_every_mode_and_size_embed(tmp_path):
    info = write_dataset(tmp_path, patients=4, images_per_patient=2, size=48, folders=0)
    from PIL import Image
    ids = info["image_ids"]
    gray = np.asarray(Image.open(tmp_path / "images" / ids[0]))
    Image.fromarray(gray).convert("RGBA").save(tmp_path / "images" / ids[1])
    Image.fromarray(gray).convert("RGB").save(tmp_path / "images" / ids[2])
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "images" / ids[3])
    Image.fromarray(gray).resize((80, 60)).save(tmp_path / "images" / ids[4])
    path = tmp_path / "c.h5"
    call_main("extract", "--data-dir", tmp_path, "--cache", path, *TINY, check_rc=0)
    table, features = _features(path)
    assert table["done"].all()
    # RGBA, RGB and 16-bit copies of one image decode to the same gray, so the same embedding.
    for copy in (1, 2, 3):
        np.testing.assert_allclose(features[copy], features[0], rtol=1e-2, atol=1e-2)


def test_torchrun_two_ranks_make_the_same_cache(extracted_cache, synthetic_dir, tmp_path):
    """Two CPU ranks (gloo) shard the rows; rank 0 merges one cache equal to a single process's."""
    path = tmp_path / "c.h5"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run([*torchrun, "-m", "extract", "--data-dir", str(synthetic_dir), "--cache", str(path),
                             *TINY], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "extracted 180 images" in result.stdout and "2 ranks" in result.stdout
    sharded_table, sharded = _features(path)
    table, single = _features(extracted_cache)
    for name in ("image_id", "patient_id", "split", "done"):
        assert (sharded_table[name] == table[name]).all(), name
    assert (sharded_table["labels"] == table["labels"]).all()
    np.testing.assert_allclose(sharded, single, rtol=2e-3, atol=2e-3)
    assert cache.read_attrs(path)["fingerprint"] == cache.read_attrs(extracted_cache)["fingerprint"]
