"""A cache is untrusted input: hostile or damaged cache directories must fail with a sentence
naming the problem (CacheError from the library, exit 1 and no traceback from the CLI), never
read a file outside the directory, never unpickle, and never hand out memory that a later read
also returns.

Each test starts from a valid cache built by the factory below (once per module) and damages a
copy of it one way. Edits that keep the manifest's own checksum valid go through
``resign`` (the manifest checksum is not a signature: anyone can recompute it).
"""
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cache_helpers
from fastkd.cache import CacheError, CachedDataset, LogitCache, write_cache
from fastkd.cache import files
from fastkd.cache import manifest as fmt
from fastkd.cli import main as fastkd_main
from paths import TESTS

TESTS_DIR = Path(TESTS)


# ----------------------------------------------------------------------------- factory
@pytest.fixture(scope="module")
def valid_caches(tmp_path_factory):
    """``{"dense": dir, "variable": dir, "wide": dir}``: a dense cache of the 100
    IndexedImages items (7 shards of 16 rows, labels per sample), a variable-length token cache
    (labels and offsets per row) and a cache of 64 rows of width 4096 (256 KiB in 32 rows)."""
    root = tmp_path_factory.mktemp("valid")
    caches = {"dense": root / "dense", "variable": root / "variable", "wide": root / "wide"}
    write_cache(cache_helpers.digits_teacher(), cache_helpers.indexed_images(), caches["dense"],
                batch_size=32, shard_size_mb=16 * 20 / 2 ** 20, progress=False)
    write_cache(cache_helpers.tiny_lm(), cache_helpers.TokenSequences(12), caches["variable"],
                batch_size=4, shard_size_mb=40 * 80 / 2 ** 20, progress=False)
    torch.manual_seed(0)
    write_cache(torch.nn.Linear(8, 4096), torch.utils.data.TensorDataset(torch.randn(64, 8)),
                caches["wide"], batch_size=64, progress=False)
    return caches


@pytest.fixture
def copy_of(valid_caches, tmp_path):
    """``copy_of(kind)``: a fresh copy of a valid cache to damage, and its manifest."""
    def make(kind: str = "dense"):
        target = tmp_path / kind
        shutil.copytree(valid_caches[kind], target)
        return target, fmt.read_manifest(str(target))
    return make


def resign(directory: Path, manifest: dict) -> None:
    """Write ``manifest`` with a matching manifest_sha256 (what an attacker can always do)."""
    fmt.write_manifest(str(directory), manifest)


def first_logits(manifest: dict) -> dict:
    return manifest["shards"][0]["files"]["logits"]


def fails_everywhere(directory: Path, capsys, message: str) -> None:
    """Opening, verifying and `fastkd verify` all refuse the cache with ``message``."""
    with pytest.raises(CacheError, match=message):
        LogitCache(directory).verify()
    assert fastkd_main(["verify", str(directory)]) == 1
    captured = capsys.readouterr()
    assert "ok" not in captured.out and "Traceback" not in captured.err
    assert message.replace("\\", "") in captured.err or message in captured.err


# ----------------------------------------------------------------------------- paths outside
@pytest.mark.parametrize("name", ["../outside.npy", "/tmp/outside.npy", "sub/x.npy",
                                  ".hidden.npy", "..", "a\\b.npy"])
def test_file_names_must_be_plain_names_inside_the_cache(copy_of, capsys, name):
    directory, manifest = copy_of()
    # a perfect copy of the first shard outside the cache: same size and sha256
    outside = directory.parent / "outside.npy"
    shutil.copy(directory / first_logits(manifest)["file"], outside)
    first_logits(manifest)["file"] = name if not name.startswith("/tmp") else str(outside)
    resign(directory, manifest)
    fails_everywhere(directory, capsys, "is not a plain file name inside the cache directory")


def test_symlinked_shard_is_refused(copy_of, capsys):
    directory, manifest = copy_of()
    name = first_logits(manifest)["file"]
    outside = directory.parent / "elsewhere.npy"
    shutil.move(directory / name, outside)
    os.symlink(outside, directory / name)  # same bytes, but not the cache's own file
    fails_everywhere(directory, capsys, "is a symbolic link")


def test_symlinked_manifest_is_refused(copy_of, capsys):
    directory, _ = copy_of()
    outside = directory.parent / "manifest-elsewhere.json"
    shutil.move(directory / fmt.MANIFEST_NAME, outside)
    os.symlink(outside, directory / fmt.MANIFEST_NAME)
    fails_everywhere(directory, capsys, "symbolic links are refused")


