"""heads.predict: new images through the cache's own encoder and the trained head."""
import json
import os
import shutil

import pandas as pd
import pytest

from conftest import call_main, run_cli


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
    assert pd.read_csv(csv)["image"].tolist() == [f"{tmp_path}/scan-\\xff.png"]


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
