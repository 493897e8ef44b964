"""heads.predict: new images through the cache's own encoder and the trained head."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY, call_main, predict_saved_test_images, run_cli
from test_encoders import tiny_dinov2  # noqa: F401 - a fixture: a tiny DINOv2 folder, random weights


@pytest.fixture(scope="module")
def trained_run(extracted_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    call_main("heads.train", "--cache", extracted_cache, "--out", out, "--max-epochs", "2", "--bootstrap", "10",
              check_rc=0)
    return out


def _one_image(synthetic_dir):
    return next(synthetic_dir.glob("images_*/images/*.png"))


def test_non_utf8_file_name_is_scored_under_an_escaped_name(trained_run, synthetic_dir, tmp_path):
    folder = os.fsencode(tmp_path)
    odd = os.path.join(folder, b"scan-\xff.png")  # a Latin-1 name, legal on Linux
    shutil.copyfile(_one_image(synthetic_dir), odd)
    csv = tmp_path / "p.csv"
    result = call_main("heads.predict", "--run", trained_run, os.fsdecode(odd), "--out", csv, "--device", "cpu",
                       check_rc=0)
    assert "Traceback" not in result.stderr
    written = pd.read_csv(csv)
    assert written["image_id"].tolist() == ["scan-\\xff.png"] and written["path"].tolist() == [f"{tmp_path}/scan-\\xff.png"]


def test_default_output_goes_under_outputs_not_the_working_folder(trained_run, synthetic_dir, tmp_path):
    result = run_cli("heads.predict", "--run", trained_run, _one_image(synthetic_dir), "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "outputs" / "predictions" / f"{trained_run.name}.csv").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]


def test_a_cache_prepared_otherwise_is_refused(trained_run, synthetic_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = json.loads((run / "config.json").read_text())
    config["cache_attrs"]["preprocessing"]["resize"] = "whole image to 64x64, nearest, no crop"
    (run / "config.json").write_text(json.dumps(config))
    result = call_main("heads.predict", "--run", run, _one_image(synthetic_dir), "--out", tmp_path / "p.csv",
                       "--device", "cpu")
    assert result.returncode == 2 and "preprocessing" in result.stderr and "differs from this version" in result.stderr
    assert not (tmp_path / "p.csv").exists()


def test_an_out_that_is_not_an_earlier_predictions_csv_is_refused_and_kept(trained_run, synthetic_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's own file\n")
    for out, message in [(notes, "not a predictions CSV"), (tmp_path, "is a folder")]:
        result = call_main("heads.predict", "--run", trained_run, _one_image(synthetic_dir), "--out", out,
                           "--device", "cpu")
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert notes.read_text() == "the user's own file\n"
    csv = tmp_path / "p.csv"
    for _ in range(2):  # an earlier predictions CSV is replaced
        call_main("heads.predict", "--run", trained_run, _one_image(synthetic_dir), "--out", csv, "--device", "cpu",
                  check_rc=0)
    assert len(pd.read_csv(csv)) == 1


def test_a_damaged_run_config_is_one_line_exit_2(trained_run, synthetic_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "config.json").write_text("{truncated")
    result = call_main("heads.predict", "--run", run, _one_image(synthetic_dir), "--out", tmp_path / "p.csv",
                       "--device", "cpu")
    assert result.returncode == 2 and "config.json is damaged" in result.stderr


def _copy_run(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


def _refused(run, synthetic_dir, tmp_path, message):
    result = call_main("heads.predict", "--run", run, _one_image(synthetic_dir), "--out", tmp_path / "p.csv",
                       "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "p.csv").exists()
    return result


def _checkpoint_missing_the_mean(path):
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["feature_mean"]
    torch.save(checkpoint, path)


def _checkpoint_of_another_width(path):
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {k: torch.cat([v, v], dim=-1) if v.dim() == 2 else v
                                for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, path)


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_bytes(b""), "is not a readable head checkpoint"),
    (lambda path: path.write_bytes(path.read_bytes()[:300]), "is not a readable head checkpoint"),
    (lambda path: torch.save([1, 2, 3], path), "holds a list, not a dict"),
    (lambda path: torch.save({"weights": torch.zeros(3)}, path), "missing"),
    (_checkpoint_missing_the_mean, "['feature_mean'] missing"),
    (_checkpoint_of_another_width, "its weights do not fit its settings"),
])
def test_a_damaged_or_foreign_head_checkpoint_is_one_line_exit_2(trained_run, synthetic_dir, tmp_path, damage,
                                                                   message):
    run = _copy_run(trained_run, tmp_path)
    damage(run / "head.pt")
    _refused(run, synthetic_dir, tmp_path, message)


@pytest.mark.parametrize("key, value, message", [
    ("precision", "int8", "unknown precision 'int8'"),
    ("feature_dtype", "int8", "unknown feature_dtype 'int8'"),
    ("feature_dtype", 16, "cache attribute feature_dtype is 16, not a str"),
    ("image_size", "64", "cache attribute image_size is '64', not a int"),
])
def test_an_edited_recipe_in_the_run_config_is_refused(trained_run, synthetic_dir, tmp_path, key, value, message):
    run = _copy_run(trained_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["cache_attrs"][key] = value
    (run / "config.json").write_text(json.dumps(config))
    _refused(run, synthetic_dir, tmp_path, message)


def test_random_weights_are_said_in_one_clean_line(trained_run, synthetic_dir, tmp_path):
    result = call_main("heads.predict", "--run", trained_run, _one_image(synthetic_dir), "--out", tmp_path / "p.csv",
                       "--device", "cpu", check_rc=0)
    warnings = [line for line in result.stderr.splitlines() if "random encoder weights" in line]
    assert warnings == ["warning: resnet50: random encoder weights (the cache was made with --weights none), so "
                        "these probabilities only test the pipeline"]
    assert "UserWarning" not in result.stderr and ".py:" not in result.stderr


def test_a_run_on_two_caches_predicts_what_it_saved(extracted_cache, synthetic_dir, tmp_path):
    """Each cache's encoder is rebuilt from the run's recipe and the features join in the run's order."""
    second = tmp_path / "resnet18.h5"
    call_main("extract", "--data-dir", synthetic_dir, "--cache", second, *TINY, "--backbone", "resnet18",
              "--layers", "layer3", check_rc=0)
    run = tmp_path / "joined"
    call_main("heads.train", "--cache", second, "--cache", extracted_cache, "--out", run, "--max-epochs", "2",
              "--bootstrap", "10", check_rc=0)
    images, predicted, saved = predict_saved_test_images(run, synthetic_dir, tmp_path / "p.csv", n=4)
    np.testing.assert_allclose(predicted, saved, atol=2e-3)
    assert pd.read_csv(tmp_path / "p.csv")["image_id"].tolist() == [image.name for image in images]
    result = call_main("heads.predict", "--run", run, images[0], "--out", tmp_path / "one.csv", "--device", "cpu",
                       check_rc=0)
    assert [line for line in result.stderr.splitlines() if "random" in line] == [  # two encoders, one line
        "warning: resnet18 + resnet50: random encoder weights (the cache was made with --weights none), so these "
        "probabilities only test the pipeline"]


