"""Finding and opening the compiled CPU kernels: plain C files that setup.py builds as optional
extensions (``fastkd.kernels._kd_loss_cpu``, ``fastkd.kernels._kd_sparse_cpu``) and the
launchers load with ``ctypes`` (no Python headers, no libtorch ABI).

``FASTKD_CPU_KERNEL=0`` turns every compiled kernel off (e.g. for an A/B against the ATen
path); :meth:`CompiledFunction.unavailable_reason` says why a kernel is not used.
"""
import ctypes
import importlib.machinery
import os
import sys
from typing import Callable, Optional

import torch

__all__ = ["library_path", "CompiledFunction", "row_layout"]

TURNED_OFF = ("0", "", "false", "no", "off")


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


class CompiledFunction:
    """One C function of a compiled kernel library, opened on first use.

    ``declare(function)`` sets its ``argtypes`` and ``restype``; ``what`` names the kernel in
    the reasons it is not used."""

    def __init__(self, library: str, symbol: str, what: str, declare: Callable):
        self.library, self.symbol, self.what, self.declare = library, symbol, what, declare
        self._loaded = None   # (function or None, reason or None), once looked up

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
        self.declare(function)
        return function, None

    def function(self):
        """The ctypes function, or None when the kernel is not available."""
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded[0]

    def available(self) -> bool:
        """Whether the kernel is built, loadable and not turned off."""
        return self.function() is not None

    def unavailable_reason(self) -> Optional[str]:
        """Why the kernel is not used (None when it is)."""
        self.function()
        return self._loaded[1]


def row_layout(tensor: torch.Tensor):
    """(batch byte stride, row byte stride, rows per batch) of ``(N, V)`` or ``(B, S, V)`` rows."""
    size = tensor.element_size()
    if tensor.dim() == 2:
        return 0, tensor.stride(0) * size, tensor.shape[0]
    return tensor.stride(0) * size, tensor.stride(1) * size, tensor.shape[1]
