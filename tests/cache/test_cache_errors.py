"""Writing a cache in a hostile environment: one run at a time per directory (a lock that dies
with its process), --overwrite that removes only fastkd's files, integer labels only, ranks
that must agree, and a sentence (exit 1, or 130 for Ctrl-C; never a traceback; no half-written
files) for every user mistake or environment problem the CLI meets.

Disk-full and read-only conditions are simulated by patching the write path to raise the
``OSError`` the kernel would (``ENOSPC``, ``EROFS``); no disk is filled.
"""
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cache_helpers
from fastkd.cache import CacheError, CachedDataset, LogitCache, write_cache
from fastkd.cache import manifest as fmt
from fastkd.cli import main as fastkd_main
from paths import TESTS

TESTS_DIR = Path(TESTS)
SHARD_MB = str(16 * 20 / 2 ** 20)  # 16 rows of V=10 fp16 per shard


def cache_args(out, *extra, teacher="cache_helpers:digits_teacher",
               dataset="cache_helpers:indexed_images"):
    return ["cache", "--teacher", teacher, "--dataset", dataset, "--out", str(out),
            "--batch-size", "16", "--shard-size-mb", SHARD_MB, "--device", "cpu", "--quiet",
            *extra]


def fails_cleanly(capsys, argv, *messages, status=1) -> str:
    """The CLI exits ``status`` with one short message (no traceback) containing ``messages``."""
    assert fastkd_main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("fastkd: ") and err.count("\n") == 1, err
    for message in messages:
        assert message in err, err
    return err


def no_temp_files(directory: Path) -> bool:
    return not list(directory.glob("*" + fmt.TMP_SUFFIX))


def cache_files(directory: Path):
    return {path.name: path.read_bytes() for path in directory.iterdir()
            if path.name != fmt.MANIFEST_NAME}


# ----------------------------------------------------------------------------- locking
def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path, capsys):
    from fastkd.cache import outdir
    out = tmp_path / "c"
    data = cache_helpers.indexed_images()
    write_cache(cache_helpers.digits_teacher(), data, out, progress=False)
    before = cache_files(out)
    with outdir.DirectoryLock(str(out)):  # the "first run"
        holder = f"another writer in this process (pid {os.getpid()}) is writing to"
        with pytest.raises(CacheError, match=re.escape(holder)):
            write_cache(cache_helpers.digits_teacher(), data, out, progress=False)
        # with --overwrite and other settings: refused before anything is removed
        fails_cleanly(capsys, cache_args(out, "--overwrite", "--dtype", "fp32"), holder)
    assert cache_files(out) == before and LogitCache(out).manifest["dtype"] == "fp16"
    # released on a failure too: the next run takes the lock
    with pytest.raises(CacheError, match="different settings"):
        write_cache(cache_helpers.digits_teacher(), data, out, dtype="fp32", progress=False)
    outdir.DirectoryLock(str(out)).acquire().release()


HOLD_LOCK = ("import sys; from fastkd.cache import outdir; "
             "lock = outdir.DirectoryLock(sys.argv[-1]).acquire(); print('held', flush=True); "
             "sys.stdin.read()")


