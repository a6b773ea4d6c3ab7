"""The one dispatch point of the loss kernels: :func:`resolve_backend` turns ``backend=``
("auto", "triton", "torch") and the tensors' device into the backend that runs, :func:`dispatch`
hands out that backend's implementation of a kernel family (imported on first use, so the eager
CPU path never imports Triton). ``kd_loss``, its sparse form and the fused linear path all come
through here.

Per family (``"dense"``, ``"sparse"``) and backend:

* ``"triton"``: the Triton kernel (kernels/kd_loss.py, kernels/kd_sparse.py), on CUDA or in
  Triton's interpreter;
* ``"torch"`` on CPU rows: the compiled C kernel (kernels/kd_loss_cpu.c, kd_sparse_cpu.c) when
  it is built and not turned off (``FASTKD_CPU_KERNEL=0``);
* ``"torch"`` otherwise: the plain PyTorch reference (fastkd/reference_dense.py,
  reference_sparse.py).

Every implementation follows :class:`DenseBackend` / :class:`SparseBackend`. One that also owns
the label check and the reduction (the C kernels) says so with a ``reduces = True`` attribute
and takes ``reduction=`` too.
"""
import importlib
import os
import sys
from typing import Optional, Protocol

import torch

__all__ = ["resolve_backend", "dispatch", "compiled_kernel", "triton_available",
           "triton_interpreting", "DenseBackend", "SparseBackend"]


class DenseBackend(Protocol):
    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: Optional[torch.Tensor], options, *, grad: Optional[torch.Tensor],
                 grad_scale=1.0) -> torch.Tensor:
        """Row losses ``(N,)`` float32 (all accumulation in float32).

        ``student_logits``, ``teacher_logits``: ``(N, V)`` floating tensors with last-dim
        stride 1 (row stride free), dtypes may differ; or ``(B, S, V)`` with the same leading
        shape and any leading strides (rows in row-major ``(b, s)`` order). ``labels``: ``(N,)``
        int64 contiguous or None. ``options``: a :class:`fastkd.options.LossOptions`
        (``divergence`` already mapped: ``jsd`` only with ``0 < beta < 1``; with
        ``teacher_labels`` the hard label of a row is the first index of its teacher maximum,
        and a teacher row holding a NaN gives a NaN loss). Rows whose label is
        ``ignore_index`` get loss 0 and a zero gradient row; a kept label outside ``[0, V)``
        is never read out of bounds: its row's loss is NaN.

        ``grad``: None or a tensor of the student's shape and dtype, last-dim stride 1, possibly
        the student tensor itself (every student element is read before its gradient is
        written); it is filled with ``grad_scale * d row_loss / dz_s``. ``grad_scale``: a float
        or a 0-d float32 tensor on the logits' device (no host sync needed)."""


class SparseBackend(Protocol):
    def __call__(self, student_logits: torch.Tensor, indices: torch.Tensor,
                 values: Optional[torch.Tensor], lse: Optional[torch.Tensor],
                 counts: Optional[torch.Tensor], labels: Optional[torch.Tensor], options, *,
                 grad: Optional[torch.Tensor], grad_scale=1.0) -> torch.Tensor:
        """Row losses ``(N,)`` float32 against a sparse teacher.

        ``student_logits``: ``(N, V)`` floating, last-dim stride 1 (a ``reduces`` backend also
        takes ``(B, S, V)`` rows in place). ``indices``: ``(N, K)`` integer, last-dim stride 1,
        ids in ``[0, V)``, unique within a row among its real entries. Top-k targets: ``values``
        ``(N, K)`` floating (no NaN; ``-inf`` entries are padding: not kept ids, their classes
        in the rest bucket) and ``lse`` ``(N,)`` float32, ``counts`` None. Sampled targets:
        ``counts`` ``(N, K)`` (>= 0, positive row sums; count-0 entries are padding), ``values``
        and ``lse`` None. ``labels``: ``(N,)`` int64 contiguous, every kept label in range, or
        None; with ``options.teacher_labels`` the hard label is the id of the row's first
        largest real value / count (a row without real entries has no hard term).
        ``options``: divergence forward_kl, reverse_kl or jsd with ``0 < beta < 1``; tail
        bucket, renormalize or ignore (combinations checked by
        ``fastkd.checks.check_sparse_options``). Ignored rows get loss 0 and a zero gradient
        row; ``grad`` as for :class:`DenseBackend`."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_IMPORTABLE = []


def triton_available() -> bool:
    if not _TRITON_IMPORTABLE:
        import importlib.util
        _TRITON_IMPORTABLE.append(importlib.util.find_spec("triton") is not None)
    return _TRITON_IMPORTABLE[0]


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


# (family, backend) -> (module, function); "cpu" is the compiled kernel of CPU rows
_IMPLEMENTATIONS = {
    ("dense", "triton"): ("fastkd.kernels.kd_loss", "kd_forward_triton"),
    ("dense", "cpu"): ("fastkd.kernels.kd_loss_cpu", "kd_loss_cpu"),
    ("dense", "torch"): ("fastkd.reference_dense", "kd_dense_torch"),
    ("sparse", "triton"): ("fastkd.kernels.kd_sparse", "kd_sparse_forward_triton"),
    ("sparse", "cpu"): ("fastkd.kernels.kd_sparse_cpu", "kd_sparse_cpu"),
    ("sparse", "torch"): ("fastkd.reference_sparse", "kd_sparse_torch"),
}
_LOADED = {}


def _load(family: str, backend: str):
    """The implementation, or None for a compiled CPU kernel that is not available."""
    key = (family, backend)
    if key not in _LOADED:
        module = importlib.import_module(_IMPLEMENTATIONS[key][0])
        available = getattr(module, "available", lambda: True)()
        _LOADED[key] = getattr(module, _IMPLEMENTATIONS[key][1]) if available else None
    return _LOADED[key]


def compiled_kernel(family: str):
    """The compiled CPU kernel's entry point of ``family``, or None when it is not built or is
    turned off."""
    return _load(family, "cpu")


def has_memory(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` has real memory a compiled kernel can read: not a fake tensor (torch's
    FakeTensorMode, used to trace shapes), a meta tensor or a functorch-wrapped one (vmap,
    jvp). Those go through the PyTorch path, which handles them as torch ops do."""
    if tensor.device.type == "meta":
        return False
    fake = sys.modules.get("torch._subclasses.fake_tensor")   # loaded by any FakeTensorMode
    if fake is not None and isinstance(tensor, fake.FakeTensor):
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def dispatch(backend: str, family: str = "dense", device=None, student=None):
    """The implementation of kernel family ``family`` (``"dense"`` or ``"sparse"``) for a
    resolved ``backend`` (``"triton"`` or ``"torch"``) and the student's ``device``; the
    compiled CPU kernel only for a ``student`` tensor (its logits or hidden states) with
    memory (:func:`has_memory`). Every loss passes its student; None means real memory."""
    if backend == "torch" and device is not None and torch.device(device).type == "cpu" \
            and (student is None or has_memory(student)):
        compiled = compiled_kernel(family)
        if compiled is not None:
            return compiled
    return _load(family, backend)
