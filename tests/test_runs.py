"""Named runs and `python -m heads.runs`: the runs under a folder, grouped by test set, ordered by
validation (never by test); heads.compare labels a run by its recorded name."""
import json
import shutil

import pandas as pd
import pytest

from cache.synthetic import write_synthetic_cache
from conftest import call_main
from heads.baseline import get_args_parser as baseline_parser
from heads.runs import COLUMNS

ROWS = {"train": 600, "val": 300, "test": 600}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """outputs/runs/: `strong` (named) and `weak` on the same images; `other` on other test rows."""
    root = tmp_path_factory.mktemp("outputs")
    for name, separation, seed in (("strong", 1.19, 0), ("weak", 0.5, 0), ("other", 1.19, 1)):
        write_synthetic_cache(root / f"{name}.h5", rows=ROWS, dim=16, separation=separation, seed=seed)
        named = ["--name", "resnet baseline"] if name == "strong" else []
        call_main("heads.baseline", "--cache", root / f"{name}.h5", "--out", root / "runs" / name, *named,
                  "--bootstrap", 10, check_rc=0)
    return root


def listed(folder, csv):
    result = call_main("heads.runs", folder, "--csv", csv, check_rc=0)
    return result, pd.read_csv(csv)


def test_a_run_records_its_name_and_compare_labels_it_so(outputs, tmp_path):
    config = json.loads((outputs / "runs" / "strong" / "config.json").read_text())
    assert config["name"] == "resnet baseline"
    assert json.loads((outputs / "runs" / "weak" / "config.json").read_text())["name"] is None
    call_main("heads.compare", outputs / "runs" / "strong", outputs / "runs" / "weak", "--out", tmp_path / "c",
              "--bootstrap", 20, check_rc=0)
    board = pd.read_csv(tmp_path / "c" / "comparison.csv")
    assert sorted(board["run"]) == ["resnet baseline", "weak"]  # recorded name, else folder name
    call_main("heads.compare", "--label", f"mine={outputs / 'runs' / 'strong'}", outputs / "runs" / "weak",
              "--out", tmp_path / "given", "--bootstrap", 20, check_rc=0)
    assert sorted(pd.read_csv(tmp_path / "given" / "comparison.csv")["run"]) == ["mine", "weak"]  # --label wins


def test_runs_sharing_a_recorded_name_fall_back_to_their_folders(outputs, tmp_path):
    shutil.copytree(outputs / "runs" / "strong", tmp_path / "copy")  # the same name recorded twice
    call_main("heads.compare", outputs / "runs" / "strong", tmp_path / "copy", "--out", tmp_path / "c",
              "--bootstrap", 20, check_rc=0)
    assert sorted(pd.read_csv(tmp_path / "c" / "comparison.csv")["run"]) == ["copy", "strong"]


@pytest.mark.parametrize("name", ["a|b", "  ", "tab\there"])
def test_a_name_unfit_for_a_table_is_refused_in_one_line(name, capsys):
    with pytest.raises(SystemExit) as stopped:
        baseline_parser().parse_args(["--name", name])
    message = capsys.readouterr().err
    assert stopped.value.code == 2 and message.count("\n") == 1 and "run name" in message


def test_runs_are_grouped_by_test_set_and_ordered_by_validation_never_by_test(outputs, tmp_path):
    """The better validation run scores worst on test (its test scores inverted): it stays first
    in its test set; the run on other test rows is listed apart."""
    folder = tmp_path / "outputs"
    shutil.copytree(outputs / "runs", folder / "runs")
    predictions = pd.read_csv(folder / "runs" / "strong" / "predictions_test.csv")
    probabilities = [c for c in predictions.columns if c.startswith("prob_")]
    predictions[probabilities] = 1.0 - predictions[probabilities]
    predictions.to_csv(folder / "runs" / "strong" / "predictions_test.csv", index=False)
    result, table = listed(folder, tmp_path / "runs.csv")
    assert list(table.columns) == COLUMNS
    shared = table[table["test_set"] == table.set_index("name").loc["weak", "test_set"]]
    assert shared["name"].tolist() == ["resnet baseline", "weak"]  # by validation
    assert shared["test_mean_auc"].iloc[0] < shared["test_mean_auc"].iloc[1]  # test says otherwise
    assert shared["val_mean_auc"].iloc[0] > shared["val_mean_auc"].iloc[1]
    assert table["name"].tolist() == ["other", "resnet baseline", "weak"]  # the other test set apart
    assert table["test_set"].tolist() == [1, 2, 2] and table["run_dir"].tolist()[0] == "runs/other"
    lines = result.stdout.splitlines()
    assert sum(line.startswith("test set ") for line in lines) == 2
    assert lines.index(next(line for line in lines if line.startswith("resnet baseline"))) < \
        lines.index(next(line for line in lines if line.startswith("weak")))


def test_folders_that_are_not_runs_are_skipped_and_a_broken_run_is_one_line(outputs, tmp_path):
    folder = tmp_path / "outputs"
    shutil.copytree(outputs / "runs" / "weak", folder / "runs" / "weak")
    shutil.copytree(outputs / "runs" / "weak", folder / "runs" / "broken")
    (folder / "runs" / "broken" / "config.json").write_text("{")
    shutil.copytree(outputs / "runs" / "weak", folder / "runs" / "half.partial")  # a run still being written
    shutil.copytree(outputs / "runs" / "weak", folder / "mine", ignore=shutil.ignore_patterns(".cxr14-kit"))
    call_main("heads.compare", outputs / "runs" / "strong", outputs / "runs" / "weak", "--out",
              folder / "compare" / "c", "--bootstrap", 20, check_rc=0)
    result, table = listed(folder, tmp_path / "runs.csv")
    assert table["run_dir"].tolist() == ["runs/weak"]
    unreadable = [line for line in result.stdout.splitlines() if line.startswith("unreadable:")]
    assert len(unreadable) == 1 and "broken" in unreadable[0] and "Traceback" not in result.stderr


def test_a_csv_the_kit_did_not_write_is_left_alone(outputs, tmp_path):
    csv = tmp_path / "notes.csv"
    csv.write_text("my,own,notes\n")
    result = call_main("heads.runs", outputs / "runs", "--csv", csv)
    assert result.returncode == 2 and "not a table written by heads.runs" in result.stderr
    assert csv.read_text() == "my,own,notes\n"
    assert call_main("heads.runs", tmp_path / "nowhere").returncode == 2



def test_find_runs_stops_at_max_depth_and_never_enters_a_run(tmp_path):
    from cache.outdir import mark_kit_dir
    from heads.runs import find_runs
    for folder in ("a", "x/b", "x/y/z/c", "a/inside"):
        (tmp_path / folder).mkdir(parents=True)
        mark_kit_dir(tmp_path / folder, kind="run")
    assert find_runs(tmp_path) == [tmp_path / "a", tmp_path / "x/b", tmp_path / "x/y/z/c"]
    assert find_runs(tmp_path, max_depth=2) == [tmp_path / "a", tmp_path / "x/b"]  # x/y/z/c is 4 down
