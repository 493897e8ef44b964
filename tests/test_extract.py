import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

import cache
from conftest import REPO, TINY, call_main, run_cli
from extract import encoders, pipeline
from extract.run import get_args_parser
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
    before = (copy.read_bytes(), copy.stat().st_mtime_ns)
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", copy, *TINY, check_rc=0)
    assert "extracted 0 images" in result.stdout and "train" in result.stdout
    assert (copy.read_bytes(), copy.stat().st_mtime_ns) == before  # not even rewritten


def test_an_nih_cache_records_the_label_csvs_sex_age_view_and_follow_up(extracted_cache, synthetic_dir):
    table, metadata = cache.read_table(extracted_cache), cache.read_metadata(extracted_cache)
    csv = pd.read_csv(synthetic_dir / "Data_Entry_2017_v2020.csv", dtype=str).set_index("Image Index")
    csv = csv.loc[table["image_id"]]
    assert list(metadata["sex"]) == list(csv["Patient Gender"]) and set(metadata["sex"]) == {"M", "F"}
    np.testing.assert_array_equal(metadata["age"], csv["Patient Age"].astype(np.float32))
    assert list(metadata["view"]) == list(csv["View Position"])
    assert list(metadata["study_id"]) == list(csv["Follow-up #"])
    assert cache.read_attrs(extracted_cache)["schema_version"] == 1


def test_resuming_a_cache_made_before_the_metadata_group_adds_it(extracted_cache, synthetic_dir, tmp_path):
    old = tmp_path / "old.h5"
    call_main("extract", "--data-dir", synthetic_dir, "--cache", old, "--split", "test", *TINY, check_rc=0)
    with h5py.File(old, "r+") as f:  # as every NIH cache was before the metadata group
        del f["metadata"]
    assert cache.read_metadata(old) is None and "rerun the extract command" in cache.no_metadata_reason(old)
    call_main("cache", "verify", old, check_rc=0)
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", old, *TINY, check_rc=0)
    assert "added the per-row metadata" in result.stdout
    assert f"extracted {int((cache.read_table(old)['split'] != 'test').sum())} images" in result.stdout  # the rest
    for name, values in cache.read_metadata(extracted_cache).items():
        np.testing.assert_array_equal(cache.read_metadata(old)[name], values)
    (table, features), (fresh_table, fresh_features) = _features(old), _features(extracted_cache)
    for name in table:
        np.testing.assert_array_equal(table[name], fresh_table[name])
    np.testing.assert_allclose(features, fresh_features, rtol=2e-3, atol=2e-3)  # other batches, as on resume
    assert cache.read_attrs(old)["fingerprint"] == cache.read_attrs(extracted_cache)["fingerprint"]
    call_main("cache", "verify", old, check_rc=0)


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
    # the recipe is named by the keys that differ, not printed whole
    assert "preprocessing.resize: cache has 'whole image to 64x64" in result.stderr
    assert "normalize_mean" not in result.stderr
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", copy, *TINY, "--val-fraction", "0.3")
    assert result.returncode == 2 and "val_fraction" in result.stderr


def test_a_refused_run_leaves_no_lock_file(extracted_cache, synthetic_dir, tmp_path):
    copy = tmp_path / "copy.h5"
    shutil.copy(extracted_cache, copy)
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", copy, *TINY, "--val-fraction", "0.3")
    assert result.returncode == 2 and "val_fraction" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.h5"]


