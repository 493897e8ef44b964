"""Writers never leave a cache that cannot be finished: non-finite embeddings, any reason
text, symlinked caches, damaged part files, killed writers and their forked workers."""
import hashlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import cache
from cache.check import find_problems
from conftest import REPO, call_main

N_ROWS, DIM = 10, 4


def _make(path, feature_dtype="float32"):
    table = {"image_id": [f"{i:03d}.png" for i in range(N_ROWS)], "patient_id": np.arange(N_ROWS) // 2,
             "labels": np.zeros((N_ROWS, len(cache.CLASSES)), np.uint8),
             "split": np.array(["train"] * 6 + ["val"] * 2 + ["test"] * 2, dtype=object)}
    attrs = {key: 1 for key in cache.FINGERPRINT_KEYS}
    attrs.update(classes=list(cache.CLASSES), preprocessing={"x": 1}, backbone="test")
    cache.create_cache(path, table=table, feature_dim=DIM, feature_dtype=feature_dtype, attrs=attrs)
    return cache.read_attrs(path)["fingerprint"]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_non_finite_embeddings_are_failed_rows_not_done(tmp_path):
    path = tmp_path / "c.h5"
    writer = cache.PartWriter(path, fingerprint=_make(path))
    features = np.ones((4, DIM), np.float32)
    features[1, 2], features[3, 0] = np.nan, np.inf
    moved = writer.write(rows=[0, 1, 2, 3], features=features)
    assert moved == [(1, cache.store.NON_FINITE_REASON), (3, cache.store.NON_FINITE_REASON)]
    assert cache.merge_parts(path) == 4
    table = cache.read_table(path)
    assert table["done"][:4].tolist() == [True, False, True, False]
    assert table["error"][1] == table["error"][3] == cache.store.NON_FINITE_REASON
    assert find_problems(path) == []  # no done row holds NaN


def test_float16_overflow_at_merge_is_a_failed_row(tmp_path):
    path = tmp_path / "c.h5"
    writer = cache.PartWriter(path, fingerprint=_make(path, feature_dtype="float16"))
    features = np.ones((2, DIM), np.float32)
    features[1, 0] = 1e6  # finite in float32, inf once stored as float16
    assert writer.write(rows=[4, 5], features=features) == []
    cache.merge_parts(path)
    table = cache.read_table(path)
    assert table["done"][4] and not table["done"][5] and "not finite" in table["error"][5]
    assert find_problems(path) == []


def test_a_reason_that_is_not_utf8_is_stored_escaped_and_merges(tmp_path):
    path = tmp_path / "c.h5"
    fingerprint = _make(path)
    reason = os.fsdecode(b"/data/r\xe9sum\xe9/00000003_000.png") + ": cannot\0decode"  # surrogates, a NUL
    cache.PartWriter(path, fingerprint=fingerprint).write(rows=[], features=np.zeros((0, DIM)),
                                                           failed_rows=[3], failed_reasons=[reason])
    # The same text written straight into a part, as a writer that does not escape it would.
    with open(cache.store.parts_dir(path) / "old-writer-000000.npz", "wb") as handle:
        np.savez(handle, rows=np.zeros(0, np.int64), features=np.zeros((0, DIM), np.float32),
                 failed_rows=np.array([7]), failed_reasons=np.array([reason]), fingerprint=np.asarray(fingerprint))
    assert cache.merge_parts(path) == 2
    table = cache.read_table(path)
    assert table["error"][3] == table["error"][7] == "/data/r\\udce9sum\\udce9/00000003_000.png: cannot\\x00decode"
    assert find_problems(path) == []


