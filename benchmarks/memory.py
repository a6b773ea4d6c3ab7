"""Peak extra memory of one loss call, in bytes and in logits-sized buffers.

"Extra" is the peak during one warm call (forward, or forward + backward including the gradient
left in ``student.grad``) minus what was allocated before it (the inputs).

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, in process.
- CPU: a fresh subprocess (``python -m benchmarks.memory ...``) builds the inputs and warms the
  provider up (compilation included), then measures two more calls two ways:

  1. **Resident memory** (``peak_extra_bytes``, the headline: everything the process touched,
     torch's or not). fastkd's kept CPU work buffers are released first, so they are counted;
     freed memory goes back to the OS (``malloc_trim``; glibc is told to mmap every block above
     128 KiB so that frees really unmap); the kernel's resident-set high-water mark is reset
     (``/proc/self/clear_refs``); one call; ``VmHWM - VmRSS``.
  2. **torch's CPU allocator** (``peak_extra_torch_bytes``): the peak of the running sum of the
     allocations and frees that torch's profiler records (``profile_memory=True``) during one
     call. Exact, but blind to memory torch does not allocate (Python objects, library scratch).

  The high-water mark has a resolution (``rss_resolution_bytes``): Linux (6.2 on) updates it from
  per-CPU batched counters, and each of the three resident-set counters (anonymous, file, shmem)
  can hold up to ``max(32, 2 * CPUs)`` pages per CPU not yet folded into the total it reads. On
  2 CPUs that is 768 KiB, 9% of a 256 x 8192 fp32 buffer and 0.3% of a 2048 x 32000 one, so the
  resident figure of a small case can read a little below what the allocator holds.
"""
import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from benchmarks.env import REPO_ROOT
from benchmarks.providers import LossCase, make_inputs, make_provider, make_step


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _forget_last_call(student) -> None:
    """Free what the previous call left: its gradient and fastkd's kept work buffers (which count
    as the measured call's memory)."""
    student.grad = None
    if "fastkd.fallback" in sys.modules:
        sys.modules["fastkd.fallback"].release_scratch()
    gc.collect()


def resident_peak_extra(step) -> int:
    """Bytes the process's resident high-water mark rises during ``step()`` (glibc's free
    memory handed back first, the mark reset to the current resident size)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before_kib = proc_status_kib("VmRSS")
    step()
    return (proc_status_kib("VmHWM") - before_kib) * 1024


def _cpu_peak_extra_in_this_process(step, student) -> int:
    _forget_last_call(student)
    return resident_peak_extra(step)


def _torch_cpu_peak_extra(step, student) -> int:
    _forget_last_call(student)
    return torch_cpu_peak(step)


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


def rss_resolution_bytes() -> int:
    """How far the kernel's resident-set high-water mark can be from the truth (Linux 6.2 on):
    3 counters x ``max(32, 2 * CPUs)`` pages x CPUs."""
    cpus = os.cpu_count() or 1
    return 3 * max(32, 2 * cpus) * cpus * os.sysconf("SC_PAGE_SIZE")


def cuda_peak_extra(step, student) -> int:
    """Peak bytes allocated by one warm ``step()`` on CUDA beyond what was allocated before it."""
    step()
    student.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    return torch.cuda.max_memory_allocated() - before


def cpu_peak_extra(provider: str, case: LossCase, *, compile_backend: str = "inductor",
                   timeout_s: float = 600) -> dict:
    """Run the measurement in a fresh Python process (see the module docstring): a dict of
    ``extra_bytes`` (resident), ``torch_extra_bytes`` (allocator) and ``resolution_bytes``."""
    if not Path("/proc/self/clear_refs").exists():
        raise RuntimeError("CPU peak memory needs Linux /proc/self/clear_refs")
    command = [sys.executable, "-m", "benchmarks.memory", "--provider", provider,
               "--compile-backend", compile_backend, "--case", json.dumps(case.as_dict())]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed ({provider}, {case.id}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_metrics(extra_bytes: int, case: LossCase, *, torch_extra_bytes: Optional[int] = None,
                   resolution_bytes: Optional[int] = None) -> dict:
    """The record's memory fields; the CPU ones also carry the allocator's figure and the resident
    figure's resolution (see the module docstring)."""
    metrics = {"peak_extra_bytes": extra_bytes,
               "peak_extra_buffers": extra_bytes / case.logits_bytes}
    if torch_extra_bytes is not None:
        metrics.update(peak_extra_torch_bytes=torch_extra_bytes,
                       peak_extra_torch_buffers=torch_extra_bytes / case.logits_bytes)
    if resolution_bytes is not None:
        metrics.update(rss_resolution_bytes=resolution_bytes,
                       rss_resolution_buffers=resolution_bytes / case.logits_bytes)
    return metrics


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
    loss_fn = make_provider(args.provider, case, compile_backend=args.compile_backend)
    step = make_step(loss_fn, student, teacher, labels, case.mode)
    step()  # warm-up: compilation, thread pools, lazy inits
    extra = _cpu_peak_extra_in_this_process(step, student)
    torch_extra = _torch_cpu_peak_extra(step, student)
    print(json.dumps({"extra_bytes": extra, "torch_extra_bytes": torch_extra,
                      "resolution_bytes": rss_resolution_bytes()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
