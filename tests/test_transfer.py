"""heads.transfer: the matrix of heads trained on one synthetic dataset and scored on every
other recovers a planted shift (diagonal at the planted AUC, the shifted class at its planted
AUC off the diagonal, the drop as defined), says which cells share no class, keeps every run
and cell recomputable, and refuses caches of different encoders before any work."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from cache.outdir import folder_kind
from conftest import call_main
from heads.transfer import COLUMNS
from shifted_caches import planted_auc, write_dataset_cache

FAST = ["--lr", "0.05", "--max-epochs", "20", "--patience", "3", "--precision", "fp32", "--device", "cpu",
        "--bootstrap", "100"]
SEPARATION = 2.0


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    """NIH (4 classes), CheXpert (its Cardiomegaly's signal turned fully onto another feature:
    heads trained elsewhere score it at chance) and PadChest sharing only Nodule with NIH and
    nothing with CheXpert."""
    root = tmp_path_factory.mktemp("transfer")
    write_dataset_cache(root / "nih.h5", dataset="nih", separation=SEPARATION)
    write_dataset_cache(root / "chexpert.h5", dataset="chexpert", seed=1, separation=SEPARATION,
                        rotate={"Cardiomegaly": math.pi / 2})
    write_dataset_cache(root / "padchest.h5", dataset="padchest", classes=["nodule", "scoliosis"], seed=2,
                        separation=SEPARATION)
    result = call_main("heads.transfer", "--cache", root / "nih.h5", "--cache", root / "chexpert.h5",
                       "--cache", root / "padchest.h5", "--out", root / "out", *FAST, check_rc=0)
    return root / "out", result


def cell(table, source, target, name):
    return table[(table["source"] == source) & (table["target"] == target) & (table["class"] == name)].iloc[0]


def test_the_matrix_recovers_the_planted_shift(matrix):
    out, _ = matrix
    table = pd.read_csv(out / "transfer.csv")
    assert list(table.columns) == COLUMNS
    for source, name in [("nih", "Effusion"), ("nih", "Cardiomegaly"), ("chexpert", "Cardiomegaly"),
                         ("padchest", "Nodule")]:
        assert cell(table, source, source, name)["auc"] == pytest.approx(planted_auc(SEPARATION), abs=0.05)
    shifted = cell(table, "nih", "chexpert", "Cardiomegaly")
    assert shifted["auc"] == pytest.approx(planted_auc(SEPARATION, math.pi / 2), abs=0.07)  # chance
    assert shifted["ci_low"] < 0.5 < shifted["ci_high"]
    assert cell(table, "nih", "chexpert", "Effusion")["auc"] == pytest.approx(planted_auc(SEPARATION), abs=0.05)
    assert cell(table, "nih", "chexpert", "Effusion")["target_class"] == "Pleural Effusion"
    assert cell(table, "nih", "padchest", "Nodule")["auc"] == pytest.approx(planted_auc(SEPARATION), abs=0.05)


def test_the_drop_is_recomputed_from_transfer_csv_as_defined(matrix):
    out, result = matrix
    table = pd.read_csv(out / "transfer.csv").dropna(subset=["auc"])
    recorded = json.loads((out / "transfer.json").read_text())["drops"]
    for source in ("nih", "chexpert", "padchest"):
        home = table[(table["source"] == source) & (table["target"] == source)].set_index("class")["auc"]
        per_target = []
        for target in {"nih", "chexpert", "padchest"} - {source}:
            away = table[(table["source"] == source) & (table["target"] == target)].set_index("class")["auc"]
            common = away.index.intersection(home.index)
            if len(common):
                per_target.append(home[common].mean() - away[common].mean())
        assert recorded[source] == pytest.approx(np.mean(per_target), abs=1e-6)
        assert f"drop from the diagonal, {source}: {recorded[source]:+.3f}" in result.stdout
    # planted: NIH -> CheXpert loses Cardiomegaly to chance, one of the two classes of that cell;
    # NIH -> PadChest (Nodule) loses nothing
    planted = (planted_auc(SEPARATION) - 0.5) / 2 / 2
    assert recorded["nih"] == pytest.approx(planted, abs=0.04)
    assert "drop of a source = " in (out / "transfer.md").read_text()


def test_cells_without_a_shared_class_say_so_and_the_rest_recompute(matrix):
    out, result = matrix
    markdown = (out / "transfer.md").read_text()
    assert "| chexpert | " in markdown and "no shared class" in markdown
    padchest_row = next(line for line in result.stdout.splitlines() if line.startswith("padchest "))
    assert "no shared class" in padchest_row  # nothing in common with CheXpert
    assert not (out / "evaluations" / "padchest-on-chexpert").exists()
    assert folder_kind(out) == "transfer" and folder_kind(out / "runs" / "nih") == "run"
    assert folder_kind(out / "evaluations" / "nih-on-chexpert") == "evaluation"
    assert (out / "transfer.png").stat().st_size > 0
    # the diagonal is each run's own test result, and a cell's numbers are its evaluation's
    run_auc = json.loads((out / "runs" / "nih" / "metrics.json").read_text())["test"]["auc"]
    table = pd.read_csv(out / "transfer.csv")
    for name, auc in run_auc.items():
        assert cell(table, "nih", "nih", name)["auc"] == pytest.approx(auc, abs=1e-6)
    evaluation = json.loads((out / "evaluations" / "nih-on-chexpert" / "metrics.json").read_text())
    assert evaluation["source_run"]["path"] == str((out / "runs" / "nih").resolve())
    assert cell(table, "nih", "chexpert", "Effusion")["auc"] == pytest.approx(
        evaluation["test"]["auc"]["Pleural Effusion"], abs=1e-6)


def test_caches_of_different_encoders_are_refused_before_any_work(matrix, tmp_path):
    root = matrix[0].parent
    write_dataset_cache(tmp_path / "other.h5", dataset="chexpert", weights="synthetic-encoder-b")
    result = call_main("heads.transfer", "--cache", root / "nih.h5", "--cache", tmp_path / "other.h5",
                       "--out", tmp_path / "out", *FAST, check_rc=2)
    assert "differ: weights" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    result = call_main("heads.transfer", "--cache", root / "nih.h5", "--out", tmp_path / "out", check_rc=2)
    assert "at least two different caches" in result.stderr


def test_a_bad_head_setting_is_one_line(capsys):
    from heads.transfer import get_args_parser
    with pytest.raises(SystemExit) as stopped:
        get_args_parser().parse_args(["--cache", "a.h5", "--cache", "b.h5", "--lr", "0.1,0"])
    message = capsys.readouterr().err
    assert stopped.value.code == 2 and message.count("\n") == 1 and "outside (0, 1]" in message


def test_two_caches_of_one_dataset_are_refused(matrix, tmp_path):
    """Their test patients may be each other's train patients; the diagonal is each dataset's own test."""
    root = matrix[0].parent
    write_dataset_cache(tmp_path / "nih-again.h5", dataset="nih", seed=5)
    result = call_main("heads.transfer", "--cache", root / "nih.h5", "--cache", tmp_path / "nih-again.h5",
                       "--out", tmp_path / "out", *FAST, check_rc=2)
    assert "are both NIH" in result.stderr and not (tmp_path / "out").exists()


# --train-fraction: label efficiency across datasets (heads/transfer_efficiency.py) -----------

@pytest.fixture(scope="module")
def efficiency(matrix):
    root = matrix[0].parent
    out = root / "efficiency"
    result = call_main("heads.transfer", "--cache", root / "nih.h5", "--cache", root / "chexpert.h5",
                       "--train-fraction", "0.2,1", "--repeats", "2", "--out", out, *FAST, check_rc=0)
    return out, result


def test_every_fit_is_scored_on_every_test_split_and_recomputes_from_its_predictions(efficiency):
    from sklearn.metrics import roc_auc_score
    from heads.transfer_efficiency import COLUMNS as EFFICIENCY_COLUMNS

    out, result = efficiency
    table = pd.read_csv(out / "transfer_efficiency.csv")
    assert list(table.columns) == EFFICIENCY_COLUMNS
    fits = table.groupby(["source", "target", "fraction", "repeat"]).size()
    assert len(fits) == 2 * 2 * 2 * 2  # sources x targets x fractions x repeats
    for (source, target, fraction, repeat), rows in table.groupby(["source", "target", "fraction", "repeat"]):
        saved = pd.read_csv(out / "evaluations" / f"{source}-on-{target}" / f"f{fraction:g}-r{repeat}_test.csv")
        for row in rows.itertuples():
            known = saved[f"label_{row.target_class}"].notna()
            expected = roc_auc_score(saved.loc[known, f"label_{row.target_class}"],
                                     saved.loc[known, f"prob_{row.target_class}"])
            assert row.test_auc == pytest.approx(expected, abs=1e-6)  # the CSV keeps 6 digits
    assert "| nih | chexpert (CheXpert)" in (out / "transfer_efficiency.md").read_text()
    assert (out / "transfer_efficiency.png").stat().st_size > 10_000 and "nih | nih*" in result.stdout


def test_each_source_is_a_label_efficiency_run_whose_own_test_figures_the_matrix_repeats(efficiency):
    out, _ = efficiency
    table = pd.read_csv(out / "transfer_efficiency.csv")
    own = pd.read_csv(out / "runs" / "nih" / "efficiency.csv").dropna(subset=["test_auc"])
    home = table[(table["source"] == "nih") & (table["target"] == "nih")].set_index(["fraction", "repeat", "class"])
    for _, row in own.iterrows():
        assert home.loc[(row["fraction"], row["repeat"], row["class"]), "test_auc"] == pytest.approx(row["test_auc"],
                                                                                                  abs=1e-9)
    full = table[table["fraction"] == 1]
    shifted = full[(full["source"] == "nih") & (full["target"] == "chexpert") & (full["class"] == "Cardiomegaly")]
    assert shifted["test_auc"].mean() == pytest.approx(planted_auc(SEPARATION, math.pi / 2), abs=0.07)
    held = full[(full["source"] == "nih") & (full["target"] == "chexpert") & (full["class"] == "Effusion")]
    assert held["test_auc"].mean() == pytest.approx(planted_auc(SEPARATION), abs=0.05)
    small = table[table["fraction"] == 0.2]
    assert (small["n_train_images"] < full["n_train_images"].min()).all()


def test_the_drop_per_fraction_is_the_matrix_drop_of_each_fit(efficiency):
    from heads.transfer_efficiency import summarize

    out, result = efficiency
    table = pd.read_csv(out / "transfer_efficiency.csv").dropna(subset=["test_auc"])
    drops = []
    for repeat in (0, 1):
        fit = table[(table["source"] == "nih") & (table["fraction"] == 1) & (table["repeat"] == repeat)]
        home = fit[fit["target"] == "nih"].set_index("class")["test_auc"]
        away = fit[fit["target"] == "chexpert"].set_index("class")["test_auc"]
        common = sorted(set(home.index) & set(away.index))
        assert common == ["Cardiomegaly", "Effusion"]
        drops.append(home[common].mean() - away[common].mean())
    summary = summarize(table).set_index(["source", "target", "fraction"])
    assert summary.loc[("nih", "chexpert", 1), "drop"] == pytest.approx(np.mean(drops), abs=1e-12)
    assert summary.loc[("nih", "chexpert", 1), "drop"] > 0.1  # the planted Cardiomegaly shift
    assert np.isnan(summary.loc[("nih", "nih", 1), "drop"])
    assert f"{np.mean(drops):+.4f}" in result.stdout


@pytest.mark.parametrize("flags, message", [(["--train-fraction", "0.5", "--by", "sex"], "--by and --sensitivity"),
                                            (["--repeats", "2"], "give --train-fraction too")])
def test_efficiency_flags_that_do_not_fit_are_one_line(matrix, tmp_path, flags, message):
    root = matrix[0].parent
    result = call_main("heads.transfer", "--cache", root / "nih.h5", "--cache", root / "chexpert.h5",
                       "--out", tmp_path / "out", *flags, *FAST, check_rc=2)
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
