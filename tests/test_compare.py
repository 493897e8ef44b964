"""heads.compare and its statistics: DeLong against R's pROC, the paired patient bootstrap
against DeLong and against its nominal coverage, Holm, and the CLI's refusals and outputs."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cache
from cache.synthetic import write_synthetic_cache
from conftest import call_main, run_cli
from heads import comparison_report
from heads.comparison import DIFFERENCE_COLUMNS, compare_runs, describe_features, label_runs, load_run
from heads.metrics import bootstrap_auc
from heads.paired import bootstrap_p_value, delong_test, holm, paired_bootstrap_auc, paired_differences

DELONG_CASES = Path(__file__).parent / "data" / "delong"
ROWS = {"train": 1500, "val": 600, "test": 1500}


@pytest.mark.parametrize("case", ["case_small_ties", "case_medium", "case_large"])
def test_delong_equals_proc(case):
    expected = pd.read_csv(DELONG_CASES / "expected_pROC.csv").set_index("case").loc[case]
    data = pd.read_csv(DELONG_CASES / f"{case}.csv")
    result = delong_test(data["y"].to_numpy(), data["score_a"].to_numpy(), data["score_b"].to_numpy())
    for key in ("auc_a", "auc_b", "var_a", "var_b", "cov_ab", "z", "p_value"):
        assert result[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key


def test_delong_of_identical_scores_is_z_0_p_1():
    labels = np.r_[np.zeros(50), np.ones(30)]
    scores = np.random.default_rng(0).random(80) + labels * 0.2
    result = delong_test(labels, scores, scores.copy())
    assert (result["z"], result["p_value"]) == (0.0, 1.0)


def test_holm_by_hand():
    adjusted = holm([0.01, 0.04, 0.03, np.nan, 0.5])
    # four tests made: 4 x 0.01, then max(3 x 0.03, that), max(2 x 0.04, ...), max(1 x 0.5, ...)
    np.testing.assert_allclose(adjusted, [0.04, 0.09, 0.09, np.nan, 0.5])
    assert holm([0.6, 0.7]).tolist() == [1.0, 1.0]  # capped at 1


def test_bootstrap_p_value():
    assert bootstrap_p_value(np.zeros(999)) == 1.0
    assert bootstrap_p_value(-np.ones(999)) == pytest.approx(2 / 1000)
    assert bootstrap_p_value(np.r_[-np.ones(900), np.ones(99)]) == pytest.approx(2 * 100 / 1000)


def correlated_runs(rng, *, patients: int, images_per_patient: int, prevalence: float = 0.3,
                    shift_a: float = 1.0, shift_b: float = 1.0):
    """Two runs' scores on the same images: a shared part (the patient and the image, which
    both runs see) plus each run's own noise, as two encoders on the same X-rays would give."""
    patient_ids = np.repeat(np.arange(patients), images_per_patient)
    labels = (rng.random(len(patient_ids)) < prevalence).astype(np.uint8)
    shared = rng.standard_normal(patients)[patient_ids] + rng.standard_normal(len(patient_ids))
    scores_a = shared + shift_a * labels + 0.7 * rng.standard_normal(len(labels))
    scores_b = shared + shift_b * labels + 0.7 * rng.standard_normal(len(labels))
    return labels, scores_a, scores_b, patient_ids


def test_delong_and_paired_bootstrap_agree_on_large_predictions():
    rng = np.random.default_rng(1)
    labels, a, b, patient_ids = correlated_runs(rng, patients=20_000, images_per_patient=1, shift_a=1.0, shift_b=0.9)
    delong = delong_test(labels, a, b)
    resampled = paired_bootstrap_auc(labels[:, None], [a[:, None], b[:, None]], patient_ids, n_resamples=600, seed=0)
    differences = resampled[:, 0, 0] - resampled[:, 1, 0]
    # the SD of a 600-resample bootstrap is within ~3% of its limit (1 / sqrt(2 x 600))
    assert differences.std() == pytest.approx(np.sqrt(delong["var_a"] + delong["var_b"] - 2 * delong["cov_ab"]), rel=0.1)
    assert resampled[:, 0, 0].std() == pytest.approx(np.sqrt(delong["var_a"]), rel=0.1)
    assert differences.mean() == pytest.approx(delong["auc_a"] - delong["auc_b"], abs=0.002)
    p_bootstrap = paired_differences(resampled, run=0, reference=1)["per_class_p"][0]
    assert delong["p_value"] < 0.01 and p_bootstrap < 0.01


