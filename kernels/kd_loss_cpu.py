"""Launcher of the compiled CPU kernel of the dense KD loss (``kernels/kd_loss_cpu.c``).

The C file is built at install time into ``fastkd/kernels/_kd_loss_cpu*.so`` (``setup.py``; an
optional extension: without a C compiler the install still succeeds and the PyTorch reference
``fastkd/reference_dense.py`` runs instead). Plain C loaded with ``ctypes``: one call takes one
``KDArgs`` struct of data pointers, byte strides, dtype codes and options.

:func:`kd_loss_cpu` is the one entry point: ``fastkd.dispatch`` hands it out as the dense
backend of CPU rows. It follows the dense backend contract (``fastkd.dispatch.DenseBackend``)
and also owns the label check, the kept-row count and the reduction (``reduction=``), so the
eager CPU path runs no ATen op around it. ``FASTKD_CPU_KERNEL=0`` turns it off;
``unavailable_reason()`` says why it is not used. Imports nothing from the API layer.
"""
import ctypes
from typing import Optional

import torch

from fastkd.kernels.cpu_library import (DTYPE_CODES, REDUCTIONS, CompiledFunction, set_rows,
                                        thread_count)

__all__ = ["available", "unavailable_reason", "library_path", "kd_loss_cpu", "last_work_bytes",
           "DTYPE_CODES"]

DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "mse": 3}


class KDArgs(ctypes.Structure):
    """The C struct ``KDArgs`` (kernels/kd_loss_cpu.c), field for field."""
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "student", "teacher", "grad", "labels", "row_loss", "total")] + [
        (name, ctypes.c_int64 * 2) for name in (
            "student_strides", "teacher_strides", "grad_strides")] + [
        (name, ctypes.c_int64) for name in (
            "num_rows", "rows_per_batch", "num_classes", "ignore_index")] + [
        ("label_counts", ctypes.c_int64 * 2), ("work_bytes", ctypes.c_int64)] + [
        (name, ctypes.c_double) for name in (
            "temperature", "soft_weight", "hard_weight", "beta", "grad_scale")] + [
        (name, ctypes.c_int32) for name in (
            "student_dtype", "teacher_dtype", "grad_dtype", "label_mode", "divergence",
            "num_threads", "reduction", "refuse_bad_labels")]


# setup.py's extension fastkd.kernels._kd_loss_cpu
_KERNEL = CompiledFunction("_kd_loss_cpu", "fastkd_kd_rows", "the compiled CPU kernel", KDArgs)
available, unavailable_reason = _KERNEL.available, _KERNEL.unavailable_reason
library_path, last_work_bytes = _KERNEL.library_path, _KERNEL.last_work_bytes


def kd_loss_cpu(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor], options, *, grad: Optional[torch.Tensor],
                grad_scale=1.0, reduction: str = "none",
                validate_labels: bool = False) -> Optional[torch.Tensor]:
    """The dense KD loss of CPU ``(N, V)`` / ``(B, S, V)`` rows (last-dim stride 1, float32 /
    float16 / bfloat16, read in place) in one call.

    ``options``: temperature, soft_weight, hard_weight, divergence, beta, ignore_index and
    teacher_labels (a ``fastkd.options.LossOptions``). ``labels``: ``(N,)`` contiguous int64 or
    None. Fills ``grad`` (None, or the student's shape and dtype, possibly its own storage) with
    ``grad_scale * d loss / dz_s``. ``reduction="none"`` returns the row losses ``(N,)``
    float32 (the backend contract); ``"sum"`` / ``"batchmean"`` the 0-d reduced loss, with the
    gradient of that reduction. A kept label outside ``[0, V)`` makes its row NaN, or with
    ``validate_labels`` returns None before anything is written (the caller words the error)."""
    num_classes = student_logits.shape[-1]
    num_rows = student_logits.numel() // num_classes
    row_loss = torch.empty(num_rows, dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float32)
    if isinstance(grad_scale, torch.Tensor):
        grad_scale = grad_scale.item()
    args = KDArgs()
    args.rows_per_batch = set_rows(args, "student", student_logits)
    set_rows(args, "teacher", teacher_logits)
    if grad is not None:
        set_rows(args, "grad", grad)
    if options.teacher_labels:
        args.label_mode = 2
    elif labels is not None:
        args.label_mode, args.labels = 1, labels.data_ptr()
    args.row_loss, args.total = row_loss.data_ptr(), total.data_ptr()
    args.num_rows, args.num_classes = num_rows, num_classes
    args.ignore_index = options.ignore_index
    args.temperature, args.soft_weight = options.temperature, options.soft_weight
    args.hard_weight, args.beta = options.hard_weight, options.beta
    args.grad_scale = float(grad_scale)
    args.divergence = DIVERGENCE_CODES[options.divergence]
    args.num_threads = thread_count(num_rows * num_classes)
    args.reduction = REDUCTIONS[reduction]
    args.refuse_bad_labels = bool(validate_labels)
    status = _KERNEL(args)
    if status < 0:
        raise MemoryError(f"fastkd's CPU kernel could not allocate its row buffers "
                          f"({num_classes} classes)")
    if status == 1:
        return None
    return row_loss if reduction == "none" else total


kd_loss_cpu.reduces = True   # owns the reduction and the label check (fastkd.loss reads this)
