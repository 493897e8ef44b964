"""Label efficiency (heads.train --train-fraction, heads/efficiency.py) on a tiny planted cache:
nested patient subsets, the small-end guards, a real CLI run whose every number is recomputed
from its predictions, test rows that reach no choice, and heads.compare of two such runs."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import cache
from cache.outdir import folder_kind
from cache.synthetic import write_synthetic_cache
from conftest import call_main
from heads import settings as head_settings
from heads.data import load_head_data
from heads.efficiency import patients_kept, run_efficiency, train_subsets
from heads.estimator import HeadGrid
from heads.train import get_args_parser

# 100 train patients of 3 images; features 0..13 carry each class's signal; a tenth of the
# labels unknown (a version-2 cache's 255), which no count or AUC may take for a negative
ROWS = {"train": 300, "val": 150, "test": 150}
FAST = ["--max-epochs", "12", "--patience", "3", "--batch-size", "32", "--device", "cpu", "--precision", "fp32"]
GRID = ["--lr", "0.03,0.003"]
FRACTIONS = "0.01,0.25,1"


@pytest.fixture(scope="module")
def planted_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("efficiency") / "features.h5"
    write_synthetic_cache(path, rows=ROWS, dim=16, separation=1.5, dataset="nih", unknown=0.1)
    return path


@pytest.fixture(scope="module")
def efficiency_run(planted_cache, tmp_path_factory):
    """A grid's label-efficiency run through the CLI's main: (run dir, what it printed)."""
    out = tmp_path_factory.mktemp("runs") / "efficiency"
    result = call_main("heads.train", "--cache", planted_cache, "--out", out, "--train-fraction", FRACTIONS,
                       "--repeats", "2", "--seed", "7", *GRID, *FAST, check_rc=0)
    return out, result


def test_subsets_are_nested_whole_patients_of_the_train_split_only(planted_cache):
    data = load_head_data(planted_cache)
    train = data.train
    outside = set(data.val.image_ids) | set(data.test.image_ids)
    n_patients = len(np.unique(train.patient_ids))
    drawn = {}
    for seed in (0, 1):
        subsets = train_subsets(train, fractions=(0.1, 0.25, 0.5, 1.0), seed=seed)
        patients = {f: set(subset.patient_ids) for f, subset in subsets.items()}
        assert patients[0.1] <= patients[0.25] <= patients[0.5] <= patients[1.0] == set(train.patient_ids)
        for fraction, subset in subsets.items():
            assert len(patients[fraction]) == patients_kept(fraction, n_patients)
            every_image = set(train.image_ids[np.isin(train.patient_ids, list(patients[fraction]))])
            assert set(subset.image_ids) == every_image and len(subset.image_ids) == len(every_image)
            assert not set(subset.image_ids) & outside
            rows = np.flatnonzero(np.isin(train.image_ids, subset.image_ids))
            assert torch.equal(subset.features, train.features[rows])
            torch.testing.assert_close(subset.labels, train.labels[rows], rtol=0, atol=0, equal_nan=True)
            assert all(np.array_equal(subset.metadata[key], train.metadata[key][rows], equal_nan=key == "age")
                       for key in train.metadata)
        drawn[seed] = patients[0.1]
    assert drawn[0] != drawn[1]  # each repeat draws its own patients
    assert patients_kept(0.07, 100) == 7 and patients_kept(0.071, 100) == 8 and patients_kept(1.0, 100) == 100


@pytest.mark.parametrize("flags, named", [
    (["--train-fraction", "0"], "(0, 1]"), (["--train-fraction", "1.5"], "(0, 1]"),
    (["--train-fraction", "0.1,abc"], "(0, 1]"), (["--train-fraction", "0.5,0.5"], "twice"),
    (["--train-fraction", "0.5", "--repeats", "0"], "[1, 1000]"), (["--repeats", "2.5"], "[1, 1000]"),
])
def test_bad_fractions_and_repeats_are_one_line(capsys, flags, named):
    with pytest.raises(SystemExit) as stop:
        get_args_parser().parse_args(flags)
    message = capsys.readouterr().err
    assert stop.value.code == 2 and message.count("\n") == 1 and flags[-2] in message and named in message


def test_a_fraction_that_keeps_no_patient_is_refused_before_any_work(planted_cache, tmp_path):
    out = tmp_path / "run"
    result = call_main("heads.train", "--cache", planted_cache, "--out", out, "--train-fraction", "0.001,1", *FAST)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--train-fraction 0.001 keeps no patient" in result.stderr and "100 patients" in result.stderr
    assert not out.exists() and not (tmp_path / "run.partial").exists()
    result = call_main("heads.train", "--cache", planted_cache, "--out", out, "--repeats", "3", *FAST)
    assert result.returncode == 2 and "--train-fraction" in result.stderr and not out.exists()


def test_a_cli_run_writes_the_files_the_summary_and_a_line_per_fit(efficiency_run):
    out, result = efficiency_run
    assert folder_kind(out) == "run"
    for name in ("config.json", "metrics.json", "efficiency.csv", "efficiency.md", "efficiency.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / "predictions").iterdir()) == sorted(
        f"f{f}-r{r}_{s}.csv" for f in FRACTIONS.split(",") for r in (0, 1) for s in ("val", "test"))
    progress = [line for line in result.stdout.splitlines() if line.startswith("fraction ") and " repeat " in line]
    assert len(progress) == 6
    for fraction in FRACTIONS.split(","):
        assert f"| {fraction} | " in result.stdout and f"| {fraction} | " in (out / "efficiency.md").read_text()
    config = json.loads((out / "config.json").read_text())["efficiency"]
    assert config["fractions"] == [0.01, 0.25, 1.0] and config["repeats"] == 2 and config["seeds"] == [7, 8]
    assert [(s["fraction"], s["repeat"], s["n_train_patients"]) for s in config["subsets"]] == [
        (f, r, n) for r in (0, 1) for f, n in ((0.01, 1), (0.25, 25), (1.0, 100))]


def test_every_number_is_recomputed_from_the_saved_predictions_and_seeds(efficiency_run, planted_cache):
    out, _ = efficiency_run
    table = pd.read_csv(out / "efficiency.csv")
    assert len(table) == 6 * 14 and list(table.columns[:5]) == ["fraction", "repeat", "seed", "n_train_images",
                                                                "n_train_patients"]
    train = load_head_data(planted_cache).train
    written = cache.read_table(planted_cache)  # labels as the cache holds them: 1, 0, 255 unknown
    for (fraction, repeat, seed), rows in table.groupby(["fraction", "repeat", "seed"]):
        subset = train_subsets(train, fractions=[fraction], seed=seed)[fraction]  # redrawn from the recorded seed
        assert (rows["n_train_images"] == len(subset)).all()
        in_subset = np.isin(written["image_id"], subset.image_ids)
        assert rows["n_train_positives"].tolist() == (written["labels"][in_subset] == 1).sum(axis=0).tolist()
        for split in ("val", "test"):
            predictions = pd.read_csv(out / "predictions" / f"f{fraction:g}-r{repeat}_{split}.csv")
            for row in rows.itertuples():
                known = predictions[f"label_{row[6]}"].notna()
                assert not known.all()  # some labels are unknown: written as empty cells
                labels, probabilities = predictions[f"label_{row[6]}"][known], predictions[f"prob_{row[6]}"][known]
                saved = getattr(row, f"{split}_auc")
                if labels.nunique() < 2:
                    assert np.isnan(saved)
                else:
                    assert saved == pytest.approx(roc_auc_score(labels, probabilities), abs=1e-6)


def test_the_smallest_fraction_is_reported_with_its_missing_positives_not_crashed_on(efficiency_run):
    out, result = efficiency_run
    table = pd.read_csv(out / "efficiency.csv")
    smallest = table[table["fraction"] == 0.01]
    absent = smallest[smallest["n_train_positives"] == 0]
    assert len(absent) > 0 and smallest["n_train_images"].max() == 3  # one patient of 3 images
    for name in absent["class"].unique():
        assert name in result.stdout.split("fraction 0.01: no train positive for")[1].splitlines()[0]
    fits = json.loads((out / "metrics.json").read_text())["fits"]
    assert all(fit["classes_without_train_positive"] for fit in fits if fit["fraction"] == 0.01)


def test_more_labels_give_a_better_head_on_planted_data(efficiency_run):
    out, _ = efficiency_run
    table = pd.read_csv(out / "efficiency.csv")
    per_fit = table.groupby(["fraction", "repeat"])["test_auc"].mean().groupby("fraction").mean()
    assert per_fit[1.0] > per_fit[0.25] > per_fit[0.01]
    assert per_fit[1.0] > 0.75 and per_fit[1.0] - per_fit[0.01] > 0.1


def test_test_rows_reach_no_choice(efficiency_run, planted_cache, tmp_path):
    out, _ = efficiency_run
    poisoned = load_head_data(planted_cache)
    poisoned.test.labels = 1 - poisoned.test.labels
    poisoned.test.features = torch.randn_like(poisoned.test.features)
    args = get_args_parser().parse_args(["--seed", "7", *GRID, *FAST])
    run_efficiency(grid=head_settings.settings_grid(args), data=poisoned, cache_path=planted_cache,
                   out=tmp_path / "poisoned", device="cpu", fractions=[0.01, 0.25], repeats=2, quiet=True)
    clean_fits, poisoned_fits = (json.loads((d / "metrics.json").read_text())["fits"]
                                 for d in (out, tmp_path / "poisoned"))
    clean_fits = [fit for fit in clean_fits if fit["fraction"] < 1]  # the poisoned run skips the costliest fits
    chosen = ("fraction", "repeat", "seed", "settings", "best_epoch", "epochs_run", "grid", "val_mean_auc",
              "n_train_images", "classes_without_train_positive")
    for clean, dirty in zip(clean_fits, poisoned_fits, strict=True):
        untimed = [{k: v for k, v in fit["grid"].items() if k != "pass_seconds"} for fit in (clean, dirty)]
        assert untimed[0] == untimed[1]
        assert all(clean[key] == dirty[key] for key in chosen if key != "grid")
    clean_table, dirty_table = (pd.read_csv(d / "efficiency.csv") for d in (out, tmp_path / "poisoned"))
    clean_table = clean_table[clean_table["fraction"] < 1].reset_index(drop=True)
    assert len(clean_table) == len(dirty_table) and clean_table["val_auc"].equals(dirty_table["val_auc"])
    assert dirty_table["test_auc"].mean() < 0.6 < clean_table["test_auc"].mean()  # test was scored on what it held


def test_fraction_1_repeat_0_is_the_head_heads_train_fits_without_a_fraction(efficiency_run, planted_cache,
                                                                            tmp_path):
    out, _ = efficiency_run
    data = load_head_data(planted_cache)
    grid = head_settings.settings_grid(get_args_parser().parse_args(["--seed", "7", *GRID, *FAST]))
    plain = HeadGrid(grid).fit(data.train, data.val)  # what heads.train fits for these flags
    saved = pd.read_csv(out / "predictions" / "f1-r0_test.csv")
    assert np.array_equal(saved[[f"prob_{c}" for c in data.classes]].to_numpy(np.float32),
                          plain.predict_proba(data.test.features))
    (tmp_path / "plain").mkdir()
    result = call_main("heads.compare", out, tmp_path / "plain", "--out", tmp_path / "mixed")
    assert result.returncode == 2 and "label-efficiency run" in result.stderr and not (tmp_path / "mixed").exists()


def test_compare_of_two_efficiency_runs_gives_a_paired_row_per_shared_fraction(efficiency_run, planted_cache,
                                                                              tmp_path):
    out, _ = efficiency_run
    weaker = tmp_path / "weaker"
    call_main("heads.train", "--cache", planted_cache, "--out", weaker, "--train-fraction", "0.25,1",
              "--lr", "0.001", *FAST, check_rc=0)
    result = call_main("heads.compare", out, weaker, "--out", tmp_path / "cmp", "--bootstrap", "200", check_rc=0)
    table = pd.read_csv(tmp_path / "cmp" / "efficiency_comparison.csv")
    assert folder_kind(tmp_path / "cmp") == "comparison"
    assert table["fraction"].tolist() == [0.25, 1.0]
    assert set(zip(table["repeats"], table["reference_repeats"])) in ({(1, 2)}, {(2, 1)})
    assert "not compared" in result.stdout and "fraction 0.01" in result.stdout
    means = {}
    for run in (out, weaker):
        per_fit = pd.read_csv(run / "efficiency.csv").groupby(["fraction", "repeat"])["test_auc"].mean()
        means[run] = per_fit.groupby("fraction").mean()
    reference = out if table["reference"].iloc[0] == "efficiency" else weaker
    other = weaker if reference == out else out
    for row in table.itertuples():
        expected = means[other][row.fraction] - means[reference][row.fraction]
        assert row.difference == pytest.approx(expected, abs=1e-5)
        assert row.ci_low <= row.difference <= row.ci_high


def test_a_run_against_its_copy_differs_by_exactly_zero_in_every_resample(efficiency_run, tmp_path):
    """Paired: each resample weighs the same patients in every repeat of both runs, so identical
    predictions give a zero difference in every resample (unpaired draws would spread it)."""
    out, _ = efficiency_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    call_main("heads.compare", out, copy, "--out", tmp_path / "cmp", "--bootstrap", "50", check_rc=0)
    table = pd.read_csv(tmp_path / "cmp" / "efficiency_comparison.csv")
    assert len(table) == 3 and (table[["difference", "ci_low", "ci_high"]] == 0).all().all()