def test_paired_bootstrap_ci_covers_a_zero_difference_95_percent():
    """Two runs that differ only by their own noise: the true AUC difference is 0, and the
    paired 95% interval should contain it in about 95% of repetitions."""
    rng = np.random.default_rng(2)
    covered, widths_paired, widths_unpaired = [], [], []
    for repetition in range(300):
        labels, a, b, patient_ids = correlated_runs(rng, patients=150, images_per_patient=3)
        resampled = paired_bootstrap_auc(labels[:, None], [a[:, None], b[:, None]], patient_ids,
                                         n_resamples=200, seed=repetition)
        low, high = paired_differences(resampled, run=0, reference=1)["per_class_ci"][0]
        covered.append(low <= 0 <= high)
        widths_paired.append(high - low)
        widths_unpaired.append(np.subtract(*np.percentile(resampled[:, 0, 0], [97.5, 2.5])))
    # 300 repetitions: the coverage estimate has a standard error of about 0.013
    assert 0.91 <= np.mean(covered) <= 0.985
    # what pairing buys: the shared part cancels, so the difference is far better determined
    # than either AUC alone
    assert np.median(widths_paired) < 0.8 * np.median(widths_unpaired)  # 0.67 here; unpaired would be 1.4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Baseline runs on two caches with the same rows and labels (same seed) whose features
    separate the classes well (AUC 0.80) and poorly (0.64): two 'encoders', one clearly weaker."""
    root = tmp_path_factory.mktemp("compare")
    for name, separation in (("strong", 1.19), ("weak", 0.5)):
        write_synthetic_cache(root / f"{name}.h5", rows=ROWS, dim=16, separation=separation, seed=0)
        call_main("heads.baseline", "--cache", root / f"{name}.h5", "--out", root / name, "--bootstrap", 20,
                  check_rc=0)
    return root


def compare(*args, check_rc=None):
    return call_main("heads.compare", *args, "--bootstrap", 200, check_rc=check_rc)


def test_identical_runs_differ_by_zero_with_p_one(runs, tmp_path):
    shutil.copytree(runs / "strong", tmp_path / "copy")
    compare(runs / "strong", tmp_path / "copy", "--out", tmp_path / "out", check_rc=0)
    differences = pd.read_csv(tmp_path / "out" / "paired_differences.csv")
    assert len(differences) == 15 and (differences["difference"] == 0).all()
    assert (differences[["ci_low", "ci_high"]].to_numpy() == 0).all()
    assert (differences["p_bootstrap"] == 1).all()
    assert (differences["p_delong"].dropna() == 1).all() and (differences["p_delong_holm"].dropna() == 1).all()


def test_a_clearly_weaker_run_loses_in_every_class(runs, tmp_path):
    result = compare(runs / "weak", runs / "strong", "--out", tmp_path / "out", check_rc=0)
    out = tmp_path / "out"
    differences = pd.read_csv(out / "paired_differences.csv", keep_default_na=False, na_values=[""])
    assert list(differences.columns) == DIFFERENCE_COLUMNS
    # the reference is the better VALIDATION run, named by its folder
    assert set(differences["reference"]) == {"strong"} and set(differences["run"]) == {"weak"}
    assert list(differences["class"]) == ["mean", *json.loads((runs / "strong" / "config.json").read_text())
                                          ["cache_attrs"]["classes"]]
    assert (differences["ci_high"] < 0).all()  # every CI excludes 0
    assert differences["p_delong"].iloc[1:].max() < 1e-4 and differences["p_delong_holm"].iloc[1:].max() < 1e-3
    assert differences[["p_delong", "p_delong_holm"]].iloc[0].isna().all()  # no DeLong for the mean
    # the known answer: Phi(0.5/sqrt 2) - Phi(1.19/sqrt 2) = 0.638 - 0.800
    assert differences["difference"].iloc[0] == pytest.approx(0.638 - 0.800, abs=0.03)
    leaderboard = pd.read_csv(out / "comparison.csv")
    assert leaderboard["run"].tolist() == ["strong", "weak"]
    assert leaderboard["run_dir"].tolist() == [str(runs / "strong"), str(runs / "weak")]
    assert leaderboard["features"].tolist() == ["synthetic-gaussian (separation=1.19, 0 px, 16-d)",
                                                "synthetic-gaussian (separation=0.5, 0 px, 16-d)"]
    assert leaderboard["test_mean_auc"].iloc[1] == pytest.approx(differences["auc"].iloc[0])
    assert (out / "forest_plot.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "comparison.md").read_text()
    assert "best validation mean AUC" in markdown and "| Hernia |" in markdown
    # synthetic features on a synthetic split: said in the tables and on the figure
    assert markdown.rstrip().endswith("**SYNTHETIC FEATURES; not the official NIH test split**")
    loaded = label_runs([load_run(str(runs / "weak")), load_run(str(runs / "strong"))])
    assert comparison_report.marks(compare_runs(loaded, reference=1, n_resamples=10)) == [
        "SYNTHETIC FEATURES", "not the official NIH test split"]
    assert "minus" in result.stdout and "Hernia" in result.stdout


def test_reference_is_chosen_on_validation_not_test(runs, tmp_path):
    """A run that is best on validation but worse on test stays the reference."""
    shutil.copytree(runs / "weak", tmp_path / "weak_good_val")
    val_path = tmp_path / "weak_good_val" / "predictions_val.csv"
    val = pd.read_csv(val_path)
    for column in [c for c in val.columns if c.startswith("label_")]:
        val[column.replace("label_", "prob_")] = val[column] * 0.5 + 0.25  # a perfect validation score
    val.to_csv(val_path, index=False)
    compare(runs / "strong", tmp_path / "weak_good_val", "--out", tmp_path / "out", check_rc=0)
    differences = pd.read_csv(tmp_path / "out" / "paired_differences.csv")
    assert set(differences["reference"]) == {"weak_good_val"}
    assert (differences["difference"].iloc[1:] > 0).all()
    compare(runs / "strong", tmp_path / "weak_good_val", "--reference", runs / "strong", "--out", tmp_path / "given",
            check_rc=0)
    assert "given with --reference" in (tmp_path / "given" / "comparison.md").read_text()


@pytest.mark.parametrize("change, message", [
    (lambda test: test.drop(index=7), "different test images"),
    (lambda test: test.assign(label_Hernia=1 - test["label_Hernia"]), "different labels of Hernia"),
    (lambda test: test.assign(patient_id=test["patient_id"] + 1), "different patient ids"),
])
def test_runs_on_different_test_rows_are_refused(runs, tmp_path, change, message):
    shutil.copytree(runs / "weak", tmp_path / "other")
    path = tmp_path / "other" / "predictions_test.csv"
    change(pd.read_csv(path, dtype={"image_id": str})).to_csv(path, index=False)
    result = compare(runs / "strong", tmp_path / "other", "--out", tmp_path / "out", check_rc=2)
    assert message in result.stderr and str(tmp_path / "other") in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_directory_from_another_tool_is_refused(runs, tmp_path):
    (tmp_path / "other_tool").mkdir()
    (tmp_path / "other_tool" / "results.csv").write_text("a,b\n1,2\n")
    result = compare(runs / "strong", tmp_path / "other_tool", "--out", tmp_path / "out", check_rc=2)
    assert "not a run directory of this kit" in result.stderr and "other_tool" in result.stderr
    (tmp_path / "other_tool" / "config.json").write_text(json.dumps({"lr": 0.1}))
    (tmp_path / "other_tool" / "predictions_test.csv").write_text("id,score\nx,0.5\n")
    result = compare(runs / "strong", tmp_path / "other_tool", "--out", tmp_path / "out", check_rc=2)
    assert "not a run config of this kit" in result.stderr
    shutil.copy(runs / "strong" / "config.json", tmp_path / "other_tool" / "config.json")
    result = compare(runs / "strong", tmp_path / "other_tool", "--out", tmp_path / "out", check_rc=2)
    assert "not a predictions file of this kit" in result.stderr and "image_id" in result.stderr


def test_out_deletes_or_replaces_only_an_earlier_comparison(runs, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = compare(runs / "strong", runs / "weak", "--out", tmp_path / "mine", "--overwrite", check_rc=2)
    assert "did not write" in result.stderr and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # a folder that merely holds a file named comparison.json is not a comparison of the kit's
    (tmp_path / "lookalike").mkdir()
    (tmp_path / "lookalike" / "comparison.json").write_text("{}")
    (tmp_path / "lookalike" / "thesis.tex").write_text("years of work")
    result = compare(runs / "strong", runs / "weak", "--out", tmp_path / "lookalike", "--overwrite", check_rc=2)
    assert "did not write" in result.stderr and (tmp_path / "lookalike" / "thesis.tex").exists()
    # a user's folder that happens to be called <out>.partial is left alone, and nothing is compared
    (tmp_path / "cmp.partial").mkdir()
    (tmp_path / "cmp.partial" / "notes.txt").write_text("mine")
    result = compare(runs / "strong", runs / "weak", "--out", tmp_path / "cmp", check_rc=2)
    assert "cmp.partial" in result.stderr and (tmp_path / "cmp.partial" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "cmp").exists()
    (tmp_path / "cmp.partial" / "notes.txt").unlink()
    (tmp_path / "cmp.partial").rmdir()
    # a run folder is not a comparison, even with --overwrite
    result = compare(runs / "strong", runs / "weak", "--out", runs / "weak", "--overwrite", check_rc=2)
    assert "is a run folder" in result.stderr and (runs / "weak" / "config.json").exists()
    compare(runs / "strong", runs / "weak", "--out", tmp_path / "cmp", check_rc=0)
    compare(runs / "strong", runs / "weak", "--out", tmp_path / "cmp", check_rc=2)  # no --overwrite
    compare(runs / "strong", runs / "weak", "--out", tmp_path / "cmp", "--overwrite", check_rc=0)
    assert not (tmp_path / "cmp.partial").exists()
    assert "give at least two" in compare(runs / "strong", runs / "strong", check_rc=2).stderr


def test_end_to_end_two_synthetic_caches_through_the_clis(tmp_path):
    """The user's path: two caches (two 'encoders'), a head on each, then `python -m heads.compare`
    in its own process."""
    for name, separation in (("a", 1.19), ("b", 0.8)):
        write_synthetic_cache(tmp_path / f"{name}.h5", rows=ROWS, dim=16, separation=separation, seed=0)
        call_main("heads.train", "--cache", tmp_path / f"{name}.h5", "--out", tmp_path / f"run_{name}",
                  "--max-epochs", 8, "--lr", 0.01, "--bootstrap", 20, "--device", "cpu", check_rc=0)
    result = run_cli("heads.compare", tmp_path / "run_a", tmp_path / "run_b", "--out", tmp_path / "cmp",
                     "--bootstrap", "200", check_rc=0)
    assert "run_b minus run_a" in result.stdout
    differences = pd.read_csv(tmp_path / "cmp" / "paired_differences.csv")
    mean = differences[differences["class"] == "mean"].iloc[0]
    assert mean["ci_high"] < 0 and mean["p_bootstrap"] < 0.05
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == [
        ".cxr14-kit", "comparison.csv", "comparison.json", "comparison.md", "forest_plot.png", "paired_differences.csv"]


def test_features_of_one_cache_and_of_several_are_described():
    attrs = {"backbone": "resnet50", "weights": "IMAGENET1K_V2", "image_size": 224, "feature_dim": 3072,
             "preprocessing": json.dumps({"resize": 256, "layers": ["layer3", "layer4"]})}
    single = {"cache": "/c/a.h5", "cache_fingerprint": "f1", "cache_attrs": attrs, "settings": {}}
    assert describe_features(single) == {"features": "resnet50 (IMAGENET1K_V2, 224 px, layer3,layer4, 3072-d)",
                                         "cache_fingerprints": "f1"}
    dino = {"backbone": "hf:facebook/dinov2-small", "weights": "pretrained", "image_size": 224, "feature_dim": 384}
    several = {**single, "caches": [
        {"name": "a.h5", "path": "/c/a.h5", "fingerprint": "f1", "columns": [0, 3072], "attrs": attrs},
        {"name": "dino.h5", "path": "/c/dino.h5", "fingerprint": "f2", "columns": [3072, 3456], "attrs": dino}]}
    assert describe_features(several) == {
        "features": "resnet50 (IMAGENET1K_V2, 224 px, layer3,layer4, 3072-d) + hf:facebook/dinov2-small "
                    "(pretrained, 224 px, 384-d)", "cache_fingerprints": "f1 + f2"}
    # a run that joined caches before each cache's attributes were recorded: nothing invented
    for entry in several["caches"]:
        del entry["attrs"]
    assert describe_features(several)["features"] == "resnet50 (IMAGENET1K_V2, 224 px, layer3,layer4, 3072-d) + dino"


def test_a_class_with_one_label_value_is_left_out(runs, tmp_path):
    for name in ("strong", "weak"):
        shutil.copytree(runs / name, tmp_path / name)
        path = tmp_path / name / "predictions_test.csv"
        pd.read_csv(path, dtype={"image_id": str}).assign(label_Hernia=0).to_csv(path, index=False)
    compare(tmp_path / "weak", tmp_path / "strong", "--out", tmp_path / "out", check_rc=0)
    differences = pd.read_csv(tmp_path / "out" / "paired_differences.csv")
    assert "Hernia" not in set(differences["class"]) and len(differences) == 14
    leaderboard = pd.read_csv(tmp_path / "out" / "comparison.csv").set_index("run")
    scored = [c for c in leaderboard.columns if c.startswith("auc_") and c != "auc_Hernia"]
    assert leaderboard["auc_Hernia"].isna().all()
    assert leaderboard.loc["weak", "test_mean_auc"] == pytest.approx(leaderboard.loc["weak", scored].mean())


@pytest.mark.parametrize("flag, value, expected", [
    ("--bootstrap", "0", "outside [1, 100000]"), ("--bootstrap", "100000000", "outside [1, 100000]"),
    ("--bootstrap", "many", "not an integer"), ("--seed", "-1", "outside [0,"), ("--label", "nameonly", "NAME=RUN_DIR"),
    ("--label", "a|b=x", "may not hold"), ("--nonsense", "1", "unrecognized arguments"),
])
def test_bad_flags_are_one_line_at_parse_time(capsys, flag, value, expected):
    from heads.compare import get_args_parser

    with pytest.raises(SystemExit) as stopped:
        get_args_parser().parse_args(["a", "b", flag, value])
    message = capsys.readouterr().err
    assert stopped.value.code == 2 and message.count("\n") == 1 and expected in message


def test_runs_are_labelled_and_a_joined_run_lists_every_encoder_and_fingerprint(runs, tmp_path):
    call_main("heads.baseline", "--cache", runs / "strong.h5", "--cache", runs / "weak.h5",
              "--out", tmp_path / "joined", "--bootstrap", 20, check_rc=0)
    for search in ("s1", "s2"):  # two searches' best runs share a folder name
        shutil.copytree(runs / "weak", tmp_path / search / "best_run")
    for search, settings in (("s1", {"depth": 0, "width": 128}),
                             ("s2", {"depth": 0, "width": 256, "C": 0.31622776601683794})):  # as a search suggests
        config_path = tmp_path / search / "best_run" / "config.json"
        config = json.loads(config_path.read_text())
        config["settings"].update(settings)
        config_path.write_text(json.dumps(config))
    compare("--label", f"both={tmp_path / 'joined'}", runs / "strong", tmp_path / "s1" / "best_run",
            tmp_path / "s2" / "best_run", "--out", tmp_path / "out", check_rc=0)
    board = pd.read_csv(tmp_path / "out" / "comparison.csv").set_index("run")
    assert sorted(board.index) == ["both", "s1/best_run", "s2/best_run", "strong"]
    assert board.loc["both", "run_dir"] == str(tmp_path / "joined")
    assert board.loc["both", "features"] == ("synthetic-gaussian (separation=1.19, 0 px, 16-d) + "
                                             "synthetic-gaussian (separation=0.5, 0 px, 16-d)")
    fingerprints = [cache.read_attrs(runs / f"{name}.h5")["fingerprint"] for name in ("strong", "weak")]
    assert board.loc["both", "cache_fingerprints"] == " + ".join(fingerprints)
    markdown = (tmp_path / "out" / "comparison.md").read_text()
    assert all(f[:12] in markdown for f in fingerprints) and " + |" not in markdown and "| `both` |" in markdown
    assert "C=0.316 " in markdown and "0.3162277" not in markdown  # rounded where it is read, whole in the CSV
    assert "width=" not in markdown  # a linear head's width changed nothing
    assert "0.31622776601683794" in board.loc["s2/best_run", "settings"]
    result = compare("--label", f"x={runs / 'strong'}", "--label", f"x={runs / 'weak'}", "--out", tmp_path / "twice",
                     check_rc=2)
    assert "names two runs" in result.stderr and not (tmp_path / "twice").exists()


def test_runs_scored_on_no_test_rows_are_refused(runs, tmp_path):
    for name in ("strong", "weak"):
        shutil.copytree(runs / name, tmp_path / name)
        path = tmp_path / name / "predictions_test.csv"
        path.write_text(path.read_text().splitlines()[0] + "\n")
    result = compare(tmp_path / "strong", tmp_path / "weak", "--out", tmp_path / "out", check_rc=2)
    assert "no rows" in result.stderr and "predictions_test.csv" in result.stderr and not (tmp_path / "out").exists()


def _edit_json(name, change):
    def edit(run):
        path = run / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return edit


def _edit_csv(name, change):
    def edit(run):
        path = run / name
        change(pd.read_csv(path, dtype={"image_id": str})).to_csv(path, index=False)
    return edit


def _without_val_predictions(edit):
    def both(run):
        (run / "predictions_val.csv").unlink()
        edit(run)
    return both


@pytest.mark.parametrize("damage, file, says", [
    (_edit_json("config.json", lambda c: {**c, "settings": [1, 2]}), "config.json", "settings is a list"),
    (_edit_json("config.json", lambda c: {**c, "model": 5}), "config.json", "model is an integer"),
    (_edit_json("config.json", lambda c: {**c, "caches": "a.h5"}), "config.json", "caches is a string"),
    (_edit_json("config.json", lambda c: {**c, "caches": [1]}), "config.json", "caches[0] is an integer"),
    (_edit_json("config.json", lambda c: {**c, "cache_attrs": {**c["cache_attrs"], "preprocessing": "{oops"}}),
     "config.json", "preprocessing is not a JSON object"),
    (_edit_json("metrics.json", lambda m: [m]), "metrics.json", "is a list"),
    (_edit_json("metrics.json", lambda m: {**m, "train_seconds": "fast"}), "metrics.json", "train_seconds is a string"),
    (_without_val_predictions(_edit_json("metrics.json", lambda m: {**m, "val": {"mean_auc": "high"}})),
     "metrics.json", "val.mean_auc is a string"),
    (_edit_csv("predictions_test.csv", lambda f: f.assign(prob_Hernia="high")), "predictions_test.csv",
     "prob_Hernia = high"),
    (_edit_csv("predictions_val.csv", lambda f: f.drop(columns="prob_Hernia")), "predictions_val.csv",
     "other classes"),
])
def test_a_damaged_run_record_is_one_line_naming_the_file(runs, tmp_path, damage, file, says):
    shutil.copytree(runs / "weak", tmp_path / "damaged")
    damage(tmp_path / "damaged")
    result = compare(runs / "strong", tmp_path / "damaged", "--out", tmp_path / "out", check_rc=2)
    assert result.stderr.count("\n") == 1 and str(tmp_path / "damaged" / file) in result.stderr
    assert says in result.stderr and not (tmp_path / "out").exists()


def test_the_paired_bootstrap_draws_the_patients_of_a_runs_own_ci():
    """heads.train's test CI and heads.compare's paired resamples share one definition of a
    resample: from the same seed, the same patients, so the same AUCs to the last bit."""
    rng = np.random.default_rng(0)
    labels = (rng.random((300, 3)) < 0.3).astype(np.uint8)
    scores, other = rng.random((300, 3)), rng.random((300, 3))
    patient_ids = rng.integers(0, 90, 300)
    alone = bootstrap_auc(labels, scores, patient_ids, n_resamples=250, seed=3, chunk=100)
    paired = paired_bootstrap_auc(labels, [scores, other], patient_ids, n_resamples=250, seed=3, chunk=100)
    assert np.array_equal(alone, paired[:, 0], equal_nan=True)


def test_runs_are_listed_by_validation_never_ranked_by_test(runs, tmp_path):
    """The better validation run scores worst on test (its test scores inverted): the table keeps
    it first, as the reference, because test is reported, never ranked."""
    for name in ("strong", "weak"):
        shutil.copytree(runs / name, tmp_path / name)
    predictions = pd.read_csv(tmp_path / "strong" / "predictions_test.csv")
    probabilities = [c for c in predictions.columns if c.startswith("prob_")]
    predictions[probabilities] = 1.0 - predictions[probabilities]
    predictions.to_csv(tmp_path / "strong" / "predictions_test.csv", index=False)
    compare(tmp_path / "weak", tmp_path / "strong", "--out", tmp_path / "out", check_rc=0)
    table = pd.read_csv(tmp_path / "out" / "comparison.csv")
    assert table["test_mean_auc"].iloc[0] < table["test_mean_auc"].iloc[1]  # the poisoned run is worse on test
    assert table["run"].tolist() == ["strong", "weak"] and table["reference"].tolist() == [True, False]
    assert "sorted by test" not in (tmp_path / "out" / "comparison.md").read_text()