# ----------------------------------------------------------------------------- manifest
@pytest.mark.parametrize("content, message", [
    (b"{not json", "is not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b'{"format": "fastkd-logit-cache", "x": "\xff\xfe"}', "is not valid JSON"),
    (b"[1, 2, 3]", "is not a fastkd-logit-cache manifest"),
    (b"", "is not valid JSON"),
], ids=["broken", "nested", "not-utf8", "not-an-object", "empty"])
def test_unparseable_manifest(copy_of, capsys, content, message):
    directory, _ = copy_of()
    (directory / fmt.MANIFEST_NAME).write_bytes(content)
    fails_everywhere(directory, capsys, message)
    assert fastkd_main(["info", str(directory)]) == 1
    assert message in capsys.readouterr().err


def _drop(key):
    def edit(manifest):
        del manifest[key]
    return edit


def _set(path, value):
    def edit(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_drop("shards"), "'shards' must be a list"),
    (_drop("status"), "status None"),
    (_drop("teacher"), "'teacher' must be an object"),
    (_set(["dtype"], "fp64"), "dtype 'fp64'"),
    (_set(["layout"], "sparse"), "layout 'sparse'"),
    (_set(["num_rows"], "100"), "'num_rows' must be an integer"),
    (_set(["num_classes"], -3), "'num_classes' must be null or an integer >= 1"),
    (_set(["top_k"], 5), "top_k 5 does not fit layout 'dense'"),
    (_set(["shards", 0, "files", "logits", "dtype"], "|O"), "dtype '|O'"),
    (_set(["shards", 0, "files", "logits", "dtype"], "<f4"), "dtype '<f4'"),
    (_set(["shards", 0, "files", "logits", "shape"], [16, 11]), r"shape \[16, 11\]"),
    (_set(["shards", 0, "files", "logits", "bytes"], -1), "'bytes' must be an integer"),
    (_set(["shards", 0, "files", "logits", "sha256"], "x" * 64), "'sha256' must be 64"),
    (_set(["shards", 0, "files", "logits"], "shard.npy"), "is not an object"),
    (_set(["shards", 0, "sample_stop"], 0), "empty or reversed range"),
    (_set(["shards", 1], None), "shard 1: is not an object"),
    (lambda manifest: manifest.update(labels=dict(manifest["shards"][0]["files"]["labels"],
                                                  dtype="<i8", shape=[100])),
     "'labels' must be present exactly"),
])
def test_manifest_fields_are_checked(copy_of, capsys, edit, message):
    directory, manifest = copy_of()
    edit(manifest)
    resign(directory, manifest)
    fails_everywhere(directory, capsys, message)


def test_same_file_listed_twice(copy_of, capsys):
    directory, manifest = copy_of()
    manifest["shards"][1]["files"]["labels"] = dict(manifest["shards"][0]["files"]["labels"])
    manifest["shards"][1]["files"]["labels"]["shape"] = \
        [manifest["shards"][1]["sample_stop"] - manifest["shards"][1]["sample_start"]]
    resign(directory, manifest)
    fails_everywhere(directory, capsys, "same file twice")


# ----------------------------------------------------------------------------- .npy files
class _CreatesAFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_npy_is_refused_and_never_unpickled(copy_of, tmp_path):
    directory, manifest = copy_of()
    marker = tmp_path / "unpickled"
    entry = first_logits(manifest)
    payload = np.empty(16, dtype=object)
    payload[0] = _CreatesAFileWhenUnpickled(str(marker))
    path = directory / entry["file"]
    np.save(path, payload, allow_pickle=True)
    entry.update(bytes=path.stat().st_size, sha256=fmt.file_sha256(str(path)))
    resign(directory, manifest)
    cache = LogitCache(directory)  # sizes and checksums agree with the re-signed manifest
    with pytest.raises(CacheError, match="holds Python objects"):
        cache.verify()   # the header check, after the checksums
    with pytest.raises(CacheError, match="holds Python objects"):
        cache[0]
    with pytest.raises(CacheError, match="holds Python objects"):
        cache.gather([1, 2])
    assert not marker.exists()
    assert pickle.dumps(0)  # (pickle itself works; the reader simply never calls it)


