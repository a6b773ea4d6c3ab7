"""Smoke test of the benchmark suite (benchmarks/ is not collected by the normal test run).

Runs the ``smoke`` preset through pytest-benchmark in a subprocess (every loss provider that can
run here, the peak-memory probe, every cache metric), renders the results and checks what they
say; plus the byte-count formula and the environment capture in process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import env as bench_env  # noqa: E402
from benchmarks.presets import get_preset  # noqa: E402
from benchmarks.providers import LossCase, throughput_metrics  # noqa: E402
from benchmarks.report import write_results  # noqa: E402


def test_byte_count_formula():
    # forward+backward reads student + teacher once and writes the gradient once
    assert LossCase(8, 100, "fp32", "fp32", "fwd+bwd").bytes_moved == 8 * 100 * (4 + 4 + 4)
    assert LossCase(8, 100, "bf16", "fp16", "fwd+bwd").bytes_moved == 8 * 100 * (2 + 2 + 2)
    assert LossCase(8, 100, "bf16", "fp32", "fwd").bytes_moved == 8 * 100 * (2 + 4)
    metrics = throughput_metrics(LossCase(8, 100), median_s=1e-3, peak_gbps=2 * 9.6e-3)
    assert metrics["achieved_gbps"] == pytest.approx(9.6e-3)
    assert metrics["pct_of_peak"] == pytest.approx(50.0)
    assert metrics["rows_per_s"] == pytest.approx(8000.0)


def test_bad_case_is_rejected():
    with pytest.raises(ValueError, match="student_dtype"):
        LossCase(8, 100, "fp64")
    with pytest.raises(ValueError, match="mode"):
        LossCase(8, 100, mode="backward")
    with pytest.raises(ValueError, match="preset"):
        get_preset("huge")


def test_environment_capture():
    env = bench_env.capture_environment(measure_cpu_bandwidth=False)
    assert env["torch"] == torch.__version__ and env["cpu_count"] >= 1
    assert set(env["git"]) == {"commit", "dirty"}
    if not torch.cuda.is_available():
        assert env["gpu"] == {} and bench_env.device_slug(env).startswith("cpu-")
    copy = bench_env.measure_copy_bandwidth(megabytes=8, repeats=2)
    assert copy["peak_bandwidth_gbps"] >= copy["median_bandwidth_gbps"] > 0


def test_smoke_preset_end_to_end(tmp_path):
    raw = tmp_path / "pytest-benchmark.json"
    # one thread: on a loaded shared machine two OpenMP threads can be many times slower
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-p", "no:cacheprovider", "-q",
         "--preset=smoke", "--bench-device=cpu", f"--benchmark-json={raw}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    written = write_results(json.loads(raw.read_text()), tmp_path / "out")
    results = json.loads(written["json"].read_text())
    records = results["records"]

    loss = [r for r in records if r.get("kind") == "loss"]
    preset = get_preset("smoke")
    providers_here = {"fastkd", "eager", "compile"}  # liger needs CUDA
    assert {(r["case"]["id"], r["provider"]) for r in loss} == {
        (case.id, provider) for case in preset.loss_cases for provider in providers_here}
    assert all(r["check"]["ok"] and r["median_s"] > 0 and r["rounds"] >= 2 for r in loss)
    memory = {r["provider"]: r["peak_extra_buffers"] for r in loss if "peak_extra_buffers" in r}
    assert set(memory) == set(preset.memory_providers) == {"eager"}
    # the eager composition keeps several logits-sized temporaries alive (design notes: 5)
    assert 3.0 <= memory["eager"] <= 8.0, memory

    cache = {r["metric"]: r for r in records if r.get("kind") == "cache"}
    assert set(cache) == {"write", "read_sequential", "read_gather", "train_cached",
                          "train_online"}
    assert cache["write"]["bytes_written"] >= 64 * 10 * 2  # at least the fp16 logits
    assert cache["read_gather"]["bytes_read"] == 256 * 1000 * 2
    assert cache["train_online"]["teacher_to_student_cost"] > 0

    goals = {g["goal"]: g for g in results["goals"]}
    assert any(name.startswith("cache write") for name in goals)
    markdown = written["markdown"].read_text()
    assert all(f"| {provider} |" in markdown for provider in providers_here)
    assert "## Goals" in markdown and "## Cache" in markdown and "WRONG" not in markdown
