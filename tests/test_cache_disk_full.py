"""A full disk ends in one DiskFull line, with the cache intact and resumable elsewhere.
Each case runs on a real, tiny tmpfs mounted in a private mount namespace (`unshare -m`,
as root); the tests skip where that is not allowed."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

_CASE = r"""
import hashlib, json, os, shutil, sys
import numpy as np
import cache
from cache.check import find_problems

disk, elsewhere, case = sys.argv[1:4]
path = os.path.join(disk, "c.h5")
n_rows, dim, part_rows = 600, 1024, 100  # 2.4 MB of float32 features when finished
table = {"image_id": [f"{i:05d}.png" for i in range(n_rows)], "patient_id": np.arange(n_rows),
         "labels": np.zeros((n_rows, len(cache.CLASSES)), np.uint8), "split": np.array(["train"] * n_rows, dtype=object)}
attrs = {key: 1 for key in cache.FINGERPRINT_KEYS}
attrs.update(classes=list(cache.CLASSES), preprocessing={}, backbone="test")
if case == "create":  # a disk too small for even the row table
    try:
        cache.create_cache(path, table=table, feature_dim=dim, feature_dtype="float32", attrs=attrs)
    except cache.DiskFull as err:
        print(json.dumps({"error": str(err), "left": os.listdir(disk)}))
    sys.exit(0)
cache.create_cache(path, table=table, feature_dim=dim, feature_dtype="float32", attrs=attrs)
writer = cache.PartWriter(path, fingerprint=cache.read_attrs(path)["fingerprint"])
features = np.arange(n_rows * dim, dtype=np.float32).reshape(n_rows, dim)
digest = lambda: hashlib.sha256(open(path, "rb").read()).hexdigest()
result = {}
try:
    if case == "part":
        before = digest()
        writer.write(rows=np.arange(n_rows), features=features)  # one 2.4 MB part on a 1 MiB disk
    else:
        for start in range(0, n_rows, part_rows):
            writer.write(rows=np.arange(start, start + part_rows), features=features[start:start + part_rows])
        before = digest()
        if case == "merge-past-the-free-space-check":  # fooled: the space reservation must catch it
            real_usage = shutil.disk_usage
            cache.store.shutil.disk_usage = lambda where: real_usage(where)._replace(free=1 << 40)
        with cache.exclusive_lock(path):
            cache.merge_parts(path)
except cache.DiskFull as err:
    result["error"] = str(err)
parts = cache.store.parts_dir(path)
result.update(intact=digest() == before, problems=find_problems(path),
              leftovers=sorted(p for p in os.listdir(disk) if p.endswith((".merging", ".creating")))
              + sorted(p for p in os.listdir(parts) if not p.endswith(".npz")),
              parts=len(os.listdir(parts)))
if case != "part":  # resume elsewhere: copy the file and its parts, as the message says
    shutil.copy(path, elsewhere)
    shutil.copytree(parts, os.path.join(elsewhere, "c.h5.parts"))
    moved = os.path.join(elsewhere, "c.h5")
    with cache.exclusive_lock(moved):
        result["merged_elsewhere"] = cache.merge_parts(moved)
    done = cache.read_table(moved)["done"]
    stored = cache.read_features(moved, {"all": np.arange(n_rows)})["all"]
    result["resumed"] = bool(done.all() and (stored == features).all())
print(json.dumps(result))
"""


def _run_on_small_disk(tmp_path, case, size):
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    disk, elsewhere = tmp_path / "disk", tmp_path / "elsewhere"
    disk.mkdir(), elsewhere.mkdir()
    shell = 'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 77; exec "$3" -c "$4" "$2" "$5" "$6"'
    result = subprocess.run(["unshare", "-m", "sh", "-c", shell, "sh", size, str(disk), sys.executable, _CASE,
                             str(elsewhere), case], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    if result.returncode == 77 or "unshare failed" in result.stderr:
        pytest.skip(f"cannot mount a tmpfs in a private namespace: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr  # no traceback, no segmentation fault
    return json.loads(result.stdout.splitlines()[-1]), disk


def _assert_one_clear_line(message, disk, where=""):
    assert "\n" not in message and message.startswith(f"no space left on device at {disk}{where}")
    assert "the finished cache needs about 2.4 MiB" in message
    assert f"copying {disk}/c.h5 and {disk}/c.h5.parts/" in message


def test_a_part_write_on_a_full_disk_leaves_nothing_half_written(tmp_path):
    result, disk = _run_on_small_disk(tmp_path, "part", "1m")
    _assert_one_clear_line(result["error"], disk, where="/c.h5.parts")
    assert result["intact"] and result["problems"] == []
    assert result["leftovers"] == [] and result["parts"] == 0


@pytest.mark.parametrize("case", ["merge", "merge-past-the-free-space-check"])
def test_a_merge_on_a_full_disk_keeps_the_cache_and_its_parts(tmp_path, case):
    result, disk = _run_on_small_disk(tmp_path, case, "3m")
    _assert_one_clear_line(result["error"], disk)
    assert result["intact"] and result["problems"] == []
    assert result["leftovers"] == [] and result["parts"] == 6
    assert result["merged_elsewhere"] == 600 and result["resumed"]


def test_creating_a_cache_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    result, disk = _run_on_small_disk(tmp_path, "create", "64k")
    assert result["error"].startswith(f"no space left on device at {disk} while creating the cache")
    assert "give --cache a path on a disk with room" in result["error"] and result["left"] == []
