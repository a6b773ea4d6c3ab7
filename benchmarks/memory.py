"""Peak extra memory of one loss call, in bytes and in logits-sized buffers.

"Extra" is the peak during one warm call (forward, or forward + backward including the gradient
left in ``student.grad``) minus what was allocated before it (the inputs).

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
- CPU: torch's CPU allocator peak during the call (the running sum of the allocations and frees
  its profiler records with ``profile_memory=True``) plus ``kernel_work_bytes``: the row buffers
  the compiled C kernels malloc inside the call, which torch never sees (their launchers'
  ``last_work_bytes()``). The C buffers are live while the call's own tensors (gradient, row
  losses) are allocated, so the sum is the peak, or slightly above it when torch's peak lies
  outside the kernel call: a conservative figure.

The launchers report their most recent call, so a loss call is measured in a fresh subprocess
(``python -m benchmarks.memory ...``) that builds the inputs, warms the provider up and measures
one more call: kernels the provider never calls report 0 there.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
from typing import Optional

import torch

from benchmarks.env import REPO_ROOT
from benchmarks.providers import (LossCase, make_inputs, make_provider, make_step,
                                  student_for_grad_inplace)
from fastkd.kernels import kd_loss_cpu, kd_sparse_cpu


def torch_cpu_peak(step) -> int:
    """Peak bytes torch's CPU allocator holds during one ``step()`` beyond what it held before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    # memory events in the order they were recorded (a stable sort keeps it for equal times)
    events = sorted((event for event in profiler.profiler.kineto_results.events()
                     if event.name() == "[memory]"
                     and event.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda event: event.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def kernel_work_bytes() -> int:
    """Bytes of the row buffers the compiled CPU kernels' most recent calls allocated (dense and
    sparse together; 0 for a kernel not called or not built)."""
    return kd_loss_cpu.last_work_bytes() + kd_sparse_cpu.last_work_bytes()


def cpu_step_peak(step):
    """(peak extra bytes, of which C kernel row buffers) of one CPU ``step()``: torch's allocator
    peak plus the kernels' buffers (see the module docstring)."""
    torch_peak = torch_cpu_peak(step)
    work = kernel_work_bytes()
    return torch_peak + work, work


def cuda_peak_extra(step, student) -> int:
    """Peak bytes allocated by one warm ``step()`` on CUDA beyond what was allocated before it."""
    step()
    student.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    return torch.cuda.max_memory_allocated() - before


def memory_metrics(extra_bytes: int, case, kernel_bytes: Optional[int] = None) -> dict:
    """The record's memory fields (``case``: anything with ``logits_bytes``); CPU records also
    carry ``kernel_work_bytes``, the C row buffers counted in ``extra_bytes``."""
    metrics = {"peak_extra_bytes": extra_bytes,
               "peak_extra_buffers": extra_bytes / case.logits_bytes}
    if kernel_bytes is not None:
        metrics["kernel_work_bytes"] = kernel_bytes
    return metrics


def cpu_peak_extra(provider: str, case: LossCase, *, compile_backend: str = "inductor",
                   timeout_s: float = 600) -> dict:
    """``memory_metrics`` of one warm CPU call, measured in a fresh Python process."""
    command = [sys.executable, "-m", "benchmarks.memory", "--provider", provider,
               "--compile-backend", compile_backend, "--case", json.dumps(case.as_dict())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed ({provider}, {case.id}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Peak extra CPU memory of one loss call "
                                                 "(run by benchmarks.memory.cpu_peak_extra).")
    parser.add_argument("--provider", required=True)
    parser.add_argument("--case", required=True, help="LossCase fields as JSON")
    parser.add_argument("--compile-backend", default="inductor")
    args = parser.parse_args(argv)
    fields = json.loads(args.case)
    case = LossCase(**{key: fields[key] for key in LossCase.__dataclass_fields__})
    student, teacher, labels = make_inputs(case, "cpu")
    if case.grad_inplace:
        student = student_for_grad_inplace(student)
    loss_fn = make_provider(args.provider, case, compile_backend=args.compile_backend)
    step = make_step(loss_fn, student, teacher, labels, case.mode, case.grad_inplace)
    step()  # warm-up: compilation, thread pools, lazy inits
    student.grad = None
    gc.collect()
    extra, work = cpu_step_peak(step)
    print(json.dumps(memory_metrics(extra, case, work)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