def test_a_local_hf_folder_changed_since_extraction_is_refused(tiny_dinov2, synthetic_dir, tmp_path):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "dinov2"
    shutil.copytree(tiny_dinov2, folder)
    path, run = tmp_path / "c.h5", tmp_path / "run"
    call_main("extract", "--data-dir", synthetic_dir, "--cache", path, "--backbone", f"hf:{folder}",
              *TINY[2:], check_rc=0)  # the folder's own (pretrained) weights
    call_main("heads.train", "--cache", path, "--out", run, "--max-epochs", "2", "--bootstrap", "10", check_rc=0)
    _, predicted, saved = predict_saved_test_images(run, synthetic_dir, tmp_path / "before.csv", n=2)
    np.testing.assert_allclose(predicted, saved, atol=2e-3)
    torch.manual_seed(1)  # other weights in the same folder, as a user swapping checkpoints would
    config = transformers.Dinov2Config.from_pretrained(folder)
    transformers.Dinov2Model(config).save_pretrained(folder)
    result = call_main("heads.predict", "--run", run, _one_image(synthetic_dir), "--out", tmp_path / "p.csv",
                       "--device", "cpu")
    assert result.returncode == 2 and f"the folder {folder} has changed since the cache was made" in result.stderr
    assert not (tmp_path / "p.csv").exists()


def test_a_class_the_run_never_saw_positive_is_said(trained_run, synthetic_dir, tmp_path):
    run = _copy_run(trained_run, tmp_path)
    config = json.loads((run / "config.json").read_text())
    assert config["classes_without_train_positive"] == []  # what heads.train records
    config["classes_without_train_positive"] = ["Hernia"]  # as a run on a cache without train Hernia records
    (run / "config.json").write_text(json.dumps(config))
    result = call_main("heads.predict", "--run", run, _one_image(synthetic_dir), "--out", tmp_path / "p.csv",
                       "--device", "cpu", check_rc=0)
    assert "warning: the run had no train positive for Hernia: its probabilities for it mean nothing" in result.stderr
