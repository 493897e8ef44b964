"""The benchmark scripts' CPU-checkable parts (their timings are never asserted)."""
import numpy as np
import torch

from benchmarks import bench_extract, gpu_check
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
