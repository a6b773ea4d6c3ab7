"""Cache runs in real processes: SIGKILL mid-run and resume (byte-identical result), and
``torchrun --nproc-per-node 2`` on the gloo backend (reads exactly like a single process).

Byte comparison: every shard, labels and offsets file must be identical. manifest.json must be
identical except ``created`` (the wall-clock time of the first run) and ``manifest_sha256``
(its checksum, which covers ``created``); those two fields are dropped before comparing.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastkd.cache import CacheError, LogitCache, write_cache
from fastkd.cache import manifest as fmt

import cache_helpers
from paths import TESTS

TESTS_DIR = Path(TESTS)
ROWS_PER_SHARD = 100
SHARD_MB = str(ROWS_PER_SHARD * 10 * 2 / 2 ** 20)  # V=10 fp16 rows
TIME_DIFFERING_FIELDS = ("created", "manifest_sha256")


def cache_argv(out, *extra):
    # batches of 64 do not line up with shards of 100 rows, so resume must restart mid-batch
    return [sys.executable, "-m", "fastkd", "cache", "--teacher", "cache_helpers:digits_teacher",
            "--dataset", "digits", "--out", str(out), "--batch-size", "64",
            "--shard-size-mb", SHARD_MB, "--device", "cpu", "--quiet", *extra]


def run(argv, **env):
    # tests/ is the current directory, so the teacher SPEC imports from it
    result = subprocess.run(argv, cwd=TESTS_DIR, env={**os.environ, **env}, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    return result


def comparable_manifest(directory):
    manifest = fmt.read_manifest(str(directory))
    return {key: value for key, value in manifest.items() if key not in TIME_DIFFERING_FIELDS}


def test_sigkill_then_resume_is_byte_identical(tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run(cache_argv(reference))

    process = subprocess.Popen(cache_argv(resumed), cwd=TESTS_DIR,
                               env={**os.environ, "FASTKD_TEST_SLEEP": "0.1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest_path = resumed / fmt.MANIFEST_NAME
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if manifest_path.exists() and len(fmt.read_manifest(str(resumed))["shards"]) >= 2:
                break
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    killed = fmt.read_manifest(str(resumed))
    assert killed["status"] == "incomplete" and 2 <= len(killed["shards"]) < 17
    with pytest.raises(CacheError, match="incomplete"):
        LogitCache(resumed)
    first_shard = resumed / killed["shards"][0]["files"]["logits"]["file"]
    first_inode = first_shard.stat().st_ino

    run(cache_argv(resumed))
    assert first_shard.stat().st_ino == first_inode  # resumed after it, not rewritten
    assert not list(resumed.glob("*" + fmt.TMP_SUFFIX))
    names = sorted(path.name for path in reference.iterdir())
    assert names == sorted(path.name for path in resumed.iterdir())
    assert len(names) == 2 * 18 + 1  # 18 shards x (logits, labels), manifest.json
    for name in names:
        if name != fmt.MANIFEST_NAME:
            assert (reference / name).read_bytes() == (resumed / name).read_bytes(), name
    assert comparable_manifest(reference) == comparable_manifest(resumed)
    LogitCache(resumed).verify()


def test_failure_midway_leaves_a_resumable_incomplete_cache(tmp_path):
    data, out = cache_helpers.indexed_images(), tmp_path / "c"
    with pytest.raises(ValueError, match="sample 37"):
        write_cache(cache_helpers.nan_teacher(), data, out, batch_size=8,
                    shard_size_mb=16 * 20 / 2 ** 20, progress=False)
    partial = fmt.read_manifest(str(out))
    assert partial["status"] == "incomplete"
    assert [shard["sample_stop"] for shard in partial["shards"]] == [16, 32]
    with pytest.raises(CacheError, match="incomplete"):
        LogitCache(out)


@pytest.mark.parametrize("field, value", [("rank", 1), ("rank", "0"),
                                          ("sample_range", [0, 50]), ("shard_rank", 1)])
def test_resume_refuses_another_ranks_progress(tmp_path, field, value):
    """A progress manifest whose rank, sample range or shards are not this rank's (edited, or
    another run's) is refused on resume: shard names and ranges follow from those fields."""
    data, out = cache_helpers.indexed_images(), tmp_path / "c"
    options = dict(batch_size=8, shard_size_mb=16 * 20 / 2 ** 20, progress=False)
    with pytest.raises(ValueError, match="sample 37"):
        write_cache(cache_helpers.nan_teacher(), data, out, **options)
    partial = fmt.read_manifest(str(out))
    if field == "shard_rank":
        partial["shards"][-1]["rank"] = value
    else:
        partial[field] = value
    fmt.write_manifest(str(out), partial)
    with pytest.raises(CacheError, match=r"not rank 0's progress over samples \[0, 100\)"):
        write_cache(cache_helpers.nan_teacher(), data, out, **options)


