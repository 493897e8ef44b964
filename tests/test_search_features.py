"""`search --cache A.h5 --cache B.h5`: the feature set is searched (each cache alone and both side by side)."""
import json

import optuna
import pandas as pd
import pytest

import heads.data
import heads.settings
import search.run
from cache.synthetic import write_synthetic_cache
from conftest import call_main
from heads.training import train_and_report

QUICK = ["--max-epochs", "8", "--patience", "3", "--bootstrap", "10", "--device", "cpu", "--pruner", "none"]
ROWS = {"train": 600, "val": 300, "test": 300}


@pytest.fixture(scope="module")
def two_caches(tmp_path_factory):
    """The same images twice: a weak encoder (planted signal 0.3) and a strong one (1.5)."""
    folder = tmp_path_factory.mktemp("two")
    weak, strong = folder / "weak.h5", folder / "strong.h5"
    write_synthetic_cache(weak, rows=ROWS, dim=16, separation=0.3, seed=0)
    write_synthetic_cache(strong, rows=ROWS, dim=16, separation=1.5, seed=0)
    return weak, strong


def test_the_feature_set_is_searched_and_each_cache_read_once(two_caches, tmp_path, monkeypatch):
    weak, strong = two_caches
    reads = []
    real_load = heads.data.load_head_data

    def counting_load(paths, **kwargs):
        reads.append(list(map(str, paths)))
        return real_load(paths, **kwargs)
    monkeypatch.setattr(search.run, "load_head_data", counting_load)
    out = tmp_path / "s"
    result = call_main("search", "--cache", weak, "--cache", strong, "--out", out, "--trials", "12",
                       "--trials-per-pass", "6", *QUICK, check_rc=0)
    assert reads == [[str(weak), str(strong)]]  # one read of both caches for every trial and the best run
    study = optuna.load_study(study_name="cxr14-heads", storage=f"sqlite:///{out / 'study.db'}")
    assert set(study.best_trial.params["features"]) and study.best_trial.params["features"] != "weak"
    tried = {t.params["features"] for t in study.trials}
    assert tried <= {"weak", "strong", "weak+strong"} and len(tried) >= 2
    # a trial on the weak features alone scores clearly below one that has the strong ones
    by_set = pd.read_csv(out / "trials.csv").groupby("params_features")["value"].max()
    assert by_set["weak"] < max(by_set.drop("weak")) - 0.1
    best = json.loads((out / "best_params.json").read_text())
    assert best["params"]["features"] == study.best_trial.params["features"]
    config = json.loads((out / "config.json").read_text())
    assert config["search_space"]["features"] == ["choice", ["weak", "strong", "weak+strong"]]
    assert config["cache"] == [str(weak), str(strong)]
    run_config = json.loads((out / "best_run" / "config.json").read_text())
    assert run_config["search"]["features"] == best["params"]["features"]
    assert run_config["name"] == "cxr14-heads"  # the study's name: heads.compare and heads.runs show it
    assert best["retrained_val_mean_auc"] == pytest.approx(study.best_value, abs=1e-9)
    assert "features" in result.stdout


def test_the_study_identity_covers_every_cache(two_caches, tmp_path):
    weak, strong = two_caches
    out = tmp_path / "s"
    call_main("search", "--cache", weak, "--cache", strong, "--out", out, "--trials", "2", *QUICK, check_rc=0)
    result = call_main("search", "--cache", weak, "--out", out, "--trials", "3", *QUICK)
    assert result.returncode == 2 and "another cache_fingerprint" in result.stderr


def test_the_best_run_is_set_against_the_other_runs_of_the_tree(two_caches, tmp_path):
    weak, strong = two_caches
    root = tmp_path / "outputs"
    settings = {**heads.settings.DEFAULTS, "max_epochs": 20, "lr": 0.01, "batch_size": 64}
    other, _ = train_and_report(cache_path=strong, settings=settings,
                                out=root / "runs" / "strong-default", device="cpu", n_bootstrap=10, quiet=True)
    result = call_main("search", "--cache", weak, "--out", root / "search" / "weak", "--trials", "3", *QUICK,
                       check_rc=0)
    # the same images through two encoders: the same test rows, so the other run is listed, by validation
    other_val = json.loads((other / "metrics.json").read_text())["val"]["mean_auc"]
    assert f"1 other run under {root} scored the same 300 test images" in result.stdout
    assert f"{other_val:.4f}  {root / 'runs' / 'strong-default'}" in result.stdout
    assert (f"python -m heads.compare {root / 'search' / 'weak' / 'best_run'} {root / 'runs' / 'strong-default'}"
            in result.stdout)