@pytest.mark.parametrize("argv, holder", [
    (["fastkd", "import"], "another `fastkd import` run"),
    (["fastkd", "cache"], "another `fastkd cache` run"),
    (["train.py"], "another process"),
])
def test_lock_message_names_the_other_runs_kind(tmp_path, argv, holder):
    """The refusal says which kind of run holds the lock (read from the holder's command line),
    with its pid."""
    out = tmp_path / "c"
    out.mkdir()
    first = subprocess.Popen([sys.executable, "-c", HOLD_LOCK] + argv + [str(out)],
                             cwd=TESTS_DIR, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        with pytest.raises(CacheError, match=re.escape(f"{holder} (pid {first.pid}) is writing")):
            write_cache(cache_helpers.digits_teacher(), cache_helpers.indexed_images(), out,
                        progress=False)
    finally:
        first.stdin.close()
        first.wait(timeout=60)


def test_lock_of_a_killed_run_is_not_stale(tmp_path):
    """A running CLI holds the lock (a second run fails); after kill -9 it is gone at once."""
    out = tmp_path / "c"
    argv = [sys.executable, "-m", "fastkd"] + cache_args(out, dataset="digits")
    first = subprocess.Popen(argv, cwd=TESTS_DIR, env={**os.environ, "FASTKD_TEST_SLEEP": "0.2"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / fmt.MANIFEST_NAME).exists() and time.monotonic() < deadline:
            assert first.poll() is None, first.stderr.read().decode()
            time.sleep(0.05)
        second = subprocess.run(argv, cwd=TESTS_DIR, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "another `fastkd cache` run" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    third = subprocess.run(argv, cwd=TESTS_DIR, capture_output=True, text=True, timeout=240)
    assert third.returncode == 0, third.stderr
    LogitCache(out).verify()


# ----------------------------------------------------------------------------- --overwrite
def test_overwrite_removes_only_what_the_cache_owns(tmp_path, capsys):
    out = tmp_path / "c"
    data = cache_helpers.indexed_images()
    write_cache(cache_helpers.digits_teacher(), data, out, shard_size_mb=float(SHARD_MB),
                progress=False)
    mine = {"shard-mine.npy": b"user data", "notes.txt": b"keep", "draft.tmp": b"keep too",
            "shard-000-000099.logits.npy": b"unlisted"}
    for name, content in mine.items():
        (out / name).write_bytes(content)
    write_cache(cache_helpers.digits_teacher(), data, out, dtype="fp32", overwrite=True,
                progress=False)
    for name, content in mine.items():
        assert (out / name).read_bytes() == content
    assert LogitCache(out).manifest["dtype"] == "fp32"


def test_overwrite_refuses_a_directory_that_is_not_a_cache(tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "shard-1.npy").write_bytes(b"not ours")
    (foreign / "labels.npy").write_bytes(b"not ours either")
    fails_cleanly(capsys, cache_args(foreign, "--overwrite"), "is not a fastkd cache")
    assert sorted(os.listdir(foreign)) == ["labels.npy", "shard-1.npy"]
    (foreign / fmt.MANIFEST_NAME).write_text("{broken")
    fails_cleanly(capsys, cache_args(foreign, "--overwrite"), "removes none")
    assert len(os.listdir(foreign)) == 3


# ----------------------------------------------------------------------------- labels
class FractionalLabels(torch.utils.data.Dataset):
    def __init__(self, label):
        self.label = label

    def __len__(self):
        return 40

    def __getitem__(self, index):
        return torch.full((1, 8, 8), float(index)), (self.label if index == 21 else index)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_non_integer_labels_are_refused(tmp_path, num_workers):
    with pytest.raises(ValueError, match="dataset item 21 has a bad label: label 7.7 is not an "
                                         "integer class id"):
        write_cache(cache_helpers.digits_teacher(), FractionalLabels(7.7), tmp_path / "c",
                    batch_size=16, num_workers=num_workers, progress=False)
    with pytest.raises(ValueError, match="dataset item 21 has a bad label"):
        write_cache(cache_helpers.digits_teacher(), FractionalLabels(float("nan")),
                    tmp_path / "d", batch_size=16, progress=False)
    write_cache(cache_helpers.digits_teacher(), FractionalLabels(np.float32(7.0)),
                tmp_path / "e", batch_size=16, progress=False)
    assert int(LogitCache(tmp_path / "e").labels[21]) == 7


# ----------------------------------------------------------------------------- torchrun ranks
@pytest.mark.parametrize("variables, message", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an int >= 1"),
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an int >= 0"),
    ({"RANK": "x"}, "RANK='x' is not an int >= 0"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 asks for several processes, but torch.distributed "
                          "could not start"),
])
def test_a_bad_torchrun_environment_is_one_sentence(tmp_path, capsys, monkeypatch, variables,
                                                    message):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    fails_cleanly(capsys, cache_args(tmp_path / "c"), message)
    assert not (tmp_path / "c").exists()


def test_torchrun_ranks_with_different_teachers_write_nothing(tmp_path):
    out = tmp_path / "c"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "fastkd"] + cache_args(out, teacher="cache_helpers:rank_dependent_teacher"),
        cwd=TESTS_DIR, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=240)
    assert result.returncode != 0
    assert "torchrun ranks disagree on the teacher weights" in result.stderr
    assert "nothing was written" in result.stderr
    assert not out.exists() or not os.listdir(out)