def test_npy_header_must_match_the_manifest(copy_of):
    directory, manifest = copy_of()
    entry = first_logits(manifest)
    path = directory / entry["file"]
    values = np.load(path, allow_pickle=False)
    np.save(path, np.asfortranarray(values.reshape(10, 16)).astype("<f2"), allow_pickle=False)
    entry.update(bytes=path.stat().st_size, sha256=fmt.file_sha256(str(path)))
    resign(directory, manifest)
    with pytest.raises(CacheError, match=r"holds <f2 \[10, 16\] \(Fortran order\)"):
        LogitCache(directory)[0]
    path.write_bytes(b"\x93NUMPY garbage" + bytes(entry["bytes"] - 14))
    with pytest.raises(CacheError, match="not a valid .npy file"):
        LogitCache(directory)[0]


def test_inconsistent_offsets_are_refused(copy_of):
    directory, manifest = copy_of("variable")
    path = directory / fmt.OFFSETS_NAME
    offsets = np.load(path, allow_pickle=False)
    offsets[3], offsets[4] = offsets[4], offsets[3]  # not increasing
    np.save(path, offsets, allow_pickle=False)
    manifest["offsets"].update(sha256=fmt.file_sha256(str(path)))
    resign(directory, manifest)
    cache = LogitCache(directory)
    for read in (lambda: cache[0], lambda: cache[0:2], lambda: cache.offsets):
        with pytest.raises(CacheError, match="row offsets are inconsistent"):
            read()
    # moving a sample's rows across a shard boundary is caught as well
    offsets = np.load(path, allow_pickle=False)
    offsets[3], offsets[4] = offsets[4], offsets[3]
    boundary = manifest["shards"][1]["sample_start"]
    offsets[boundary] += 1
    np.save(path, offsets, allow_pickle=False)
    manifest["offsets"].update(sha256=fmt.file_sha256(str(path)))
    resign(directory, manifest)
    with pytest.raises(CacheError, match="row offsets are inconsistent"):
        LogitCache(directory)[0]


# ----------------------------------------------------------------------------- returned tensors
def test_writing_into_returned_tensors_changes_no_later_read(valid_caches):
    for kind in ("dense", "wide"):
        cache = LogitCache(valid_caches[kind])
        expected = cache[:].clone()
        batch = cache[0:8]
        batch.div_(4)
        cache[3].numpy()[:] = 7  # through numpy, bypassing torch's version counter
        cache.gather([5, 1]).zero_()
        cache[:].fill_(1)
        for start in range(0, len(cache), 16):
            cache[start:start + 16].add_(3)
        assert torch.equal(cache[:], expected)
        assert torch.equal(cache[0:8], expected[0:8]) and torch.equal(cache[3], expected[3])
        assert torch.equal(LogitCache(valid_caches[kind])[:], expected)
    cache = LogitCache(valid_caches["dense"])
    labels = cache.labels.clone()
    cache.labels.zero_()
    cache.sample_labels(2).fill_(99)
    assert torch.equal(cache.labels, labels) and int(cache.sample_labels(2)) == int(labels[2])
    variable = LogitCache(valid_caches["variable"])
    offsets = variable.offsets.clone()
    variable.offsets.zero_()
    variable[0].zero_()
    assert torch.equal(variable.offsets, offsets) and variable[0].abs().sum() > 0
    item = CachedDataset(cache_helpers.indexed_images(), cache)[4]
    item[1].fill_(-1), item[2].fill_(-1)
    again = CachedDataset(cache_helpers.indexed_images(), cache)[4]
    assert int(again[1]) == 4 and torch.equal(again[2], cache[4])
    LogitCache(valid_caches["dense"]).verify()  # and the files never change


