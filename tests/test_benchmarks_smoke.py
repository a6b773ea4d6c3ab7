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
    # sparse teacher: student read + gradient written, K (value, int32 id) pairs and the lse
    assert LossCase(8, 100, "bf16", "bf16", teacher_k=4).bytes_moved == \
        8 * (100 * (2 + 2) + 4 * (2 + 4) + 4)
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
    with pytest.raises(ValueError, match="teacher_k"):
        LossCase(8, 100, teacher_k=101)


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
    sparse_providers = {"fastkd", "densify", "topk-eager", "topk-compile"}
    inplace_providers = {"fastkd", "densify"}   # the ones with a grad_inplace option
    assert {(r["case"]["id"], r["provider"]) for r in loss} == {
        (case.id, provider) for case in preset.loss_cases
        for provider in (inplace_providers if case.grad_inplace else
                         sparse_providers if case.teacher_k else providers_here)}
    assert all(r["check"]["ok"] and r["median_s"] > 0 and r["rounds"] >= 2 for r in loss)
    from fastkd.kernels import kd_loss_cpu, kd_sparse_cpu
    inplace_case = next(case for case in preset.loss_cases if case.grad_inplace)
    inplace = {r["provider"]: r for r in loss if r["case"]["id"] == inplace_case.id}
    measured = {(r["provider"], r["case"]["group"]): r for r in loss
                if "peak_extra_buffers" in r and r["case"]["id"] != inplace_case.id}
    assert set(measured) == {("eager", "sweep"), ("fastkd", "sparse"), ("densify", "sparse")}
    # with the gradient in the student's storage the fused sparse loss holds no logits-sized
    # buffer (only the C kernel's rows, or the PyTorch path's fp32 chunk); densify still holds
    # its dense fp32 teacher: two bf16 buffers
    from fastkd.reference_dense import CHUNK_ELEMENTS
    inplace_chunk = 0.0 if kd_sparse_cpu.available() else min(
        CHUNK_ELEMENTS // inplace_case.vocab, inplace_case.rows) * 4 * inplace_case.vocab \
        / inplace_case.logits_bytes
    assert inplace["fastkd"]["peak_extra_buffers"] < 0.5 + inplace_chunk, inplace["fastkd"]
    assert inplace["densify"]["peak_extra_buffers"] >= 2.0, inplace["densify"]
    # CPU peaks are torch's allocator peak plus the C kernels' own row buffers
    # (benchmarks/memory.py), each measured in a fresh process, so a provider is charged only the
    # kernels it calls: none for the eager composition, the sparse kernel's for fastkd's sparse
    # loss and the dense one's for densify (a few rows of V floats, one thread here)
    sparse_case = next(case for case in preset.loss_cases if case.teacher_k)
    work = {key: r["kernel_work_bytes"] for key, r in measured.items()}
    assert work["eager", "sweep"] == 0, work
    for key, kernel in ((("fastkd", "sparse"), kd_sparse_cpu),
                        (("densify", "sparse"), kd_loss_cpu)):
        if kernel.available():
            assert 0 < work[key] <= 8 * 4 * sparse_case.vocab, work
        else:
            assert work[key] == 0, work
    for key, r in measured.items():   # every case is 256 x 8192 fp32 fwd+bwd: the gradient counts
        assert r["peak_extra_bytes"] >= sparse_case.logits_bytes + work[key], (key, r)
    memory = {key: r["peak_extra_buffers"] for key, r in measured.items()}
    # the eager composition keeps several logits-sized temporaries alive (design notes: 5)
    assert 3.0 <= memory["eager", "sweep"] <= 8.0, memory
    # the fused sparse loss: the gradient and, on its PyTorch path (no C compiler), one fp32 chunk
    # buffer (a whole buffer at this small size); densify holds the dense teacher and the gradient
    # (the dense CPU kernel adds only row buffers), so beyond the chunk buffer, which does not
    # grow with N, the sparse loss is the smaller
    chunk_buffers = min(CHUNK_ELEMENTS // sparse_case.vocab, sparse_case.rows) * 4 \
        * sparse_case.vocab / sparse_case.logits_bytes
    assert memory["fastkd", "sparse"] <= 1.25 + chunk_buffers, memory
    assert memory["densify", "sparse"] >= 2.0, memory
    assert memory["fastkd", "sparse"] - chunk_buffers < memory["densify", "sparse"], memory

    cache = {r["metric"]: r for r in records if r.get("kind") == "cache"}
    assert set(cache) == {"write", "read_sequential", "read_gather", "train_cached",
                          "train_online", "bytes_dense", "bytes_top_k", "bytes_sample"}
    assert cache["write"]["bytes_written"] >= 64 * 10 * 2  # at least the fp16 logits
    assert cache["read_gather"]["bytes_read"] == 256 * 1000 * 2
    assert cache["train_online"]["teacher_to_student_cost"] > 0
    # V = 32000: top-32 rows 132 B (fp16 values, uint16 ids, fp32 lse); sample-32 rows 1 B of
    # row size, then 3 B (uint16 id, uint8 count) per distinct id: this flat random teacher
    # draws nearly 32 distinct ids of 32
    assert cache["bytes_top_k"]["teacher_bytes_per_token"] == 132
    assert 1 + 3 * 28 < cache["bytes_sample"]["teacher_bytes_per_token"] <= 1 + 3 * 32
    assert cache["bytes_dense"]["teacher_bytes_per_token"] == 64000
    assert 132 + 4 < cache["bytes_top_k"]["bytes_per_token"] < 64000 / 100

    goals = {g["goal"]: g for g in results["goals"]}
    assert any(name.startswith("cache write") for name in goals)
    startup = {r["metric"]: r for r in records if r.get("kind") == "startup"}
    assert set(startup) == {"first_call", "cli_help", "cli_argument_error"}  # syncs: CUDA only
    assert startup["cli_help"]["torch_imported"] is False
    assert startup["cli_argument_error"]["torch_imported"] is False
    assert startup["first_call"]["compiler_stack_imported"] is False
    assert goals["`fastkd --help` and argument errors without importing torch"]["status"] == "met"
    assert goals["cache bytes per token: top-32 at V=32000 (teacher arrays)"]["status"] == "met"
    markdown = written["markdown"].read_text()
    assert all(f"| {provider} |" in markdown for provider in providers_here | sparse_providers)
    assert goals["sparse top-8 256x8192 fp32: fastkd vs densify"]["status"] != "not measured"
    assert goals["sparse top-8 64x1000 bf16, gradient in place: fastkd vs densify"]["status"] \
        != "not measured"
    assert "fwd+bwd, grad in place" in markdown
    assert "## Goals" in markdown and "## Cache" in markdown and "WRONG" not in markdown


def test_gpu_info_from_nvml_without_a_gpu(monkeypatch):
    """The NVML path with a stand-in pynvml: H100 SXM figures give its 3.35 TB/s peak."""
    import types

    class NVMLError(Exception):
        pass

    calls = {}
    fake = types.SimpleNamespace(
        NVMLError=NVMLError, NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1, NVML_TEMPERATURE_GPU=0,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: b"550.54.15",
        nvmlDeviceGetHandleByPciBusId=lambda bus_id: calls.setdefault("bus_id", bus_id),
        nvmlDeviceGetHandleByIndex=lambda index: "by-index",
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(total=80 * 2**30),
        nvmlDeviceGetMaxClockInfo=lambda handle, kind: {0: 1980, 1: 2619}[kind],
        nvmlDeviceGetClockInfo=lambda handle, kind: 1755,
        nvmlDeviceGetMemoryBusWidth=lambda handle: 5120,
        nvmlDeviceGetPowerManagementLimit=lambda handle: 700000,
    )  # no nvmlDeviceGetTemperature: an older binding must not break the capture
    props = types.SimpleNamespace(total_memory=80 * 2**30, pci_domain_id=0, pci_bus_id=0x19,
                                  pci_device_id=0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
    info = bench_env.gpu_info()
    assert calls["bus_id"] == b"00000000:19:00.0"
    assert info["driver"] == "550.54.15" and info["power_limit_w"] == pytest.approx(700.0)
    assert info["peak_bandwidth_gbps"] == pytest.approx(2619e6 * 5120 / 8 * 2 / 1e9)  # 3352.3
    assert info["temperature_c"].startswith("unavailable")
    env = {"gpu": info, "bench_device": "cuda", "cpu_model": "x", "torch_threads": 1}
    assert bench_env.peak_bandwidth_gbps("cuda", env) == info["peak_bandwidth_gbps"]
    assert bench_env.device_slug(env) == "nvidia-h100-80gb-hbm3"


def test_goal_evaluation_says_met_or_by_how_much():
    from benchmarks.presets import CPU_TARGET, SMALL_V_TARGETS
    from benchmarks.report import evaluate_goals

    def record(provider, median_s, case=CPU_TARGET, **extra):
        return {"kind": "loss", "provider": provider, "case": case.as_dict(),
                "median_s": median_s, "min_s": median_s, **extra}

    small = SMALL_V_TARGETS[0]
    records = [record("fastkd", 0.25, peak_extra_buffers=1.04), record("eager", 1.0),
               record("compile", 0.125),
               record("fastkd", 1e-4, small), record("eager", 1.2e-4, small),
               record("compile", 0.9e-4, small),
               {"kind": "cache", "metric": "write", "overhead_pct": 7.5},
               {"kind": "startup", "metric": "first_call", "seconds": 0.05,
                "compiler_stack_imported": False},
               {"kind": "startup", "metric": "cli_help", "seconds": 0.04,
                "torch_imported": False},
               {"kind": "startup", "metric": "cli_argument_error", "seconds": 0.1,
                "torch_imported": False}]
    all_goals = {g["goal"]: g for g in evaluate_goals(records, "cpu")}
    goals = {name.split(": ", 1)[-1]: goal for name, goal in all_goals.items()
             if name.startswith("CPU 2048x32000") or not name.startswith("CPU")}
    assert goals["fastkd vs eager composition"]["status"] == "missed by 1.50x"  # 4x of 6x
    assert goals["fastkd vs torch.compile"]["status"] == "missed by 2.20x"   # 0.5x of 1.1x
    assert goals["fastkd extra peak memory"]["status"] == "met"
    label = f"CPU small V {small.rows}x{small.vocab} fp32 fwd+bwd"
    assert all_goals[f"{label}: fastkd vs eager composition"]["status"] == "missed by 1.25x"
    assert all_goals[f"{label}: fastkd vs torch.compile (no slower)"]["status"] == "missed by 1.11x"
    assert goals["first kd_loss call in a fresh process, beyond `import torch`"]["status"] == "met"
    assert goals["`fastkd --help` and argument errors without importing torch"]["status"] == "met"
    assert goals["added to the teacher's forward time"]["status"] == "missed by 2.50 percentage points"
    records[-1]["torch_imported"] = True  # an argument error that imports torch misses the goal
    cli_goal = {g["goal"]: g for g in evaluate_goals(records, "cpu")}[
        "`fastkd --help` and argument errors without importing torch"]
    assert cli_goal["status"] == "missed" and "argument error: torch imported" in cli_goal["measured"]
    assert goals["sequential slices"]["status"] == "not measured"