# ----------------------------------------------------------------------------- environment
def _fail_with(error_number, when):
    """A replacement for os.fsync raising ``error_number`` for files whose name passes
    ``when`` (the real fsync otherwise)."""
    real_fsync = os.fsync

    def fsync(fd):
        if when(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(error_number, os.strerror(error_number))
        return real_fsync(fd)
    return fsync


@pytest.mark.parametrize("where", ["shard", "manifest"])
def test_disk_full_stops_with_a_sentence_and_resumes(tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "c"
    write_cache(cache_helpers.digits_teacher(), cache_helpers.indexed_images(), tmp_path / "ref",
                batch_size=16, shard_size_mb=float(SHARD_MB), progress=False)
    written = []

    def full_after_two_shards(path):
        if path.endswith(fmt.TMP_SUFFIX) and (where in path or where == "shard" and
                                               ".npy" in path):
            written.append(path)
            return len(written) > 2
        return False
    monkeypatch.setattr(os, "fsync", _fail_with(errno.ENOSPC, full_after_two_shards))
    fails_cleanly(capsys, cache_args(out), "no space left on the device of --out",
                  "re-run the same command")
    monkeypatch.undo()
    assert no_temp_files(out)
    partial = fmt.read_manifest(str(out))  # the last good manifest, intact
    assert partial["status"] == "incomplete" and len(partial["shards"]) >= 1
    assert fastkd_main(cache_args(out)) == 0
    assert cache_files(out) == cache_files(tmp_path / "ref")


def test_disk_full_while_writing_the_final_manifest(tmp_path, capsys, monkeypatch):
    out = tmp_path / "c"
    real_replace = os.replace

    def replace(source, target):
        if os.path.basename(target) == fmt.MANIFEST_NAME and \
                '"status": "complete"' in Path(source).read_text():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source))
        return real_replace(source, target)
    monkeypatch.setattr(os, "replace", replace)
    fails_cleanly(capsys, cache_args(out), "no space left", fmt.MANIFEST_NAME + fmt.TMP_SUFFIX)
    monkeypatch.undo()
    assert no_temp_files(out) and fmt.read_manifest(str(out))["status"] == "incomplete"
    assert fastkd_main(cache_args(out)) == 0
    LogitCache(out).verify()


def test_read_only_or_unwritable_out(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path) == str(out)
                        else real_access(path, mode, **kw))
    fails_cleanly(capsys, cache_args(out), f"cannot write to --out {out}")
    monkeypatch.undo()
    # a file system that turns read-only partway (EROFS at the first write)
    monkeypatch.setattr(os, "fsync", _fail_with(errno.EROFS, lambda path: True))
    fails_cleanly(capsys, cache_args(out), f"cannot write to --out {out}", "Read-only file system")
    monkeypatch.undo()
    assert no_temp_files(out)


def test_an_empty_out_is_refused(tmp_path, capsys):
    fails_cleanly(capsys, cache_args(""), "--out is empty; give a directory path for the cache")


def test_out_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    fails_cleanly(capsys, cache_args(target), "exists and is not a directory")
    fails_cleanly(capsys, cache_args(target / "sub"), "a part of this path is a file")
    assert target.read_text() == "x"