def test_torchrun_two_ranks_reads_like_one_process(tmp_path):
    single, ranked = tmp_path / "single", tmp_path / "ranked"
    # 1797 // 2 = 898 = 2 * 449: with batches of 449 both runs feed the teacher the same batches
    common = ["--teacher", "cache_helpers:digits_teacher", "--dataset", "digits",
              "--batch-size", "449", "--shard-size-mb", SHARD_MB, "--device", "cpu", "--quiet"]
    run([sys.executable, "-m", "fastkd", "cache", "--out", str(single), *common])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "fastkd", "cache", "--out", str(ranked), *common], OMP_NUM_THREADS="1")
    one, two = LogitCache(single), LogitCache(ranked)
    assert {shard["rank"] for shard in two.manifest["shards"]} == {0, 1}
    assert two.manifest["world_size"] == 2
    assert not list(ranked.glob("manifest.rank*"))
    assert (len(two), two.num_rows, two.num_classes) == (len(one), one.num_rows, one.num_classes)
    assert torch.equal(two[:], one[:]) and torch.equal(two.labels, one.labels)
    order = torch.randperm(len(one), generator=torch.Generator().manual_seed(0))
    assert torch.equal(two.gather(order), one.gather(order))
    two.verify()


def test_resume_after_a_crash_with_clamping_is_byte_identical(tmp_path):
    """In-process crash (an exception) partway; per-shard clamp counts must not double count."""
    data, shard_mb = cache_helpers.indexed_images(), 16 * 20 / 2 ** 20
    settings = dict(batch_size=12, shard_size_mb=shard_mb, clamp=True, progress=False)
    write_cache(cache_helpers.HugeLogits(), data, tmp_path / "reference", **settings)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_cache(cache_helpers.HugeLogits(fail_at=57), data, tmp_path / "resumed", **settings)
    assert len(fmt.read_manifest(str(tmp_path / "resumed"))["shards"]) == 3  # 48 of 57 items
    write_cache(cache_helpers.HugeLogits(), data, tmp_path / "resumed", **settings)
    reference, resumed = comparable_manifest(tmp_path / "reference"), \
        comparable_manifest(tmp_path / "resumed")
    assert resumed == reference
    assert reference["clamped_values"] == 100 * 4  # ±77778 and ±1e5 in every row
    for entry in fmt.manifest_files(reference):
        assert (tmp_path / "reference" / entry["file"]).read_bytes() == \
            (tmp_path / "resumed" / entry["file"]).read_bytes()


def test_torchrun_failure_on_one_rank_stops_every_rank(tmp_path):
    """Rank 0 meets the NaN at sample 37; rank 1 must not wait forever in a barrier."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "fastkd", "cache", "--teacher", "cache_helpers:nan_teacher", "--dataset",
         "cache_helpers:indexed_images", "--out", str(tmp_path / "c"), "--batch-size", "10",
         "--device", "cpu", "--quiet"],
        cwd=TESTS_DIR, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=120)
    assert result.returncode != 0
    assert "dataset sample 37 contains NaN" in result.stderr
    assert "failed on another rank: rank 0: ValueError" in result.stderr


def test_torchrun_rank_failing_before_the_fingerprint_exchange_stops_the_job(tmp_path):
    """Rank 1 cannot load its teacher, so it never reaches the fingerprint exchange that rank 0
    waits in: torchrun's agent stops rank 0 (no wait for torch.distributed's timeout), the job
    exits non-zero with rank 1's one-line reason, and nothing is written."""
    out = tmp_path / "c"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "fastkd", "cache", "--teacher", "cache_helpers:rank_one_cannot_load_teacher",
         "--dataset", "digits", "--out", str(out), "--batch-size", "449", "--device", "cpu",
         "--quiet"],
        cwd=TESTS_DIR, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - started < 90  # torch.distributed's own timeout is 30 minutes
    assert ("fastkd: error: --teacher 'cache_helpers:rank_one_cannot_load_teacher': calling it "
            "raised FileNotFoundError: [Errno 2] No such file or directory: "
            "'rank1-only-checkpoint.pt'") in result.stderr, result.stderr
    assert not out.exists() or not (out / "manifest.json").exists()