def test_reads_into_out(valid_caches, tmp_path):
    """rows(..., out=) and gather(..., out=) write a dense cache's rows into the caller's
    tensor (across shards too) and return it; later reads do not share its memory."""
    cache = LogitCache(valid_caches["dense"])   # 7 shards of 16 rows
    expected = cache[:].clone()
    out = torch.full((40, 10), 5.0, dtype=expected.dtype,
                     pin_memory=torch.cuda.is_available())
    assert cache.rows(10, 50, out=out) is out and torch.equal(out, expected[10:50])
    order = [99, 0, 17, 16, 50, 3] * 5 + [42] * 10
    assert cache.gather(order, out=out) is out and torch.equal(out, expected[order])
    strided = torch.zeros(10, 20, dtype=expected.dtype)[:, ::2]
    assert torch.equal(cache.gather(order[:10], out=strided), expected[order[:10]])
    out.zero_()
    assert torch.equal(cache[:], expected)
    variable = LogitCache(valid_caches["variable"])
    rows = variable[0:3]
    total = sum(len(sample) for sample in rows)
    buffer = torch.empty((total, variable.num_classes), dtype=rows[0].dtype)
    assert torch.equal(variable.rows(0, total, out=buffer), torch.cat(rows))
    with pytest.raises(ValueError, match="out= does not apply to gather"):
        variable.gather([0, 1], out=buffer)
    torch.manual_seed(0)
    write_cache(torch.nn.Linear(8, 12), torch.utils.data.TensorDataset(torch.randn(6, 8)),
                tmp_path / "bf16", dtype="bf16", progress=False)
    bf16 = LogitCache(tmp_path / "bf16")
    assert torch.equal(bf16.rows(1, 5, out=torch.empty(4, 12, dtype=torch.bfloat16)), bf16[1:5])


@pytest.mark.parametrize("out", [
    torch.empty(8, 10, dtype=torch.float32), torch.empty(8, 11, dtype=torch.float16),
    torch.empty(7, 10, dtype=torch.float16),
    torch.empty(8, 10, dtype=torch.float16, device="meta"), np.empty((8, 10), np.float16),
], ids=["dtype", "columns", "rows", "device", "numpy"])
def test_out_that_does_not_fit_is_refused_naming_it(valid_caches, out):
    cache = LogitCache(valid_caches["dense"])
    message = r"^out must be a CPU tensor of dtype torch.float16 and shape \(8, 10\) \(the rows read\); got "
    for read in (lambda: cache.rows(0, 8, out=out), lambda: cache.gather(range(8), out=out)):
        with pytest.raises(ValueError, match=message):
            read()


@pytest.mark.parametrize("out", [
    torch.zeros(1, 10, dtype=torch.float16).expand(8, 10),
    torch.zeros(8, 1, dtype=torch.float16).expand(8, 10),
], ids=["rows-expanded", "columns-expanded"])
def test_an_out_whose_elements_overlap_is_refused(valid_caches, out):
    """An expanded out would hold only the last row written (its rows share memory)."""
    cache = LogitCache(valid_caches["dense"])
    for read in (lambda: cache.rows(0, 8, out=out), lambda: cache.gather(range(8), out=out)):
        with pytest.raises(ValueError, match=r"out's elements overlap"):
            read()


def test_out_is_refused_for_sparse_caches(tmp_path):
    torch.manual_seed(0)
    write_cache(torch.nn.Linear(8, 12), torch.utils.data.TensorDataset(torch.randn(6, 8)),
                tmp_path / "topk", top_k=3, progress=False)
    cache = LogitCache(tmp_path / "topk")
    with pytest.raises(ValueError, match="out= applies to dense and feature caches; .* holds "
                                         "top-3 rows"):
        cache.rows(0, 2, out=torch.empty(2, 3))


READ_UNDER_LOW_FD_LIMIT = """
import resource, sys, torch
from fastkd.cache import LogitCache
resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
cache = LogitCache(sys.argv[1])
rows = [cache[i] for i in range(len(cache))]
assert torch.equal(torch.stack(rows), cache[:])
assert cache.gather(list(range(len(cache)))[::-1]).shape == (len(cache), 10)
assert int(cache.labels.sum()) == sum(range(len(cache)))
cache.verify()
print("read", len(cache.manifest["shards"]), "shards")
"""