@pytest.mark.parametrize("teacher, dataset, extra, message", [
    (None, "cache_helpers:unreadable", (), "dataset cache_helpers:unreadable raised OSError: "
     "[Errno 5] Input/output error reading sample "),
    (None, "cache_helpers:read_once", (), ("dataset cache_helpers:read_once raised KeyError: "
                                           "'item ", " read twice' reading samples ")),
    (None, "cache_helpers:read_once", ("--num-workers", "1"), (
        "dataset cache_helpers:read_once raised KeyError: 'item ", " read twice' reading "
        "samples ")),
    (None, "cache_helpers:raising_factory", (), "--dataset 'cache_helpers:raising_factory': "
     "calling it raised RuntimeError: cannot build it"),
    ("cache_helpers:raising_factory", None, (), "--teacher 'cache_helpers:raising_factory': "
     "calling it raised RuntimeError: cannot build it"),
    (None, "cache_helpers:no_images", (), "dataset cache_helpers:no_images has no samples"),
    (None, None, ("--batch-size", str(10 ** 20)), "batch_size (--batch-size) must be an int in "
     "[1, 2147483647], got 100000000000000000000"),
    (None, None, ("--num-workers", "300"), "num_workers (--num-workers) must be an int in "
     "[0, 256], got 300"),
])
@pytest.mark.parametrize("out_exists", [False, True])
def test_a_dataset_or_factory_that_raises_is_one_sentence(tmp_path, capsys, teacher, dataset,
                                                          extra, message, out_exists):
    """What the user's dataset or factory raises, and out-of-range sizes, end the run with one
    sentence naming the spec (and the samples); a --out this run made is not left behind, one
    that existed stays."""
    out = tmp_path / "c"
    if out_exists:
        out.mkdir()
    argv = cache_args(out, *extra, teacher=teacher or "cache_helpers:digits_teacher",
                      dataset=dataset or "cache_helpers:indexed_images")
    # (an --batch-size in extra comes after cache_args' own: argparse takes the last one)
    fails_cleanly(capsys, argv, *((message,) if isinstance(message, str) else message))
    assert out.exists() == out_exists
    if out_exists:
        assert list(out.iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (("--teacher-dtype", "bf16"), "--teacher-dtype applies to hf: teachers, not to --teacher "
                                  "cache_helpers:digits_teacher"),
    (("--data-root", "/data"), "--data-root applies to torchvision: datasets, not to --dataset "
                               "cache_helpers:indexed_images"),
    (("--data-split", "test"), "--data-split applies to torchvision: and hf-disk: datasets, not "
                               "to --dataset cache_helpers:indexed_images"),
])
def test_options_that_do_not_apply_are_refused_not_ignored(tmp_path, capsys, extra, message):
    fails_cleanly(capsys, cache_args(tmp_path / "c", *extra), message)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("spec, message", [
    ("hf:", "--teacher hf: needs the directory of a model saved with save_pretrained"),
    ("hf:{file}", "--teacher hf:{file}: a file; expected the directory of a model"),
])
def test_an_hf_teacher_that_is_not_a_directory(tmp_path, capsys, spec, message):
    pytest.importorskip("transformers")
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"x")
    fails_cleanly(capsys, cache_args(tmp_path / "c", teacher=spec.format(file=file)),
                  message.format(file=file))


def test_a_cache_of_another_teacher_names_only_what_differs(tmp_path, capsys):
    """Resuming into a cache of another teacher: the message lists the differing entries of the
    teacher's settings (its spec and fingerprint, cut short), not whole dictionaries."""
    assert fastkd_main(cache_args(tmp_path / "c")) == 0
    err = fails_cleanly(capsys, cache_args(tmp_path / "c", teacher="cache_helpers:DigitsMLP"),
                        "different settings (teacher.fingerprint: cache has '",
                        "teacher.spec: cache has 'cache_helpers:digits_teacher', asked "
                        "'cache_helpers:DigitsMLP'")
    assert "dataset" not in err and err.count("cache has") == 2 and "..." in err, err


def test_an_option_refused_at_the_first_batch_prints_no_progress_bar(tmp_path, capsys):
    """--top-k is checked against the teacher's first output; the error is the only output
    even with the progress bar on (the bar shows only after a delay)."""
    argv = cache_args(tmp_path / "c", "--top-k", "20")
    argv.remove("--quiet")
    fails_cleanly(capsys, argv, "top_k=20 exceeds the teacher's 10 classes")


