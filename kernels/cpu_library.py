"""Finding and opening the compiled CPU kernels: plain C files that setup.py builds as optional
extensions (``fastkd.kernels._kd_loss_cpu``, ``fastkd.kernels._kd_sparse_cpu``) and the
launchers load with ``ctypes`` (no Python headers, no libtorch ABI).

``FASTKD_CPU_KERNEL=0`` turns every compiled kernel off (e.g. for an A/B against the PyTorch
reference); :meth:`CompiledFunction.unavailable_reason` says why a kernel is not used.
"""
import ctypes
import importlib.machinery
import os
import sys
from typing import Optional

import torch

__all__ = ["library_path", "CompiledFunction", "set_rows", "thread_count", "DTYPE_CODES",
           "REDUCTIONS", "THREADED_ELEMENTS", "reload_all"]

TURNED_OFF = ("0", "", "false", "no", "off")
# the C kernels' codes of the float dtypes they read and write, and of the reductions
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
REDUCTIONS = {"none": 0, "sum": 1, "batchmean": 2}
# Calls of at least this many student elements split their rows over torch's intra-op threads
# (the kernels' OpenMP region runs on torch's own pool); smaller ones stay on the calling thread.
THREADED_ELEMENTS = 128 * 1024
COMPILED_FUNCTIONS = []   # every CompiledFunction made, for reload_all


def thread_count(elements: int) -> int:
    """Threads a kernel call over ``elements`` student elements runs on."""
    return torch.get_num_threads() if elements >= THREADED_ELEMENTS else 1


def library_path(name: str) -> Optional[str]:
    """The built library ``name`` (e.g. ``"_kd_loss_cpu"``), or None when it was not built.

    setup.py's build puts it beside this file. A source checkout used over a non-editable
    install finds it in the installed copy's folder, the package's next search location (see
    fastkd/__init__.py)."""
    here = os.path.dirname(os.path.abspath(__file__))
    package = sys.modules.get(__package__)
    folders = [here] + [f for f in getattr(package, "__path__", []) if f != here]
    for folder in folders:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, name + suffix)
            if os.path.isfile(path):
                return path
    return None


def reload_all() -> None:
    """Look every compiled kernel up again on its next use (``library_path`` is read then: the
    tests point it at libraries built for one instruction set each)."""
    for kernel in COMPILED_FUNCTIONS:
        kernel.reload()


class CompiledFunction:
    """One C function ``int symbol(struct *)`` of a compiled kernel library, opened on first
    use; ``struct`` is its argument's ctypes Structure (with an ``int64 work_bytes`` field the
    call fills) and ``what`` names the kernel in the reasons it is not used."""

    def __init__(self, library: str, symbol: str, what: str, struct: type):
        self.library, self.symbol, self.what, self.struct = library, symbol, what, struct
        self._loaded = None   # (function or None, reason or None), once looked up
        self._work_bytes = 0
        COMPILED_FUNCTIONS.append(self)

    def reload(self) -> None:
        """Look the library up again on the next use."""
        self._loaded = None

    def _load(self):
        if os.environ.get("FASTKD_CPU_KERNEL", "1") in TURNED_OFF:
            return None, "turned off by FASTKD_CPU_KERNEL=0"
        path = library_path(self.library)
        if path is None:
            return None, (f"{self.what} was not built at install time (no C compiler? "
                          f"reinstall fastkd where `cc` works)")
        try:
            function = getattr(ctypes.CDLL(path), self.symbol)
        except (OSError, AttributeError) as error:
            return None, f"{self.what} {path} cannot be loaded ({error})"
        function.argtypes = [ctypes.POINTER(self.struct)]
        function.restype = ctypes.c_int
        return function, None

    def function(self):
        """The ctypes function, or None when the kernel is not available."""
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded[0]

    def __call__(self, args) -> int:
        """The C function's status for ``args`` (a ``struct``); records its work bytes."""
        status = self.function()(ctypes.byref(args))
        self._work_bytes = args.work_bytes
        return status

    def available(self) -> bool:
        """Whether the kernel is built, loadable and not turned off."""
        return self.function() is not None

    def unavailable_reason(self) -> Optional[str]:
        """Why the kernel is not used (None when it is)."""
        self.function()
        return self._loaded[1]

    def library_path(self) -> Optional[str]:
        """The built shared library's path, or None when it was not built."""
        return library_path(self.library)

    def last_work_bytes(self) -> int:
        """Bytes of the row buffers the kernel's most recent call allocated (C memory, freed
        before the call returns, invisible to torch's allocator)."""
        return self._work_bytes


def set_rows(args, prefix: str, tensor: torch.Tensor):
    """Point ``args.<prefix>`` at the rows of an ``(N, V)`` or ``(B, S, V)`` ``tensor``, with
    ``<prefix>_strides`` = (batch, row) byte strides (batch 0 for 2-D) and ``<prefix>_dtype``;
    returns its rows per batch (N or S)."""
    size = tensor.element_size()
    setattr(args, prefix, tensor.data_ptr())
    strides = getattr(args, prefix + "_strides")
    strides[0] = tensor.stride(0) * size if tensor.dim() == 3 else 0
    strides[1] = tensor.stride(-2) * size
    setattr(args, prefix + "_dtype", DTYPE_CODES[tensor.dtype])
    return tensor.shape[-2]
