"""`fastkd demo` through the real command line, in its shortened (--quick --epochs 1) mode."""
import contextlib
import errno
import json
import os
import re

import pytest
import torch

from fastkd import demo
from fastkd.cli import main


def test_demo_quick_runs_and_prints_the_table(tmp_path, capsys):
    status = main(["demo", "--epochs", "1", "--quick", "--quiet", "--device", "cpu",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    for line in ("teacher CNN", "student, from scratch", "student, distilled from the logit cache",
                 "teacher-logit cache:", "fastkd.kd_loss", "textbook eager", "speed-up",
                 "64 x 10 (this demo's batches)", "128 x 1024 (large vocabulary)"):
        assert line in out, f"missing {line!r} in:\n{out}"
    accuracies = [float(value) for value in re.findall(r"(\d+\.\d)%", out)]
    assert len(accuracies) == 3 and all(0.0 <= value <= 100.0 for value in accuracies)
    # the cache went through `fastkd cache` with the teacher checkpoint and the train split
    manifest = json.loads((tmp_path / "teacher-logits" / "manifest.json").read_text())
    assert manifest["teacher"]["spec"] == demo.TEACHER_SPEC
    assert manifest["dataset"]["spec"] == demo.DATASET_SPEC
    assert manifest["num_classes"] == 10 and manifest["dtype"] == "fp16"
    assert (tmp_path / "teacher.pt").is_file()
    cache_kib = float(re.search(r"(\d+\.\d) KiB on disk", out).group(1))
    on_disk = sum(path.stat().st_size for path in (tmp_path / "teacher-logits").iterdir())
    assert abs(cache_kib - on_disk / 1024) < 0.1


def test_demo_quick_results_and_rerun_into_same_directory(tmp_path):
    options = dict(epochs=1, device="cpu", out_dir=str(tmp_path), quick=True, progress=False)
    first = demo.run_demo(**options)
    second = demo.run_demo(**options)  # same out dir: the cache is rewritten, same figures
    assert first["train_size"] == second["train_size"] == 1347 // 4
    assert first["labelled"] == second["labelled"] >= 1
    for key in ("teacher_accuracy", "scratch_accuracy", "distilled_accuracy", "cache_rows"):
        assert first[key] == second[key], key  # deterministic with fixed seeds
    assert first["fused_seconds"] > 0 and first["textbook_seconds"] > 0
    assert [(entry["rows"], entry["vocab"]) for entry in first["throughput"]] == [
        (64, 10), (128, 1024)]


def test_throughput_lines_say_when_fastkd_is_slower():
    lines = demo.throughput_lines([
        {"label": "small", "rows": 64, "vocab": 10, "fused_seconds": 2e-4,
         "textbook_seconds": 1e-4},
        {"label": "large", "rows": 8, "vocab": 9, "fused_seconds": 1e-3,
         "textbook_seconds": 4e-3}])
    assert "0.50x  (fastkd is SLOWER here)" in lines[2]
    assert lines[3].endswith("4.00x")
    assert demo.throughput_lines([], "the compiled CPU kernel")[0].endswith(
        "calls (the compiled CPU kernel):")


def test_demo_names_the_loss_path():
    from fastkd.kernels import kd_loss_cpu
    path = demo.loss_path(torch.device("cpu"))
    assert path == ("the compiled CPU kernel" if kd_loss_cpu.available()
                    else f"PyTorch ops ({kd_loss_cpu.unavailable_reason()})")


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--label-fraction", "0"], "label_fraction must be in"),
])
def test_demo_bad_arguments(argv, message, tmp_path, capsys):
    status = main(["demo", "--quiet", "--out", str(tmp_path)] + argv)
    assert status == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_cuda_without_gpu_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--quiet", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_demo_leaves_thread_and_determinism_settings_alone(tmp_path):
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    demo.run_demo(epochs=1, device="cpu", out_dir=str(tmp_path), quick=True, progress=False)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert os.path.isdir(tmp_path / "teacher-logits")


# ----------------------------------------------------------------------------- errors
def fails_in_one_line(capsys, argv, *messages) -> str:
    """The CLI exits 1 with one ``fastkd: error:`` line (no traceback) containing ``messages``."""
    status = main(argv)
    err = capsys.readouterr().err
    assert status == 1, err
    assert "Traceback" not in err and err.startswith("fastkd: error: "), err
    assert err.count("\n") == 1, err
    for message in messages:
        assert message in err, err
    return err