@pytest.mark.parametrize("size", ["nan", "inf", "-1", "0"])
def test_shard_size_must_be_positive_and_finite(tmp_path, capsys, size):
    argv = cache_args(tmp_path / "c")
    argv[argv.index("--shard-size-mb") + 1] = size
    fails_cleanly(capsys, argv, "--shard-size-mb", "positive finite")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kind, message", [
    ("whole model", "holds pickled Python objects, not just tensors (probably torch.save(model))"),
    ("garbage", "is not a PyTorch checkpoint"),
    ("empty", "is not a PyTorch checkpoint"),
    ("training checkpoint", "expected a state dict (names -> tensors)"),
])
def test_checkpoint_that_is_not_a_state_dict(tmp_path, capsys, kind, message):
    path = tmp_path / "teacher.pt"
    teacher = cache_helpers.digits_teacher()
    if kind == "whole model":
        torch.save(teacher, path)
    elif kind == "garbage":
        path.write_bytes(os.urandom(3000))
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"epoch": 3, "model": teacher.state_dict()}, path)
    fails_cleanly(capsys, cache_args(tmp_path / "c", "--teacher-checkpoint", str(path)),
                  str(path), message)


def test_teacher_and_dataset_that_do_not_fit(tmp_path, capsys):
    err = fails_cleanly(capsys, cache_args(tmp_path / "c", dataset="cache_helpers:TokenSequences"),
                        "teacher cache_helpers:digits_teacher failed on dataset "
                        "cache_helpers:TokenSequences, batch of samples 0..15",
                        "belong together")
    assert "input_ids" in err


class PILImages(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        from PIL import Image
        return Image.new("L", (8, 8), color=index), index


@pytest.mark.parametrize("workers", ["0", "1"])
def test_pil_images_without_a_transform(tmp_path, capsys, workers):
    pytest.importorskip("PIL")
    fails_cleanly(capsys, cache_args(tmp_path / "c", "--num-workers", workers,
                                     dataset="test_cache_errors:PILImages"),
                  "dataset item 0 is a PIL image", "ToTensor()")


def test_dict_output_and_output_key(tmp_path, capsys):
    teacher = "cache_helpers:DictOutputTeacher"
    fails_cleanly(capsys, cache_args(tmp_path / "a", teacher=teacher),
                  "teacher returned a dict with keys ['features', 'scores']", "--output-key")
    fails_cleanly(capsys, cache_args(tmp_path / "b", "--output-key", "logits", teacher=teacher),
                  "--output-key 'logits'", "['features', 'scores']")
    assert fastkd_main(cache_args(tmp_path / "c", "--output-key", "scores", teacher=teacher)) == 0
    images = cache_helpers.indexed_images()
    expected = cache_helpers.DictOutputTeacher()(torch.stack([images[i][0] for i in range(100)]))
    torch.testing.assert_close(LogitCache(tmp_path / "c")[:].float(),
                               expected["scores"].detach(), rtol=2 ** -10, atol=1e-4)


def test_ctrl_c_prints_one_line_and_the_run_resumes(tmp_path):
    out = tmp_path / "c"
    argv = [sys.executable, "-m", "fastkd"] + cache_args(out, dataset="digits")
    # A test run started in the background by a non-interactive shell inherits SIGINT ignored,
    # and exec keeps an ignored signal ignored (so the CLI would never see Ctrl-C); a handled
    # one is reset to the default, which is what a terminal's foreground job has.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(argv, cwd=TESTS_DIR,
                                   env={**os.environ, "FASTKD_TEST_SLEEP": "0.2"},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 120
    while not (out / fmt.MANIFEST_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert err == "fastkd: interrupted; re-run the same command to resume\n"
    assert no_temp_files(out) and fmt.read_manifest(str(out))["status"] == "incomplete"
    resumed = subprocess.run(argv, cwd=TESTS_DIR, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    LogitCache(out).verify()


# ----------------------------------------------------------------------------- fingerprints
def test_random_augmentation_is_named_as_the_likely_cause(tmp_path, capsys):
    out = tmp_path / "c"
    write_cache(cache_helpers.digits_teacher(), cache_helpers.randomly_augmented(), out,
                progress=False)
    with pytest.raises(ValueError, match="random transforms .augmentation. in it are the likely"):
        CachedDataset(cache_helpers.randomly_augmented(), LogitCache(out))
    with pytest.raises(ValueError, match=r"fingerprint differs: other items or order\); pass"):
        CachedDataset(cache_helpers.indexed_images(), LogitCache(out))  # stable but different
    fails_cleanly(capsys, cache_args(out, dataset="cache_helpers:randomly_augmented"),
                  "different settings", "random transforms (augmentation)")
