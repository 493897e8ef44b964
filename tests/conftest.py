"""Shared fixtures: a small synthetic NIH-layout dataset and a cache extracted from it with
random weights at a small image size, so that the suite needs no data, GPU or network."""
import contextlib
import importlib
import io
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pandas as pd
import pytest

from cache.synthetic import write_synthetic_cache
from extract.synthetic import write_dataset

REPO = Path(__file__).resolve().parents[1]
# The real NIH metadata (no images) sits in shared/nih beside the repository checkout.
NIH_METADATA = Path(os.environ.get("CXR14_NIH_METADATA", REPO.parent / "shared" / "nih"))
# fp32 asked for: `auto` is bf16 on CPUs with native bf16, and tests compare against fp32 values
TINY = ["--weights", "none", "--image-size", "64", "--device", "cpu", "--precision", "fp32", "--workers", "0",
        "--batch-size", "16"]


def run_cli(*args, cwd=REPO, timeout=300, check_rc=None):
    """Run `python -m ...` as a user would; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONWARNINGS="ignore::UserWarning", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check_rc is not None:
        assert result.returncode == check_rc, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def call_main(module, *args, check_rc=None):
    """Run a CLI's `main(get_args_parser().parse_args(args))` in this process: the same code as
    `python -m module` without paying torch's import time again. Returns what run_cli does."""
    entry = importlib.import_module(module if module.count(".") else f"{module}.__main__")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        returncode = entry.main(entry.get_args_parser().parse_args([str(a) for a in args]))
    result = types.SimpleNamespace(returncode=returncode, stdout=stdout.getvalue(), stderr=stderr.getvalue())
    if check_rc is not None:
        assert returncode == check_rc, f"rc={returncode}\n{result.stdout}\n{result.stderr}"
    return result



def predict_saved_test_images(run, image_dir, csv, *, n: int):
    """`heads.predict` on the first `n` test images of a run; returns (image paths, the
    probabilities it wrote, the probabilities the run saved for the same images)."""
    saved = pd.read_csv(Path(run) / "predictions_test.csv").set_index("image_id")
    names = list(saved.index[:n])
    images = [next(Path(image_dir).glob(f"images_*/images/{name}")) for name in names]
    call_main("heads.predict", "--run", run, *images, "--out", csv, "--device", "cpu", check_rc=0)
    predicted = pd.read_csv(csv)
    columns = [c for c in predicted.columns if c.startswith("prob_")]
    return images, predicted[columns].to_numpy(), saved.loc[names, columns].to_numpy()

@pytest.fixture(scope="session")
def nih_metadata():
    if not (NIH_METADATA / "Data_Entry_2017_v2020.csv.gz").exists():
        pytest.skip(f"real NIH metadata not found at {NIH_METADATA}")
    return NIH_METADATA


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("nih")
    write_dataset(out, patients=60, images_per_patient=3, size=96, seed=0)
    return out


@pytest.fixture(scope="session")
def extracted_cache(synthetic_dir, tmp_path_factory):
    """A finished cache of the synthetic dataset (read-only for the tests that share it)."""
    path = tmp_path_factory.mktemp("cache") / "features.h5"
    run_cli("extract", "--data-dir", synthetic_dir, "--cache", path, *TINY, check_rc=0)  # the real CLI
    return path


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A small synthetic cache the search tests share (a test file may define its own)."""
    path = tmp_path_factory.mktemp("search") / "features.h5"
    write_synthetic_cache(path, rows={"train": 800, "val": 400, "test": 500}, dim=24, separation=1.19)
    return path
