"""The environment recorded with every result, and the device's peak memory bandwidth.

GPU facts come from NVML (package ``nvidia-ml-py``, imported as ``pynvml``) and are simply absent
without a GPU or driver. The peak bandwidth is the denominator of "% of peak":

- CUDA: NVML's maximum memory clock x bus width x 2 (double data rate), e.g. H100 SXM:
  2619 MHz x 5120 bit x 2 / 8 = 3.35 TB/s.
- CPU: measured, the best of a few large ``Tensor.copy_`` calls, counting bytes read + written.
"""
import datetime
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so timings cover all of it."""
    if device == "cuda":
        torch.cuda.synchronize()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None,
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _nvml_handle(pynvml, device_index: int):
    """The NVML handle of torch's CUDA device (by PCI bus id, which survives CUDA_VISIBLE_DEVICES)."""
    props = torch.cuda.get_device_properties(device_index)
    if hasattr(props, "pci_bus_id"):
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id.encode())
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(device_index)


def gpu_info(device_index: int = 0) -> dict:
    """NVML facts for one CUDA device; ``{}`` without CUDA, ``{"nvml_error": ...}`` without NVML."""
    if not torch.cuda.is_available():
        return {}
    info = {"name": torch.cuda.get_device_name(device_index),
            "memory_bytes": torch.cuda.get_device_properties(device_index).total_memory}
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as error:  # no package, no driver: record why and go on
        info["nvml_error"] = repr(error)
        return info
    try:
        handle = _nvml_handle(pynvml, device_index)

        def query(key, function_name, *args, scale=1.0):
            function = getattr(pynvml, function_name, None)
            if function is None:  # older nvidia-ml-py
                info[key] = f"unavailable (pynvml has no {function_name})"
                return
            try:
                value = function(handle, *args)
                info[key] = value * scale if scale != 1.0 else value
            except pynvml.NVMLError as error:
                info[key] = f"unavailable ({error})"

        driver = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        info["memory_bytes"] = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        query("sm_clock_max_mhz", "nvmlDeviceGetMaxClockInfo", pynvml.NVML_CLOCK_SM)
        query("sm_clock_now_mhz", "nvmlDeviceGetClockInfo", pynvml.NVML_CLOCK_SM)
        query("mem_clock_max_mhz", "nvmlDeviceGetMaxClockInfo", pynvml.NVML_CLOCK_MEM)
        query("memory_bus_width_bits", "nvmlDeviceGetMemoryBusWidth")
        query("power_limit_w", "nvmlDeviceGetPowerManagementLimit", scale=1e-3)
        query("temperature_c", "nvmlDeviceGetTemperature", pynvml.NVML_TEMPERATURE_GPU)
        clock, width = info.get("mem_clock_max_mhz"), info.get("memory_bus_width_bits")
        if isinstance(clock, (int, float)) and isinstance(width, (int, float)):
            info["peak_bandwidth_gbps"] = clock * 1e6 * width / 8 * 2 / 1e9
    finally:
        pynvml.nvmlShutdown()
    return info


def measure_copy_bandwidth(megabytes: int = 256, repeats: int = 5, device: str = "cpu") -> dict:
    """Memory bandwidth from ``dst.copy_(src)`` of ``megabytes`` MB: (read + write) bytes / time.

    The best of ``repeats`` is the peak estimate (other processes only ever slow a copy down).
    """
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages is not part of the measurement
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    moved = 2 * src.numel() * src.element_size()
    return {"method": f"torch copy_ of {megabytes} MB fp32 on {device}, (read+write) bytes / time, "
                      f"best of {repeats}",
            "peak_bandwidth_gbps": moved / min(seconds) / 1e9,
            "median_bandwidth_gbps": moved / sorted(seconds)[len(seconds) // 2] / 1e9,
            "threads": torch.get_num_threads()}


def peak_bandwidth_gbps(device: str, env: dict) -> float:
    """The "% of peak" denominator for ``device`` from a captured environment: NVML's figure on
    CUDA (a measured device copy when NVML cannot say), the measured copy bandwidth on CPU."""
    if device == "cuda":
        value = env.get("gpu", {}).get("peak_bandwidth_gbps")
        if isinstance(value, (int, float)):
            return float(value)
        env["cuda_copy_bandwidth"] = measure_copy_bandwidth(1024, device="cuda")
        return float(env["cuda_copy_bandwidth"]["peak_bandwidth_gbps"])
    return float(env["cpu_copy_bandwidth"]["peak_bandwidth_gbps"])


def _version(module_name: str):
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return getattr(module, "__version__", "unknown")


def capture_environment(measure_cpu_bandwidth: bool = True) -> dict:
    """Everything needed to interpret a result: hardware, clocks, versions, git commit."""
    import fastkd
    env = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # other processes' load while the benchmark ran (a shared machine makes timings noisy)
        "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fastkd": fastkd.__version__,
        "liger_kernel": _liger_version(),
        "git": git_commit(),
        "gpu": gpu_info(),
        "cpu_huge_pages": cpu_huge_pages(),
    }
    if measure_cpu_bandwidth:
        env["cpu_copy_bandwidth"] = measure_copy_bandwidth()
    return env


def cpu_huge_pages() -> dict:
    """Whether large CPU tensors can live on 2 MiB pages: the kernel's transparent huge page
    mode and PyTorch's ``THP_MEM_ALLOC_ENABLE`` (1: its CPU allocator asks for huge pages).
    Faulting in a fresh gradient's 4 KiB pages is a large part of a CPU loss step."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as handle:
            mode = handle.read().strip()
    except OSError:
        mode = None
    return {"kernel_thp": mode, "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}


def _liger_version():
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("liger-kernel")
    except (ImportError, PackageNotFoundError):
        return None


def device_slug(env: dict) -> str:
    """Folder name under ``benchmarks/results/``: the GPU's name, else ``cpu-<model>-<n>-threads``."""
    name = env["gpu"].get("name") if env.get("gpu") and env.get("bench_device") != "cpu" else None
    if not name:
        name = f"cpu-{env['cpu_model']}-{env['torch_threads']}-threads"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