def test_a_file_that_is_no_cache_is_refused_and_left_alone(synthetic_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", notes, *TINY, check_rc=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "notes.txt is not an HDF5 file, so not a cache" in errors[0]
    assert notes.read_text() == "my notes" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


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
    model = encoders.build_encoder("resnet50", weights=str(weights))
    reference = torchvision.models.resnet50(weights=None)
    reference.load_state_dict(state)
    reference.fc = torch.nn.Identity()
    inputs = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():  # BatchNorm folded into the convolutions: the same function
        torch.testing.assert_close(model.embed(inputs), reference.eval()(inputs), rtol=1e-4, atol=1e-4)
    record = model.weights
    assert record["weights"] == "file:resnet50-test.pth" and len(record["weights_sha256"]) == 64
    torch.save({"conv1.weight": state["conv1.weight"]}, tmp_path / "partial.pth")
    with pytest.raises(encoders.EncoderError, match="partial.pth: its parameter names do not match resnet50"):
        encoders.build_encoder("resnet50", weights=str(tmp_path / "partial.pth"))
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", tmp_path / "c.h5",
                     "--weights", tmp_path / "missing.pth", "--device", "cpu")
    assert result.returncode == 2 and "missing.pth: no such file" in result.stderr
    assert not (tmp_path / "c.h5").exists()


