"""The one dispatch point of the loss kernels: :func:`resolve_backend` turns ``backend=`` ("auto",
"triton", "torch") and the tensors' device into the backend that runs, :func:`dispatch` hands
out that backend's implementation of a kernel family (imported on first use, so the eager CPU
path never imports Triton). ``kd_loss``, ``kd_loss_sparse`` and the fused linear path all come
through here.

Sparse teachers on CPU rows run in the compiled CPU kernel (kernels/kd_sparse_cpu.c) when it is
built and not turned off (``FASTKD_CPU_KERNEL=0``); the ATen implementation
(fastkd/fallback_sparse.py) serves ``backend="torch"`` on other devices and installs without a
C compiler.
"""
import os

import torch

__all__ = ["resolve_backend", "dispatch", "triton_available", "triton_interpreting",
           "sparse_cpu_kernel"]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_IMPORTABLE = None


def triton_available() -> bool:
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        import importlib.util
        _TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
    return _TRITON_IMPORTABLE


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    # backend == "triton"
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package, which is not importable here")
    if device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got tensors on {device}); run with "
            "TRITON_INTERPRET=1 to use Triton's CPU interpreter, or use backend='torch'")
    return "triton"


_IMPLEMENTATIONS = {}   # (backend, family) -> function, imported on first use


_SPARSE_CPU_KERNEL = []   # [module or None] once looked up


def sparse_cpu_kernel():
    """The ``fastkd.kernels.kd_sparse_cpu`` module when the compiled sparse CPU kernel is built
    and not turned off (``FASTKD_CPU_KERNEL=0``), else None; looked up once."""
    if not _SPARSE_CPU_KERNEL:
        from fastkd.kernels import kd_sparse_cpu
        _SPARSE_CPU_KERNEL.append(kd_sparse_cpu if kd_sparse_cpu.available() else None)
    return _SPARSE_CPU_KERNEL[0]


def dispatch(backend: str, family: str = "dense", device=None):
    """The one place that picks the implementation of a kernel family: ``"dense"`` (both follow
    ``fastkd.loss._BACKEND_CONTRACT``) or ``"sparse"``
    (``fastkd.sparse_loss._SPARSE_BACKEND_CONTRACT``). ``device``: the student's device; sparse
    CPU rows of ``backend="torch"`` get the compiled CPU kernel when it is available."""
    if family == "sparse" and backend == "torch" and device is not None and \
            torch.device(device).type == "cpu":
        kernel = sparse_cpu_kernel()
        if kernel is not None:
            return kernel.kd_sparse_forward_cpu
    implementation = _IMPLEMENTATIONS.get((backend, family))
    if implementation is None:
        if family == "sparse":
            if backend == "triton":
                from fastkd.kernels.kd_sparse import kd_sparse_forward_triton as implementation
            else:
                from fastkd.fallback_sparse import kd_sparse_forward_torch as implementation
        elif backend == "triton":
            from fastkd.kernels.kd_loss import kd_forward_triton as implementation
        else:
            from fastkd.fallback import kd_forward_torch as implementation
        _IMPLEMENTATIONS[backend, family] = implementation
    return implementation