def demo_args(out):
    return ["demo", "--quick", "--epochs", "1", "--quiet", "--device", "cpu", "--out", str(out)]


# each maker gets (tmp_path, monkeypatch) and returns the --out to give the demo
def _file(tmp_path, _):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file"


def _under_a_file(tmp_path, _):
    return _file(tmp_path, _) / "sub"


def _read_only(tmp_path, monkeypatch):
    """A directory the process may not write to (os.access says so: tests may run as root)."""
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path) == str(
        tmp_path / "ro") else real_access(path, mode, **kw))
    return tmp_path / "ro"


def _under_read_only(tmp_path, monkeypatch):
    """A new directory whose parent refuses it (EACCES from mkdir, as for a read-only parent)."""
    (tmp_path / "ro").mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(tmp_path / "ro"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)
    monkeypatch.setattr(os, "mkdir", mkdir)
    return tmp_path / "ro" / "out"


def _checkpoint_is_a_directory(tmp_path, _):
    (tmp_path / "out" / "teacher.pt").mkdir(parents=True)
    return tmp_path / "out"


def _partial_save_then_disk_full(tmp_path, monkeypatch):
    """torch.save writes part of the checkpoint, then the device is full."""
    def save(obj, target, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            handle = target if hasattr(target, "write") else stack.enter_context(
                open(target, "wb"))
            handle.write(b"PK\x03\x04 part of a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", save)
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


def _disk_full_at_fsync(tmp_path, monkeypatch):
    """The checkpoint's bytes are written, the device is full when they reach the disk."""
    real_fsync = os.fsync

    def fsync(fd):
        if "teacher.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


@pytest.mark.parametrize("make_out, messages", [
    (_file, ["exists and is not a directory"]),
    (_under_a_file, ["a part of this path is a file"]),
    (_read_only, ["cannot write to --out"]),
    (_under_read_only, ["cannot write to --out", "Permission denied"]),
    (_checkpoint_is_a_directory, ["teacher checkpoint", "teacher.pt", "is a directory"]),
    (_partial_save_then_disk_full, ["teacher checkpoint", "No space left on device"]),
    (_disk_full_at_fsync, ["teacher checkpoint", "No space left on device"]),
], ids=["out-is-a-file", "out-under-a-file", "out-read-only", "out-under-read-only",
        "checkpoint-is-a-directory", "disk-full-while-saving", "disk-full-at-fsync"])
def test_demo_out_that_cannot_be_written(tmp_path, capsys, monkeypatch, make_out, messages):
    out = make_out(tmp_path, monkeypatch)
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    fails_in_one_line(capsys, demo_args(out), str(out), *messages)
    monkeypatch.undo()
    # nothing half-written: no checkpoint (whole or partial), no temp file, no cache
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before
    if (tmp_path / "file").exists():
        assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("foreign, message", [
    ("directory", "holds files that are not a fastkd cache"),
    ("bad-manifest", "holds files that are not a fastkd cache"),
    ("file", "is in the way of the demo's teacher cache: it is not a directory"),
])
def test_demo_refuses_a_foreign_cache_folder_before_training(tmp_path, capsys, foreign, message):
    """A teacher-logits that `fastkd cache --overwrite` would refuse (other files, an unreadable
    manifest, a file) stops the demo in one line before it trains, and stays as it was."""
    cache_dir = tmp_path / "teacher-logits"
    if foreign == "file":
        cache_dir.write_text("mine")
    else:
        cache_dir.mkdir()
        name = "notes.txt" if foreign == "directory" else "manifest.json"
        (cache_dir / name).write_text("mine")
    err = fails_in_one_line(capsys, demo_args(tmp_path), str(cache_dir), message)
    assert "teacher:" not in err and not (tmp_path / "teacher.pt").exists()   # nothing trained
    if foreign == "file":
        assert cache_dir.read_text() == "mine"
    else:
        assert [path.read_text() for path in cache_dir.iterdir()] == ["mine"]
    assert not list(tmp_path.glob("*.tmp"))