def test_unfetchable_imagenet_weights_say_how_to_supply_them(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(encoders.EncoderError, match=r"cannot fetch resnet50 IMAGENET1K_V2.*--weights /path/to/resnet50-"):
        encoders.build_encoder("resnet50", weights="imagenet")


def test_unfetchable_imagenet_weights_are_one_line_without_a_download_announcement(monkeypatch, tmp_path, capsys):
    """torch.hub announces 'Downloading: URL' before it fails offline; beside the error that read
    as a download under way, so the user saw two lines where one says what to do."""
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(encoders.EncoderError, match="cannot fetch resnet50 IMAGENET1K_V2"):
        encoders.build_encoder("resnet50", weights="imagenet")
    printed = capsys.readouterr()
    assert "Downloading" not in printed.out + printed.err


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
    # small parts and merges: rank 0 merges while rank 1 is still writing its parts
    result = subprocess.run([*torchrun, "-m", "extract", "--data-dir", str(synthetic_dir), "--cache", str(path),
                             *TINY, "--part-rows", "8", "--merge-every", "24"], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "extracted 180 images" in result.stdout and "2 ranks" in result.stdout
    assert not list(cache.store.parts_dir(path).glob("*.npz"))
    sharded_table, sharded = _features(path)
    table, single = _features(extracted_cache)
    for name in ("image_id", "patient_id", "split", "done"):
        assert (sharded_table[name] == table[name]).all(), name
    assert (sharded_table["labels"] == table["labels"]).all()
    np.testing.assert_allclose(sharded, single, rtol=2e-3, atol=2e-3)
    assert cache.read_attrs(path)["fingerprint"] == cache.read_attrs(extracted_cache)["fingerprint"]


def test_merge_every_merges_during_the_run(extracted_cache, synthetic_dir, tmp_path):
    path = tmp_path / "c.h5"
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", path, *TINY, "--part-rows", "16",
                       "--merge-every", "48", check_rc=0)
    assert "3 merges during the run" in result.stdout  # 180 rows: merged after 48, 96 and 144
    merged_table, merged = _features(path)
    _, single = _features(extracted_cache)
    assert merged_table["done"].all()
    np.testing.assert_allclose(merged, single, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("precision, tolerance", [("bf16", 3e-2), ("fp16", 1e-2)])
def test_reduced_precision_extraction_agrees_with_fp32(extracted_cache, synthetic_dir, tmp_path, precision, tolerance):
    path = tmp_path / "c.h5"
    call_main("extract", "--data-dir", synthetic_dir, "--cache", path, *TINY, "--split", "val",
              "--precision", precision, check_rc=0)
    assert cache.read_attrs(path)["precision"] == precision
    table, reduced = _features(path)
    _, full = _features(extracted_cache)
    reference = full[np.flatnonzero(table["split"] == "val")]
    relative = np.linalg.norm(reduced - reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert 0 < relative.max() < tolerance  # not fp32 in disguise, and within the precision's error


def test_float32_storage_keeps_full_precision(extracted_cache, synthetic_dir, tmp_path):
    path = tmp_path / "c.h5"
    call_main("extract", "--data-dir", synthetic_dir, "--cache", path, *TINY, "--split", "val",
              "--feature-dtype", "float32", check_rc=0)
    import h5py
    with h5py.File(path) as f:
        assert f["features"].dtype == np.float32
    table, stored = _features(path)
    encoder = encoders.build_encoder("resnet50", weights="none", image_size=64)
    val = np.flatnonzero(table["split"] == "val")[:4]
    paths = [next(synthetic_dir.glob(f"images_*/images/{table['image_id'][row]}")) for row in val]
    batch = next(pipeline.batches(val, paths, encoder=encoder, batch_size=4, workers=0))
    fresh = pipeline.embed_batch(encoder, batch, device=torch.device("cpu"), precision="fp32").numpy()
    order = np.searchsorted(np.flatnonzero(table["done"]), val)
    # float32 storage: equal to float rounding (float16 storage would be off by ~1e-3)
    np.testing.assert_allclose(stored[order], fresh, rtol=1e-5, atol=1e-6)


def test_test_split_is_exactly_test_list(extracted_cache, synthetic_dir):
    table = cache.read_table(extracted_cache)
    official = set((synthetic_dir / "test_list.txt").read_text().split())
    assert set(table["image_id"][table["split"] == "test"]) == official
    train_val = set((synthetic_dir / "train_val_list.txt").read_text().split())
    assert set(table["image_id"][table["split"] != "test"]) == train_val


@pytest.mark.parametrize("flag, value, expected", [
    ("--val-fraction", "-0.5", "outside (0, 1)"), ("--val-fraction", "1.5", "outside (0, 1)"),
    ("--val-fraction", "nan", "outside (0, 1)"), ("--batch-size", "0", "outside [1,"),
    ("--image-size", "0", "outside [32, 4096]"), ("--image-size", "99999", "outside [32, 4096]"),
    ("--workers", "-1", "outside [0,"), ("--merge-every", "-5", "outside [0,"), ("--part-rows", "0", "outside [1,"),
    ("--batch-size", "x", "'x' is not an integer"), ("--pooling", "max", "invalid choice"),
    ("--split-seed", "-1", "outside [0, 4294967295]"), ("--split-seed", str(2**64), "outside [0, 4294967295]"),
])
def test_bad_flags_are_one_line_and_exit_2_before_any_work(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        get_args_parser().parse_args(["--data-dir", "x", flag, value])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and expected in err and flag in err and err.count("\n") == 1


def test_default_cache_is_named_after_the_variant(synthetic_dir, tmp_path):
    result = run_cli("extract", "--data-dir", synthetic_dir, *TINY, "--split", "val", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # random weights never share the pretrained encoder's resnet50-64.h5
    assert sorted(p.name for p in (tmp_path / "outputs" / "cache").glob("*.h5")) == ["resnet50-64-random.h5"]


def test_val_list_is_the_val_split_and_refuses_mixing(extracted_cache, synthetic_dir, tmp_path):
    table = cache.read_table(extracted_cache)
    train_val = (synthetic_dir / "train_val_list.txt").read_text().split()
    patients = sorted({image_id[:8] for image_id in train_val})
    chosen = [i for i in train_val if i[:8] in patients[:5]]
    listed = tmp_path / "val.txt"
    listed.write_text("\n".join(chosen) + "\n")
    path = tmp_path / "v.h5"
    call_main("extract", "--data-dir", synthetic_dir, "--cache", path, *TINY, "--split", "val",
              "--val-list", listed, check_rc=0)
    stored = cache.read_table(path)
    assert sorted(stored["image_id"][stored["split"] == "val"]) == sorted(chosen)
    assert set(stored["image_id"][stored["split"] == "test"]) == set(table["image_id"][table["split"] == "test"])
    assert "val from val.txt" in cache.read_attrs(path)["split_source"]
    listed.write_text("\n".join(chosen[:-1]) + "\n")  # one image of the last patient stays in train
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", tmp_path / "w.h5", *TINY,
                       "--val-list", listed)
    assert result.returncode == 2 and f"patients {int(chosen[-1][:8])}" in result.stderr
    test_id = (synthetic_dir / "test_list.txt").read_text().split()[0]
    listed.write_text(f"{chosen[0]}\n{test_id}\n")
    result = call_main("extract", "--data-dir", synthetic_dir, "--cache", tmp_path / "w.h5", *TINY,
                       "--val-list", listed)
    assert result.returncode == 2 and "official test images" in result.stderr and test_id in result.stderr
    assert not (tmp_path / "w.h5").exists()


def test_loader_in_gpu_layout_runs_with_docker_64mb_shm(tmp_path):
    """16 workers, prefetching, batch 256 of 1024x1024 PNGs, as on a GPU machine, inside a private
    mount namespace whose /dev/shm is 64 MB (Docker's default)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("unshare -m is not available here")
    write_dataset(tmp_path / "data", patients=48, images_per_patient=4, size=1024, distinct=8)
    script = (
        "import sys, numpy as np; from extract import encoders, pipeline; from extract.nih import index_images;"
        "paths = sorted(index_images(sys.argv[1]).values());"
        "encoder = encoders.build_encoder('resnet50', weights='none', image_size=518);"
        "n = sum(len(b['rows']) for b in pipeline.batches(np.arange(len(paths)), paths, encoder=encoder,"
        " batch_size=256, workers=16, pin_memory=False));"
        "print('decoded', n)"
    )
    shell = (f"mount -t tmpfs -o size=64m tmpfs /dev/shm && "
             f"{sys.executable} -W ignore -c \"{script}\" {tmp_path / 'data'}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", shell], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "decoded 192" in result.stdout


def test_a_full_disk_ends_extract_with_one_line_and_exit_1(synthetic_dir, tmp_path):
    """The whole CLI on a real 200 KiB tmpfs (private mount namespace): DiskFull is one line
    and exit status 1 (the work done is kept; the run could not finish there), no traceback."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    disk = tmp_path / "disk"
    disk.mkdir()
    shell = 'mount -t tmpfs -o size=200k tmpfs "$1" || exit 77; shift; exec "$@"'
    result = subprocess.run(["unshare", "-m", "sh", "-c", shell, "sh", str(disk), sys.executable, "-m", "extract",
                             "--data-dir", str(synthetic_dir), "--cache", str(disk / "c.h5"), *TINY],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore"))
    if result.returncode == 77 or "unshare failed" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs in a private namespace: {result.stderr.strip()}")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1 and errors[0].startswith("error: no space left on device")
    assert "Traceback" not in result.stderr


def _extract_offline(data_dir, out, *, backbone, env):
    """The real CLI in a fresh process, so that the hub libraries read `env` as a user's would."""
    return subprocess.run([sys.executable, "-m", "extract", "--data-dir", str(data_dir), "--cache", str(out / "c.h5"),
                           "--backbone", backbone, "--weights", "pretrained", "--device", "cpu"],
                          cwd=out, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", HF_HOME=str(out / "hf"),
                                   **env))


@pytest.mark.parametrize("backbone, env, reason", [
    ("timm:resnet18", {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ("hf:facebook/dinov2-small", {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    # no proxy, and a port where nothing listens: the hub does not answer
    ("timm:resnet18", {"HF_ENDPOINT": "http://127.0.0.1:9", "HTTPS_PROXY": "", "https_proxy": "",
                       "ALL_PROXY": "", "all_proxy": ""}, "http://127.0.0.1:9 does not answer"),
    ("hf:facebook/dinov2-small", {"HF_ENDPOINT": "http://127.0.0.1:9", "HTTPS_PROXY": "", "https_proxy": "",
                                  "ALL_PROXY": "", "all_proxy": ""}, "http://127.0.0.1:9 does not answer"),
])
def test_pretrained_hub_weights_offline_fail_at_once_saying_where_to_put_them(backbone, env, reason,
                                                                            synthetic_dir, tmp_path):
    pytest.importorskip("timm" if backbone.startswith("timm") else "transformers")
    result = _extract_offline(synthetic_dir, tmp_path, backbone=backbone, env=env)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert reason in errors[0] and str(tmp_path / "hf" / "hub") in errors[0]
    assert ("--weights /path/to/" if backbone.startswith("timm") else "hf:/path/to/folder") in errors[0]
    assert not (tmp_path / "c.h5").exists()