def test_a_symlinked_cache_is_written_through_and_the_link_kept(tmp_path):
    real_dir, link_dir = tmp_path / "disk", tmp_path / "home"
    real_dir.mkdir(), link_dir.mkdir()
    real = real_dir / "features.h5"
    link = link_dir / "features.h5"
    link.symlink_to(real)  # dangling until the cache is created through it
    fingerprint = _make(link)
    assert link.is_symlink() and real.is_file()
    cache.PartWriter(link, fingerprint=fingerprint).write(rows=[0, 1], features=np.ones((2, DIM), np.float32))
    assert (real_dir / "features.h5.parts").is_dir() and not (link_dir / "features.h5.parts").exists()
    with cache.exclusive_lock(link):
        assert cache.merge_parts(link) == 2
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert cache.read_table(real)["done"][:2].all()
    assert not (link_dir / "features.h5.merging").exists() and not (link_dir / "features.h5.lock").exists()


_HOLD = """
import os, sys, time
import cache
with cache.exclusive_lock(sys.argv[1]):
    {inside}
    print("holding", flush=True)
    time.sleep(60)
"""


def _holder(path, inside="pass"):
    """A process that holds the writer lock of `path` and says so on stdout."""
    process = subprocess.Popen([sys.executable, "-c", _HOLD.format(inside=inside), str(path)], cwd=REPO,
                               stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    first = process.stdout.readline()
    return process, first


def test_two_aliases_of_one_cache_share_one_lock(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "link.h5").symlink_to(tmp_path / "real" / "c.h5")
    holder, line = _holder(tmp_path / "real" / "c.h5")
    try:
        assert line.strip() == "holding"
        for alias in (tmp_path / "link.h5", tmp_path / "alias" / "c.h5"):
            with pytest.raises(cache.CacheError, match=rf"another extract process \(pid {holder.pid}\) is writing"):
                with cache.exclusive_lock(alias):
                    pass
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_dies_with_its_owner_not_with_its_forked_workers(tmp_path):
    path = tmp_path / "c.h5"
    # The holder forks a child that outlives it, as DataLoader workers do.
    holder, line = _holder(path, inside="child = os.fork()\n    if child == 0: time.sleep(60); os._exit(0)\n    print(child, flush=True)")
    child = int(line)
    try:
        assert holder.stdout.readline().strip() == "holding"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the forked worker is still alive...
        with cache.exclusive_lock(path):  # ...and the lock is free at once
            pass
    finally:
        holder.kill()
        os.kill(child, signal.SIGKILL)


def test_a_nested_lock_in_one_process_is_refused_and_keeps_the_first(tmp_path):
    path = tmp_path / "c.h5"
    with cache.exclusive_lock(path):
        with pytest.raises(cache.CacheError, match="this process"):
            with cache.exclusive_lock(path):
                pass
        # POSIX locks drop when any descriptor of the file closes: the refusal must not do that.
        result = subprocess.run([sys.executable, "-c", f"import cache\nwith cache.exclusive_lock({str(path)!r}): pass"],
                                cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
        assert "another extract process" in result.stderr
    with cache.exclusive_lock(path):
        pass


_KILLED_MID_WRITE = """
import os, signal, sys
import numpy as np
import cache

def half_then_die(handle, **arrays):  # the writer is SIGKILLed halfway through a part
    handle.write(b"PK\\x03\\x04 half a part")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)

np.savez = half_then_die
writer = cache.PartWriter(sys.argv[1], fingerprint=sys.argv[2])
writer.write(rows=[0], features=np.ones((1, 4), np.float32))
"""


def test_a_temp_part_of_a_killed_writer_is_removed_and_nothing_else(tmp_path):
    path = tmp_path / "c.h5"
    fingerprint = _make(path)
    result = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(path), fingerprint], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == -signal.SIGKILL
    parts = cache.store.parts_dir(path)
    [dead] = list(parts.glob("*.tmp"))
    live_writer = cache.PartWriter(path, fingerprint=fingerprint)  # this process: alive
    live = parts / f"{live_writer.prefix}-000000.tmp"
    other_host = parts / f"r0-elsewhere.example-{os.getpid() + 1}-1-000000.tmp"
    users = parts / "notes.tmp"
    for keep in (live, other_host, users):
        keep.write_bytes(b"x")
    with cache.exclusive_lock(path):
        assert cache.merge_parts(path) == 0
    assert not dead.exists() and live.exists() and other_host.exists() and users.exists()


def _good_part(path, fingerprint, **override):
    arrays = dict(rows=np.array([0, 1]), features=np.ones((2, DIM), np.float32), failed_rows=np.zeros(0, np.int64),
                  failed_reasons=np.zeros(0, str), fingerprint=np.asarray(fingerprint))
    arrays.update(override)
    target = cache.store.parts_dir(path) / "r0-junk-000000.npz"
    target.parent.mkdir(exist_ok=True)
    with open(target, "wb") as handle:
        np.savez(handle, **{k: v for k, v in arrays.items() if v is not None})
    return target


JUNK = {
    "garbage bytes": lambda part: part.write_bytes(b"garbage"),
    "cut in half": lambda part: part.write_bytes(part.read_bytes()[: len(part.read_bytes()) // 2]),
    "empty file": lambda part: part.write_bytes(b""),
}
MALFORMED = {
    "a key missing": (dict(failed_reasons=None), "lacks ['failed_reasons']"),
    "rows beyond the cache": (dict(rows=np.array([0, N_ROWS])), f"row numbers outside 0..{N_ROWS - 1}"),
    "features of another width": (dict(features=np.ones((2, DIM + 1), np.float32)), "features (2, 5) float32, expected (2, 4)"),
    "pickled objects": (dict(rows=np.array([0, 1], dtype=object)), "unreadable"),
    "reasons not matching": (dict(failed_rows=np.array([2])), "failed_reasons do not match failed_rows"),
}


@pytest.mark.parametrize("junk", [*JUNK, *MALFORMED])
def test_a_damaged_part_is_one_line_naming_it_and_the_cache_is_untouched(tmp_path, junk):
    path = tmp_path / "c.h5"
    fingerprint = _make(path)
    cache.PartWriter(path, fingerprint=fingerprint).write(rows=[5], features=np.ones((1, DIM), np.float32))
    override, expected = MALFORMED.get(junk, ({}, "unreadable"))
    part = _good_part(path, fingerprint, **override)
    if junk in JUNK:
        JUNK[junk](part)
    before = _digest(path)
    with pytest.raises(cache.CacheError) as caught:
        with cache.exclusive_lock(path):
            cache.merge_parts(path)
    message = str(caught.value)
    assert str(part) in message and expected in message and "\n" not in message
    assert _digest(path) == before and not (tmp_path / "c.h5.merging").exists()
    if junk in JUNK:  # even counting pending rows names the file
        result = call_main("cache", "info", path)
        assert result.returncode == 2 and str(part) in result.stderr and result.stderr.count("\n") == 1


def test_fingerprint_is_sha256_of_the_documented_canonical_json(tmp_path):
    path = tmp_path / "c.h5"
    _make(path)
    attrs = cache.read_attrs(path)
    settings = {key: attrs[key] for key in cache.FINGERPRINT_KEYS}
    # cache/__init__.py: sha256 of json.dumps(settings over FINGERPRINT_KEYS, sort_keys=True)
    canonical = "{" + ", ".join(f'"{key}": {_json(settings[key])}' for key in sorted(settings)) + "}"
    assert attrs["fingerprint"] == hashlib.sha256(canonical.encode()).hexdigest()
    changed = set()
    for key in cache.FINGERPRINT_KEYS:
        value = settings[key]
        other = value + 1 if isinstance(value, int) else ({"y": 2} if isinstance(value, dict) else [*value, "x"] if isinstance(value, list) else value + "x")
        changed.add(cache.compute_fingerprint(dict(settings, **{key: other})))
    assert len(changed) == len(cache.FINGERPRINT_KEYS) and attrs["fingerprint"] not in changed


def _json(value):
    """JSON text as json.dumps writes it, spelled out here so that the test does not reuse it."""
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}": {_json(v)}' for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_json(v) for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else str(value)
