"""``fastkd info`` and ``fastkd verify`` on edited caches whose manifest is re-signed (its
checksum recomputed, which anyone can do): a manifest without a field the code uses is refused
by every command with a sentence naming the field; one without a descriptive field still
prints; and ``verify`` refuses every file that reads would refuse (a ``.npy`` of another dtype,
shape or order than its manifest entry, Python objects, inconsistent row offsets), through the
readers' own checks.
"""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cache_helpers
import fastkd.cache.values
from fastkd.cache import CacheError, LogitCache, write_cache
from fastkd.cache import manifest as fmt
from fastkd.cli import main as fastkd_main
from paths import FIXTURES

# 16 rows of V = 10 in fp16 per shard, whatever the layout: several shards for 100 samples
SMALL_SHARDS_MB = 16 * 20 / 2 ** 20


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """``{kind: directory}``: dense, top-3 and sample-8 caches of the 100 IndexedImages items
    (several shards, labels per sample) and a top-4 cache of variable-length token rows
    (labels per row, lengths and offsets)."""
    root = tmp_path_factory.mktemp("inspect")
    teacher, images = cache_helpers.digits_teacher(), cache_helpers.indexed_images()
    made = {kind: root / kind for kind in ("dense", "topk", "sampled", "tokens")}
    for kind, options in (("dense", {}), ("topk", {"top_k": 3}), ("sampled", {"sample": 8})):
        write_cache(teacher, images, made[kind], batch_size=32, shard_size_mb=SMALL_SHARDS_MB,
                    progress=False, teacher_spec="cache_helpers:digits_teacher",
                    dataset_spec="cache_helpers:indexed_images", **options)
    write_cache(cache_helpers.tiny_lm(), cache_helpers.TokenSequences(12), made["tokens"],
                batch_size=4, shard_size_mb=40 * 80 / 2 ** 20, top_k=4, progress=False)
    return made


@pytest.fixture
def copy_of(caches, tmp_path):
    """``copy_of(kind)``: a fresh copy of a cache (or of a fixture under tests/fixtures) to
    edit, and its manifest as JSON."""
    def make(kind: str):
        source = caches[kind] if kind in caches else Path(FIXTURES) / kind
        target = tmp_path / kind
        shutil.copytree(source, target)
        return target, json.loads((target / fmt.MANIFEST_NAME).read_text())
    return make


def resign(directory: Path, manifest: dict) -> None:
    """Write ``manifest`` with a matching manifest_sha256."""
    fmt.write_manifest(str(directory), manifest)


def cli(capsys, *argv):
    """``(exit status, stdout, stderr)`` of ``fastkd argv``; a traceback fails the test."""
    status = fastkd_main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ----------------------------------------------------------------------------- manifest fields
def _drop(*path):
    def edit(manifest):
        for key in path[:-1]:
            manifest = manifest[key]
        del manifest[path[-1]]
    return edit


@pytest.mark.parametrize("edit, shown", [
    (_drop("created"), "created    unknown"),
    (_drop("fastkd_version"), "fastkd unknown)"),
    (_drop("teacher", "spec"), "teacher    DigitsMLP  (weights sha256"),
    (_drop("dataset", "spec"), "dataset    IndexedImages  (100 items"),
    (lambda manifest: (_drop("teacher", "spec")(manifest), _drop("teacher", "class")(manifest)),
     "teacher    unknown  (weights sha256"),
], ids=["created", "fastkd_version", "teacher-spec", "dataset-spec", "teacher-spec-and-class"])
def test_info_prints_a_cache_without_a_descriptive_field(copy_of, capsys, edit, shown):
    directory, manifest = copy_of("dense")
    edit(manifest)
    resign(directory, manifest)
    status, out, err = cli(capsys, "info", directory)
    assert status == 0 and shown in out and err == ""
    assert cli(capsys, "verify", directory)[0] == 0
    assert LogitCache(directory)[:].shape == (100, 10)


@pytest.mark.parametrize("kind, edit, message", [
    ("sampled", _drop("seed"), "seed missing; a sampled cache records the integer >= 0"),
    ("v2-sampled-tokens", lambda manifest: manifest.update(temperatures=None),
     "temperatures None; a sampled cache needs one target temperature"),
    ("dense", _drop("labels_per"), "labels_per missing; expected one of"),
    ("tokens", _drop("rows_per_sample"), "rows_per_sample missing; expected one of"),
    ("topk", _drop("num_classes"), "'num_classes' must be null or an integer >= 1 "
                                   r"\(found missing\)"),
    ("dense", lambda manifest: manifest.update(dtype=["fp16"]), r"dtype \['fp16'\]"),
    ("dense", lambda manifest: manifest.update(created={"at": 0}), "'created' {'at': 0}"),
    ("dense", lambda manifest: manifest["dataset"].update({"class": 7}), "dataset class 7"),
], ids=["no-seed", "v2-no-temperatures", "no-labels_per", "no-rows_per_sample",
        "no-num_classes", "unhashable-dtype", "created-not-a-string", "class-not-a-string"])
