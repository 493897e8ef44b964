"""The benchmark scripts' CPU-checkable parts (their timings are never asserted)."""
import torch

from benchmarks import gpu_check
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


def test_gpu_check_runs_end_to_end_on_cpu():
    result = call_main("benchmarks.gpu_check", "--device", "cpu", "--quick", check_rc=0)
    for measure in ("CPU fp32 vs cpu fp32 embeddings", "decode-bound limit", "this kit",
                    "default head to early stop", "trials, pruner median"):
        assert measure in result.stdout
    assert "PASS" in result.stdout
