"""A LogitCache keeps reading the cache it opened or fails: once the directory under it is
rewritten (``fastkd cache --overwrite``, the writer API) or a file in it replaced or edited,
every read raises a CacheError saying so and none returns the new teacher's rows (shards are
mapped lazily, by name, so without the checks the unmapped ones would be the new teacher's).

Teachers A and B are the digits MLP untrained and briefly trained: the same shapes, other rows.
"""
import os
import pickle
import shutil

import pytest
import torch

import cache_helpers
from fastkd.cache import CacheError, CachedDataset, LogitCache, write_cache
from fastkd.cache import manifest as fmt
from fastkd.cli import main as fastkd_main
from fastkd.models import digits_dataset

SHARD_MB = 300 * 20 / 2 ** 20   # 300 fp16 rows of V = 10 per shard: 6 shards for the digits
CHANGED = "cache changed on disk since it was opened"


def cli_cache(out, teacher_spec, *extra):
    assert fastkd_main(["cache", "--teacher", teacher_spec, "--dataset", "digits", "--out",
                        str(out), "--device", "cpu", "--shard-size-mb", str(SHARD_MB),
                        "--quiet", *extra]) == 0


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory):
    """Cache directories of teacher A and of teacher B (same data, shapes and shards)."""
    root = tmp_path_factory.mktemp("teachers")
    cli_cache(root / "a", "cache_helpers:digits_teacher")
    cli_cache(root / "b", "cache_helpers:trained_digits_teacher")
    rows_a, rows_b = LogitCache(root / "a")[:], LogitCache(root / "b")[:]
    assert rows_a.shape == rows_b.shape and not torch.equal(rows_a, rows_b)
    return root / "a", root / "b", rows_a


def copy_cache(source, target):
    shutil.copytree(source, target)
    return target


def reads(cache):
    """Every way of reading rows and labels, and verify (shard 0 is mapped already; the others
    not)."""
    return {"slice in shard 0": lambda: cache[0:5], "row in the last shard": lambda: cache[-1],
            "slice across shards": lambda: cache[250:350],
            "gather": lambda: cache.gather([3, 1700]),
            "labels": lambda: cache.labels, "sample labels": lambda: cache.sample_labels(1000),
            "verify": cache.verify}


def test_cli_overwrite_under_an_open_cache_fails_every_read(two_teachers, tmp_path):
    _, _, rows_a = two_teachers
    out = copy_cache(two_teachers[0], tmp_path / "cache")
    cache = LogitCache(out)
    assert torch.equal(cache[0:5], rows_a[0:5])   # maps shard 0
    cli_cache(out, "cache_helpers:trained_digits_teacher", "--overwrite")
    for what, read in reads(cache).items():
        with pytest.raises(CacheError, match=CHANGED):
            read()
    # opened again, the cache is teacher B's
    assert not torch.equal(LogitCache(out)[:], rows_a)


def test_writer_overwrite_fails_pickled_caches_and_dataloader_workers(two_teachers, tmp_path):
    """A cache pickled before the rewrite (what DataLoader workers get) checks against what it
    was opened with, in the worker too."""
    out = copy_cache(two_teachers[0], tmp_path / "cache")
    cache = LogitCache(out)
    cache[0]
    pickled = pickle.dumps(cache)
    data = digits_dataset()
    loader = torch.utils.data.DataLoader(CachedDataset(data, cache), batch_size=600,
                                         num_workers=1, multiprocessing_context="fork")
    write_cache(cache_helpers.trained_digits_teacher(), data, out, overwrite=True,
                shard_size_mb=SHARD_MB, progress=False)
    with pytest.raises(CacheError, match=CHANGED):
        pickle.loads(pickled)[1000]
    with pytest.raises(CacheError, match=CHANGED):
        next(iter(loader))


def test_a_replaced_shard_is_refused_even_with_the_manifest_unchanged(two_teachers, tmp_path):
    """A shard file renamed over (teacher B's file: same name, header and size) is not mapped;
    rows already mapped keep being the opened cache's."""
    source_b, _, rows_a = two_teachers[1], None, two_teachers[2]
    out = copy_cache(two_teachers[0], tmp_path / "cache")
    cache = LogitCache(out)
    assert torch.equal(cache[0:5], rows_a[0:5])
    name = cache.manifest["shards"][3]["files"]["logits"]["file"]
    shutil.copyfile(source_b / name, tmp_path / "swap.npy")
    os.replace(tmp_path / "swap.npy", out / name)
    with pytest.raises(CacheError, match=f"{name}: replaced since the cache was opened"):
        cache[1000]
    with pytest.raises(CacheError, match="replaced since the cache was opened"):
        cache.gather([0, 1000])
    assert torch.equal(cache[0:5], rows_a[0:5])


def test_a_shard_edited_in_place_is_refused(two_teachers, tmp_path):
    """Same file (inode), same size, other bytes: its modification time tells it apart."""
    out = copy_cache(two_teachers[0], tmp_path / "cache")
    cache = LogitCache(out)
    cache[0]
    entry = cache.manifest["shards"][2]["files"]["logits"]
    path = out / entry["file"]
    before = os.stat(path)
    with open(path, "r+b") as handle:
        handle.seek(entry["bytes"] - 2)
        handle.write(b"\x00\x7c")   # fp16 +inf in the last logit
    # a later write time, as any edit after the cache was written has (set explicitly, so a
    # coarse file system clock cannot hide it)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10 ** 9))
    after = os.stat(path)
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    with pytest.raises(CacheError, match="replaced since the cache was opened"):
        cache[700]


def test_reads_go_on_while_the_cache_is_unchanged(two_teachers, tmp_path):
    """Metadata changes (permissions) and other files in the directory are not a rewrite."""
    _, _, rows_a = two_teachers
    out = copy_cache(two_teachers[0], tmp_path / "cache")
    cache = LogitCache(out)
    cache[0]
    for entry in fmt.manifest_files(cache.manifest):
        os.chmod(out / entry["file"], 0o444)
    (out / "notes.txt").write_text("not part of the cache")
    assert torch.equal(cache[:], rows_a) and torch.equal(pickle.loads(pickle.dumps(cache))[:],
                                                         rows_a)