def test_a_used_field_missing_or_of_a_wrong_type_is_refused_by_every_command(
        copy_of, capsys, kind, edit, message):
    directory, manifest = copy_of(kind)
    edit(manifest)
    resign(directory, manifest)
    for command in ("info", "verify"):
        status, out, err = cli(capsys, command, directory)
        assert status == 1 and out == "", (command, out, err)
        assert err.startswith(f"fastkd: error: {directory / fmt.MANIFEST_NAME}: ")
        assert len(err.splitlines()) == 1 and re.search(message, err)
    with pytest.raises(CacheError, match=message):
        LogitCache(directory)


def test_info_of_an_incomplete_sparse_cache_before_its_first_shard(copy_of, capsys):
    """V is unknown until the first shard: info says what it can instead of failing."""
    directory, manifest = copy_of("topk")
    for key in ("num_samples", "num_rows", "offsets", "labels", "clamped_values"):
        manifest.pop(key)
    manifest.update(status="incomplete", rank=0, sample_range=[0, 100], shards=[],
                    num_classes=None, rows_per_sample=None, labels_per=None,
                    rows_per_shard=None)
    resign(directory, manifest)
    status, out, err = cli(capsys, "info", directory)
    assert status == 0 and err == ""
    assert "0 of 100 samples cached so far" in out and "top-3, V=None" in out
    status, _, err = cli(capsys, "verify", directory)
    assert status == 1 and "the cache is incomplete" in err


# ----------------------------------------------------------------------------- files vs manifest
def _rewrite(directory: Path, entry: dict, array) -> None:
    """Replace the listed file of ``entry`` by ``array`` and update its size and sha256 in the
    (caller's) manifest: the checksums then match."""
    path = directory / entry["file"]
    np.save(path, array, allow_pickle=True)
    entry.update(bytes=path.stat().st_size, sha256=fmt.file_sha256(str(path)))


def _objects(array):
    objects = np.empty(len(array), dtype=object)
    objects[:] = list(range(len(array)))
    return objects


def _swap(offsets):
    offsets = offsets.copy()
    offsets[3], offsets[4] = offsets[4], offsets[3]
    return offsets


def _negative(offsets):
    offsets = offsets.copy()
    offsets[2] = -1
    return offsets


def _read_everything(directory: Path) -> None:
    cache = LogitCache(directory)
    rows = [cache[i] for i in range(len(cache))] if cache.variable else cache[:]
    assert rows is not None
    cache.labels, cache.offsets


@pytest.mark.parametrize("kind, array, change, message", [
    ("dense", "logits", np.asfortranarray,
     r"logits\.npy: holds <f2 \[16, 10\] \(Fortran order\), manifest says <f2 \[16, 10\]"),
    ("dense", "logits", lambda a: a.astype("<f4"), r"holds <f4 \[16, 10\], manifest says <f2"),
    ("dense", "labels", lambda a: a.astype("<i8"), r"labels\.npy: holds <i8 \[16\], manifest says"),
    ("dense", "labels", _objects, "holds Python objects"),
    ("topk", "indices", lambda a: a.astype("<i8"), r"holds <i8 \[\d+, 3\], manifest says <u2"),
    ("topk", "values", lambda a: a.reshape(-1), r"holds <f2 \[\d+\], manifest says <f2 \[\d+, 3\]"),
    ("topk", "values", np.asfortranarray, r"\(Fortran order\)"),
    ("topk", "lse", lambda a: a.astype("<f8"), r"lse\.npy: holds <f8 \[\d+, 1\]"),
    ("tokens", "indices", lambda a: a.astype("<i4"), "manifest says <u2"),
    ("tokens", "offsets", _swap, "row offsets are inconsistent"),
    ("tokens", "offsets", _negative, "row offsets are inconsistent"),
    ("tokens", "offsets", lambda a: a.astype("<i4"), r"offsets\.npy: holds <i4"),
], ids=["dense-fortran", "dense-dtype", "labels-dtype", "labels-objects", "topk-ids-dtype",
        "topk-values-shape", "topk-values-fortran", "topk-lse-dtype", "tokens-ids-dtype",
        "offsets-decreasing", "offsets-negative", "offsets-dtype"])
