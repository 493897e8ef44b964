"""heads.compare --by: the paired comparison inside each subgroup. Run B is run A with its test
scores shuffled among women only, so B's loss is planted in the F group and nowhere else: the
F group's difference must be clearly negative, the M group's exactly 0, and every figure must
recompute from the saved predictions and the cache's metadata."""
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import cache
from cache.synthetic import write_synthetic_cache
from conftest import call_main
from heads.comparison import compare_runs, load_run
from heads.subgroups import MIN_CASES


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_by")
    path = root / "features.h5"
    write_synthetic_cache(path, rows={"train": 900, "val": 400, "test": 1500}, dim=16, separation=1.5,
                          dataset="csv")  # a version-2 cache: per-row sex, age, view
    call_main("heads.train", "--cache", path, "--out", root / "a", "--max-epochs", "20", "--lr", "0.05",
              "--bootstrap", "20", check_rc=0)
    shutil.copytree(root / "a", root / "b")
    table, metadata = cache.read_table(path), cache.read_metadata(path)
    sex = pd.Series(metadata["sex"], index=table["image_id"])
    predictions = pd.read_csv(root / "b" / "predictions_test.csv")
    women = (sex[predictions["image_id"]] == "F").to_numpy()
    probs = [c for c in predictions.columns if c.startswith("prob_")]
    shuffled = predictions.loc[women, probs].to_numpy()[np.random.default_rng(0).permutation(women.sum())]
    predictions.loc[women, probs] = shuffled
    predictions.to_csv(root / "b" / "predictions_test.csv", index=False, float_format="%.9g")
    out = root / "comparison"
    result = call_main("heads.compare", root / "a", root / "b", "--label", f"A={root / 'a'}",
                       "--label", f"B={root / 'b'}", "--by", "sex", "--bootstrap", "200", "--out", out, check_rc=0)
    return root, out, result, sex


def test_the_planted_loss_is_found_in_its_group_and_nowhere_else(runs):
    _, out, result, _ = runs
    table = pd.read_csv(out / "subgroup_differences.csv", keep_default_na=False, na_values=[""])
    mean = table[table["class"] == "mean"].set_index("group")
    assert set(mean.index) == {"F", "M"}  # rows without a sex are in no group
    assert (mean["reference"] == "A").all() and (mean["run"] == "B").all()
    assert mean.loc["F", "difference"] < -0.1 and mean.loc["F", "ci_high"] < 0
    assert mean.loc["M", ["difference", "ci_low", "ci_high"]].tolist() == [0, 0, 0]
    assert "sex=F" in result.stdout and "within subgroups (paired" in result.stdout
    assert "## Within subgroups (sex)" in (out / "comparison.md").read_text()


def test_each_group_recomputes_from_the_saved_predictions_and_the_cache_metadata(runs):
    root, out, _, sex = runs
    table = pd.read_csv(out / "subgroup_differences.csv", keep_default_na=False, na_values=[""])
    a, b = load_run(str(root / "a")), load_run(str(root / "b"))
    in_group = (sex[a.test["image_id"]] == "F").to_numpy()
    group = [replace(run, test=run.test[in_group].reset_index(drop=True)) for run in (a, b)]
    labels = group[0].test
    rows = table[(table["group"] == "F") & (table["class"] != "mean")].set_index("class")
    for name in a.classes:
        known = labels[f"label_{name}"].notna()
        n_pos, n_neg = int((labels[f"label_{name}"] == 1).sum()), int((labels[f"label_{name}"] == 0).sum())
        if min(n_pos, n_neg) < MIN_CASES:
            assert name not in rows.index  # too few cases in the group: not scored there
            continue
        expected = roc_auc_score(labels.loc[known, f"label_{name}"], group[1].test.loc[known, f"prob_{name}"])
        assert rows.loc[name, "auc"] == pytest.approx(expected, abs=1e-6)
        assert (rows.loc[name, "n_pos"], rows.loc[name, "n_neg"]) == (n_pos, n_neg)
    recomputed = compare_runs([a, b], reference=0, n_resamples=200)  # whole test: not the group's figure
    mean_f = table[(table["group"] == "F") & (table["class"] == "mean")].iloc[0]
    whole = recomputed.differences[recomputed.differences["class"] == "mean"].iloc[0]
    assert mean_f["difference"] < whole["difference"] < 0  # the loss is diluted over both sexes


def test_metadata_that_cannot_be_matched_is_refused_before_any_output(runs, tmp_path):
    root, _, _, _ = runs
    version_1, elsewhere = tmp_path / "v1.h5", tmp_path / "elsewhere.h5"
    write_synthetic_cache(version_1, rows={"train": 50, "val": 50, "test": 50}, dim=4, seed=7)  # NIH: no metadata
    write_synthetic_cache(elsewhere, rows={"train": 50, "val": 50, "test": 50}, dim=4, seed=7, dataset="csv")
    for flags, message in [(["--metadata-cache", tmp_path / "absent.h5"], "is not there"),
                           (["--metadata-cache", version_1], "holds no per-row metadata"),
                           (["--metadata-cache", elsewhere], "does not hold")]:
        out = tmp_path / f"out{len(message)}"
        result = call_main("heads.compare", root / "a", root / "b", "--by", "sex", "--out", out, *flags, check_rc=2)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not out.exists()
