"""Work buffers of the PyTorch fallbacks (``fastkd.fallback``, ``fastkd.fallback_sparse``):
:class:`Workspace` hands out chunk-sized fp32 buffers, which on the CPU outlive the call, kept
per thread within a bound (:func:`scratch_buffer`); :func:`release_scratch` frees the calling
thread's, :func:`kept_scratch_bytes` counts what all threads keep.
"""
import threading
import weakref

import torch

__all__ = ["Workspace", "scratch_buffer", "release_scratch", "kept_scratch_bytes",
           "SCRATCH_KEEP_BYTES", "SCRATCH_KEEP_BYTES_TOTAL"]

# CPU work buffers outlive the call (per thread): allocating and freeing a few chunk-sized
# buffers on every call costs more than the math at small and mid sizes, because glibc hands the
# freed top of its heap back to the OS (M_TRIM_THRESHOLD) and the next call faults every page in
# again. Measured at 256 x 1000 fp32 on this 2-core machine: 1718 page faults and 1.8 ms of system
# time per call, 3.8 ms in all against 1.5 ms with the buffers kept. At most SCRATCH_KEEP_BYTES are
# kept per thread and SCRATCH_KEEP_BYTES_TOTAL by all threads together (a thread pool calling the
# loss keeps a bounded amount); buffers beyond either are made per call as before. A thread's
# buffers go when it ends; release_scratch() frees the calling thread's.
SCRATCH_KEEP_BYTES = 32 * 1024 * 1024
SCRATCH_KEEP_BYTES_TOTAL = 4 * SCRATCH_KEEP_BYTES


class _ThreadScratch:
    """One thread's kept buffers: (family, name) -> flat float32 CPU tensor, and their bytes."""
    __slots__ = ("buffers", "kept_bytes", "__weakref__")

    def __init__(self):
        self.buffers, self.kept_bytes = {}, 0


class _Scratch(threading.local):
    def __init__(self):
        self.mine = _ThreadScratch()
        with _SCRATCH_LOCK:
            _ALL_SCRATCH.add(self.mine)   # gone from the set when its thread ends


_SCRATCH_LOCK = threading.Lock()
_ALL_SCRATCH = weakref.WeakSet()
_SCRATCH = _Scratch()


def release_scratch() -> None:
    """Free this thread's kept CPU work buffers (the next call allocates them again)."""
    mine = _SCRATCH.mine
    with _SCRATCH_LOCK:
        mine.buffers, mine.kept_bytes = {}, 0


def kept_scratch_bytes() -> int:
    """Bytes of CPU work buffers kept by all threads together."""
    with _SCRATCH_LOCK:
        return _kept_total()


def _kept_total() -> int:
    """kept_scratch_bytes() for a caller that holds _SCRATCH_LOCK."""
    return sum(scratch.kept_bytes for scratch in _ALL_SCRATCH)


def scratch_buffer(family: str, name: str, numel: int, device: torch.device) -> torch.Tensor:
    """A flat float32 buffer of at least ``numel`` elements for work buffer ``name`` of kernel
    ``family``: on the CPU the one this thread kept from an earlier call when it is large enough
    (and kept from now on within SCRATCH_KEEP_BYTES / SCRATCH_KEEP_BYTES_TOTAL); elsewhere a new
    one (the CUDA caching allocator already reuses memory). Its contents are garbage; no result
    may live in it."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=torch.float32, device=device)
    mine, key = _SCRATCH.mine, (family, name)
    flat = mine.buffers.get(key)
    if flat is not None and flat.numel() >= numel:
        return flat
    with _SCRATCH_LOCK:
        if flat is not None:   # too small: replaced
            del mine.buffers[key]
            mine.kept_bytes -= flat.numel() * 4
        flat = torch.empty(numel, dtype=torch.float32)
        if (mine.kept_bytes + numel * 4 <= SCRATCH_KEEP_BYTES
                and _kept_total() + numel * 4 <= SCRATCH_KEEP_BYTES_TOTAL):
            mine.buffers[key] = flat
            mine.kept_bytes += numel * 4
    return flat


class Workspace:
    """Chunk-sized fp32 buffers (see ``scratch_buffer``), taken on first use in a call and reused
    for every chunk of it."""

    def __init__(self, rows: int, num_classes: int, device: torch.device, family: str = "dense"):
        self.shape = (rows, num_classes)
        self.device = device
        self.family = family
        self.buffers = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        view = self.buffers.get(name)
        if view is None:
            numel = self.shape[0] * self.shape[1]
            view = self.buffers[name] = scratch_buffer(self.family, name, numel, self.device)[
                :numel].view(self.shape)
        return view[:rows]
