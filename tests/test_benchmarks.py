"""The benchmark scripts' CPU-checkable parts (their timings are never asserted)."""
import re

import numpy as np
import optuna
import pandas as pd
import torch

from benchmarks import bench_extract, bench_search, bench_transfer, gpu_check
from benchmarks.transfer_example import planted_drop
from cache.vocabulary import shared_name
from conftest import call_main
from extract.nih import index_images
from extract.synthetic import write_dataset


def test_embedding_agreement_flags_what_its_precision_cannot_explain(tmp_path):
    write_dataset(tmp_path, patients=2, images_per_patient=2, size=64)
    paths = sorted(index_images(tmp_path).values())
    same = gpu_check.embedding_agreement(paths, weights="none", device=torch.device("cpu"), precision="fp32",
                                         image_size=64)
    assert same["ok"] and same["max_relative_error"] < 1e-6 and same["min_cosine"] > 0.999999
    bf16 = gpu_check.embedding_agreement(paths, weights="none", device=torch.device("cpu"), precision="bf16",
                                         image_size=64)
    assert 0 < bf16["max_relative_error"] < gpu_check.TOLERANCE["bf16"] and bf16["ok"]
    strict = gpu_check.embedding_agreement(paths, weights="none", device=torch.device("cpu"), precision="bf16",
                                           image_size=64, tolerance=bf16["max_relative_error"] / 2)
    assert not strict["ok"]  # the same error, judged by a tolerance it exceeds


def test_gpu_check_reports_fail_and_exits_1():
    result = call_main("benchmarks.gpu_check", "--device", "cpu", "--quick", "--precision", "bf16",
                       "--tolerance", "1e-9", "--checks", "agreement")
    assert result.returncode == 1 and "FAIL" in result.stdout and "PASS" not in result.stdout


def test_gpu_check_runs_end_to_end_on_cpu():
    result = call_main("benchmarks.gpu_check", "--device", "cpu", "--quick", check_rc=0)
    for measure in ("CPU fp32 vs cpu fp32 embeddings", "decode-bound limit", "this kit",
                    "resnet50 (torchvision)", "(timm)", "(hf)", "(xrv)",
                    "default head to early stop", "trials, pruner median"):
        assert measure in result.stdout
    assert "PASS" in result.stdout


def test_relative_error_measures_the_worst_row():
    reference = np.array([[3.0, 4.0], [1.0, 0.0]])
    changed = reference + np.array([[0.0, 0.5], [0.0, 0.0]])
    assert bench_extract.relative_error(changed, reference) == 0.1


def test_bench_transfer_defaults_are_the_issues_sizes():
    args = bench_transfer.get_args_parser().parse_args([])
    assert (args.train_rows, args.dim, args.caches, args.fractions, args.repeats) == (
        20_000, 2048, 4, "0.01,0.1,0.25,1", 5)
    assert bench_transfer.nih_proportions(args.train_rows) == {"train": 20_000, "val": 2_144, "test": 6_551}


def test_the_transfer_worlds_only_shift_is_padchests_planted_swap():
    """Every other finding two datasets share sits on one column, so only the swap can drop."""
    for dataset, classes in bench_transfer.COLUMNS.items():
        assert len({shared_name(dataset, c) for c in classes}) == len(classes)
    assert planted_drop("nih", "chexpert", 0.9) == (0.0, 7, 0)
    assert planted_drop("chexpert", "vindr", 0.9) == (0.0, 9, 0)
    drop, shared, shifted = planted_drop("nih", "padchest", 0.9)
    assert (shared, shifted) == (14, 2) and abs(drop - 2 / 14 * 0.4) < 1e-12
    assert planted_drop("padchest", "vindr", 0.9)[1:] == (10, 2)


def test_bench_transfer_quick_times_both_commands_against_baselines_that_do_the_same_work(tmp_path):
    work = tmp_path / "work"
    printed = call_main("benchmarks.bench_transfer", "--quick", "--work-dir", work, check_rc=0).stdout
    for measure in ("heads.transfer, 2 x 2 matrix", "baseline: 2 heads.train + 2 heads.evaluate",
                    "heads.train --train-fraction 0.1,1 --repeats 1", "baseline: 2 heads.train, one fit each"):
        assert measure in printed
    assert printed.count("the 300 s target") == 2
    differences = re.findall(r"largest (?:test )?AUC difference from its (?:cells|fits) (\S+);", printed)
    assert len(differences) == 2 and all(float(d) < 1e-6 for d in differences), printed
    cells = pd.read_csv(work / "transfer" / "transfer.csv")
    assert set(zip(cells["source"], cells["target"])) == {(s, t) for s in ("nih", "chexpert")
                                                          for t in ("nih", "chexpert")}
    assert len(pd.read_csv(work / "efficiency" / "efficiency.csv")) == 2 * 14  # 2 fits x 14 classes


def test_bench_transfer_refuses_an_earlier_runs_work_dir(tmp_path):
    (tmp_path / "caches").mkdir()
    result = call_main("benchmarks.bench_transfer", "--quick", "--work-dir", tmp_path, check_rc=2)
    assert "holds an earlier run" in result.stderr and result.stdout == ""


def test_horizon_rows_rank_heads_by_what_they_had_reached_then():
    """Six planted learning curves: slow starters end best, so the ranking after one epoch is
    the reverse of the final one and after three epochs (every curve at its end) the same."""
    study = optuna.create_study(direction="maximize")
    for head in range(6):
        early, final = 0.6 + 0.01 * head, 0.8 - 0.01 * head  # head 0: slowest start, best end
        study.add_trial(optuna.trial.create_trial(value=final, params={}, distributions={},
                                                  intermediate_values={1: early, 2: early, 3: final}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, intermediate_values={1: 0.99}))
    after_one, after_three = bench_search.horizon_rows(study, epochs=(1, 3), top=2)
    assert after_one["value"] == "-1.00" and "stood 5, 6 of 6" in after_one["note"]
    assert after_three["value"] == "1.00" and "stood 1, 2 of 6" in after_three["note"]
    assert bench_search.horizon_rows(study, top=6) == []  # too few complete trials to rank
