"""`fastkd demo` through the real command line, in its shortened (--quick --epochs 1) mode."""
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