def test_verify_refuses_what_reads_refuse(copy_of, capsys, kind, array, change, message):
    directory, manifest = copy_of(kind)
    if array == "offsets":
        entry = manifest["offsets"]
    else:
        entry = manifest["shards"][1 if len(manifest["shards"]) > 1 else 0]["files"][array]
    _rewrite(directory, entry, change(np.load(directory / entry["file"])))
    resign(directory, manifest)
    with pytest.raises(CacheError, match=message):   # what the readers say
        _read_everything(directory)
    with pytest.raises(CacheError, match=message):
        LogitCache(directory).verify()
    status, out, err = cli(capsys, "verify", directory)
    assert status == 1 and out == "" and len(err.splitlines()) == 1
    assert err.startswith("fastkd: error: ") and re.search(message, err)


def test_verify_checks_the_files_reads_never_open(copy_of, capsys):
    """A shard's ``lengths`` (reads use offsets.npy) must match its manifest entry as well."""
    directory, manifest = copy_of("tokens")
    entry = manifest["shards"][0]["files"]["lengths"]
    _rewrite(directory, entry, np.load(directory / entry["file"]).astype("<i4"))
    resign(directory, manifest)
    status, out, err = cli(capsys, "verify", directory)
    assert status == 1 and f"{entry['file']}: holds <i4" in err and out == ""


@pytest.mark.parametrize("kind", ["dense", "topk", "sampled", "tokens", "v1-dense-digits",
                                  "v1-topk-tokens", "v2-sampled-tokens"])
def test_valid_caches_verify_and_print(copy_of, capsys, kind):
    directory, _ = copy_of(kind)
    status, out, err = cli(capsys, "verify", directory)
    assert status == 0 and out.startswith(f"ok: {directory}: ") and err == ""
    status, out, err = cli(capsys, "info", directory)
    assert status == 0 and "unknown" not in out and err == ""


# ----------------------------------------------------------------------------- values
def _set(position, value):
    def change(array):
        array = array.copy()
        array[position] = value
        return array
    return change


@pytest.mark.parametrize("kind, array, change, message", [
    ("topk", "indices", _set((2, 1), 10), r"rows \d+\.\.\d+: teacher indices must be class ids "
                                          r"in \[0, 10\); found 10"),
    ("topk", "indices", lambda a: np.repeat(a[:, :1], 3, axis=1), "found an id twice"),
    ("topk", "values", _set((2, 0), np.nan), "teacher values contain NaN"),
    ("topk", "values", _set((2, 1), np.inf), r"teacher values contain NaN or \+inf"),
    ("topk", "lse", _set((2, 0), -30.0), r"sum to .* more than 1"),
    ("dense", "logits", _set((3, 4), np.inf), "teacher rows contain NaN or \\+inf"),
    ("tokens", "labels", _set(1, 10 ** 6), r"rows 0\.\.\d+: labels must be in \[0, 40\)"),
], ids=["topk-id-range", "topk-duplicate-ids", "topk-nan-values", "topk-inf-values",
        "topk-mass", "dense-inf", "tokens-label-range"])
def test_verify_refuses_values_the_losses_refuse(copy_of, capsys, kind, array, change, message):
    """Re-signed rows that read but that a loss would refuse at training time: verify says so
    first, naming the rows (the losses' own checks, fastkd.checks.check_sparse_values)."""
    directory, manifest = copy_of(kind)
    entry = manifest["shards"][0]["files"][array]
    _rewrite(directory, entry, change(np.load(directory / entry["file"])))
    resign(directory, manifest)
    _read_everything(directory)   # reads take the rows as they are
    with pytest.raises(CacheError, match=message):
        LogitCache(directory).verify()
    status, out, err = cli(capsys, "verify", directory)
    assert status == 1 and out == "" and len(err.splitlines()) == 1 and re.search(message, err)


def test_verify_reads_per_row_labels_a_block_at_a_time(caches, monkeypatch, tmp_path):
    """row_labels(start, stop) is labels[start:stop] across shard boundaries, and verify checks
    next-token labels through it, a block at a time, never joining every row's labels."""
    write_cache(cache_helpers.tiny_lm(), cache_helpers.TokenSequences(12), tmp_path / "t",
                batch_size=4, shard_size_mb=500 / 2 ** 20, top_k=4, progress=False)
    cache = LogitCache(tmp_path / "t")
    labels, num_rows = cache.labels, cache.num_rows
    assert len(cache.manifest["shards"]) > 2
    for start, stop in ((0, num_rows), (3, num_rows - 2), (5, 5), (num_rows, num_rows)):
        assert torch.equal(cache.row_labels(start, stop), labels[start:stop])
    with pytest.raises(IndexError, match="outside"):
        cache.row_labels(0, num_rows + 1)
    assert LogitCache(caches["topk"]).row_labels(0, 1) is None   # per-sample labels
    monkeypatch.setattr(fastkd.cache.values, "BLOCK_ELEMENTS", 7)   # blocks straddle shards
    monkeypatch.setattr(LogitCache, "labels",
                        property(lambda self: pytest.fail("verify joined every row's labels")))
    LogitCache(tmp_path / "t").verify()
