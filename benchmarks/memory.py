"""Peak extra memory of one loss call, in bytes and in logits-sized buffers.

"Extra" is the peak during one warm call (forward, or forward + backward including the gradient
left in ``student.grad``) minus what was allocated before it (the inputs).

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, in process.
- CPU: a fresh subprocess (``python -m benchmarks.memory ...``) builds the inputs, warms the
  provider up (compilation included), returns freed memory to the OS (``malloc_trim``), resets the
  kernel's resident-set high-water mark (``/proc/self/clear_refs``), runs one call and reports
  ``VmHWM - VmRSS``. fastkd's kept CPU work buffers are released first, so they are counted.
  glibc is told to mmap every block above 128 KiB so that frees really unmap.
"""
import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.env import REPO_ROOT
from benchmarks.providers import LossCase, make_inputs, make_provider, make_step


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _cpu_peak_extra_in_this_process(step, case: LossCase, student) -> int:
    step()  # warm-up: compilation, thread pools, lazy inits
    student.grad = None
    if "fastkd.fallback" in sys.modules:
        # the work buffers fastkd keeps between calls count as this call's memory
        sys.modules["fastkd.fallback"].release_scratch()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before_kib = _proc_status_kib("VmRSS")
    step()
    return (_proc_status_kib("VmHWM") - before_kib) * 1024


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
                   timeout_s: float = 600) -> int:
    """Run the measurement in a fresh Python process (see the module docstring)."""
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
    return int(json.loads(result.stdout.strip().splitlines()[-1])["extra_bytes"])


def memory_metrics(extra_bytes: int, case: LossCase) -> dict:
    return {"peak_extra_bytes": extra_bytes,
            "peak_extra_buffers": extra_bytes / case.logits_bytes}


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
    extra = _cpu_peak_extra_in_this_process(step, case, student)
    print(json.dumps({"extra_bytes": extra}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