def test_more_shards_than_open_file_limit(tmp_path):
    out = tmp_path / "many"
    write_cache(cache_helpers.digits_teacher(), cache_helpers.indexed_images(), out,
                batch_size=50, shard_size_mb=20 / 2 ** 20, progress=False)  # one row per shard
    assert len(fmt.read_manifest(str(out))["shards"]) == 100  # 200 files, limit 40
    result = subprocess.run([sys.executable, "-c", READ_UNDER_LOW_FD_LIMIT, str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "read 100 shards" in result.stdout


# ----------------------------------------------------------------------------- swapped after checks
def _swap_for_link(path: Path, target_bytes: bytes) -> None:
    """Replace ``path`` by a symbolic link to a file outside the cache holding ``target_bytes``."""
    outside = path.parent.parent / (path.name + ".outside")
    outside.write_bytes(target_bytes)
    os.remove(path)
    os.symlink(outside, path)


def _hostile_copy(path: Path) -> bytes:
    """Same size and header as the shard at ``path``, every data byte changed."""
    data = bytearray(path.read_bytes())
    with open(path, "rb") as handle:
        np.lib.format.read_magic(handle)
        np.lib.format.read_array_header_1_0(handle)
        offset = handle.tell()
    data[offset:] = bytes(b ^ 0x55 for b in data[offset:])
    return bytes(data)


def test_link_swapped_in_after_open_is_refused_by_the_next_map(copy_of):
    """A symbolic link put in a shard's place after the cache was opened (and its files checked
    and mapped) is never followed: reads go on from the map of the checked file, and a process
    that maps the shard afresh (a pickled cache, as in DataLoader workers) refuses the link."""
    directory, manifest = copy_of("wide")
    cache = LogitCache(directory)
    expected = cache[0:32]   # maps the shard (checks passed)
    shard = directory / first_logits(manifest)["file"]
    _swap_for_link(shard, _hostile_copy(shard))
    assert torch.equal(cache[0:32], expected) and torch.equal(cache.gather([3, 1]),
                                                              expected[[3, 1]])
    with pytest.raises(CacheError, match="is a symbolic link"):
        pickle.loads(pickle.dumps(cache))[0:32]


def test_link_swapped_in_between_header_check_and_map_is_not_followed(copy_of, monkeypatch):
    """The header is checked and the data mapped through one descriptor: a link swapped in
    between them changes nothing that is read."""
    directory, manifest = copy_of("wide")
    shard = directory / first_logits(manifest)["file"]
    expected = torch.from_numpy(np.load(shard).view(np.float16))
    real_check = files.read_array_header

    def check_then_swap(handle, path, entry):
        offset = real_check(handle, path, entry)
        if path == str(shard) and not os.path.islink(shard):
            _swap_for_link(shard, _hostile_copy(shard))
        return offset
    monkeypatch.setattr(files, "read_array_header", check_then_swap)
    cache = LogitCache(directory)
    assert torch.equal(cache[0:4], expected[0:4])   # from the map of the checked file
    assert os.path.islink(shard)
    with pytest.raises(CacheError, match="is a symbolic link"):
        pickle.loads(pickle.dumps(cache))[0:32]   # a fresh map opens the path again: refused


def test_file_replaced_after_open_is_refused(copy_of):
    """A regular file renamed over a shard after the cache mapped it is refused by the next
    fresh map (it is not the file that was checked) instead of being read; the map made before
    goes on reading the checked file."""
    directory, manifest = copy_of("wide")
    cache = LogitCache(directory)
    expected = cache[0:32]   # maps the shard
    shard = directory / first_logits(manifest)["file"]
    replacement = directory.parent / "replacement.npy"
    replacement.write_bytes(_hostile_copy(shard))
    os.replace(replacement, shard)
    with pytest.raises(CacheError, match="replaced since the cache was opened"):
        pickle.loads(pickle.dumps(cache))[0:32]
    assert torch.equal(cache[0:32], expected)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_fifo_swapped_in_after_the_size_check_is_refused_without_blocking(copy_of, monkeypatch):
    directory, manifest = copy_of("dense")
    shard = directory / first_logits(manifest)["file"]
    real_check = fmt.check_sizes

    def check_then_swap(*args):
        problems = real_check(*args)
        os.remove(shard)
        os.mkfifo(shard)   # opening it for reading would wait for a writer without O_NONBLOCK
        return problems
    monkeypatch.setattr(fmt, "check_sizes", check_then_swap)
    cache = LogitCache(directory)
    with pytest.raises(CacheError, match="not a regular file"):
        cache[0]


def test_verify_reports_a_link_swapped_in_after_the_size_check(copy_of, monkeypatch):
    """verify() checks each file's size (lstat), then hashes it: a link swapped in between is
    refused by the open (the open's own message, not the size check's)."""
    directory, manifest = copy_of("dense")
    cache = LogitCache(directory)   # opened before the swap
    shard = directory / first_logits(manifest)["file"]
    real_check = files._size_problem

    def check_then_swap(directory_, entry):
        problem = real_check(directory_, entry)
        if entry["file"] == shard.name:
            _swap_for_link(shard, shard.read_bytes())   # same bytes, but not the cache's file
        return problem
    monkeypatch.setattr(files, "_size_problem", check_then_swap)
    with pytest.raises(CacheError, match=r"logits.npy: is a symbolic link \(refused\)$"):
        cache.verify()
