"""Launcher of the compiled CPU kernel of the dense KD loss (``kernels/kd_loss_cpu.c``).

The C file is built at install time into ``fastkd/kernels/_kd_loss_cpu*.so`` (``setup.py``; an
optional extension: without a C compiler the install still succeeds and the PyTorch fallback's
ATen path is used instead). It is plain C loaded with ``ctypes`` (no Python headers, no libtorch
ABI): ``kd_forward_cpu`` passes it data pointers, byte strides and dtype codes.

For CPU tensors (``fastkd.fallback.cpu_kernel_takes``, the one place that decides)
``fastkd.fallback.kd_forward_torch`` calls ``kd_forward_cpu``, which follows
``fastkd.loss._BACKEND_CONTRACT``, and ``kd_loss``'s eager path calls ``kd_loss_cpu``, which also
checks the labels and reduces (the per-call cost of ATen ops is what small vocabularies spent
their time on). Set ``FASTKD_CPU_KERNEL=0`` to turn it off (e.g. for an A/B against the ATen
path); ``unavailable_reason()`` says why it is not used.
"""
import ctypes
from typing import Optional

import torch

from fastkd.kernels import cpu_library
from fastkd.kernels.cpu_library import CompiledFunction, row_layout


__all__ = ["available", "unavailable_reason", "library_path", "kd_forward_cpu", "kd_loss_cpu",
           "BadLabelsError", "DTYPE_CODES"]

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "mse": 3}
LABELS_NONE, LABELS_TENSOR, LABELS_TEACHER = 0, 1, 2
REDUCE_NONE = 0
REDUCTIONS = {"none": REDUCE_NONE, "sum": 1, "batchmean": 2}
# Calls of at least this many elements split their rows over torch's intra-op threads (the
# kernel's OpenMP region runs on torch's own pool); smaller ones stay on the calling thread.
THREADED_ELEMENTS = 128 * 1024

def _declare(function) -> None:
    i64, pointer, integer, double = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    function.argtypes = [pointer, i64, i64, integer,     # student, byte strides, dtype
                         pointer, i64, i64, integer,     # teacher
                         pointer, i64, i64, integer,     # grad (NULL: none)
                         pointer, integer,               # labels (int64), label mode
                         i64, i64, i64,                  # rows, rows per batch, classes
                         double, double, double, integer, double,  # T, weights, divergence, beta
                         i64, double, pointer, integer,  # ignore_index, grad_scale, row_loss, threads
                         integer, integer, pointer,      # reduction, refuse bad labels, total
                         ctypes.POINTER(i64)]            # (kept, bad) label counts
    function.restype = integer


# setup.py's extension fastkd.kernels._kd_loss_cpu
_KERNEL = CompiledFunction("_kd_loss_cpu", "fastkd_kd_rows", "the compiled CPU kernel", _declare)
available, unavailable_reason = _KERNEL.available, _KERNEL.unavailable_reason


def library_path() -> Optional[str]:
    """The built shared library's path, or None when it was not built."""
    return cpu_library.library_path("_kd_loss_cpu")


def _launch(student_logits, teacher_logits, labels, grad, row_loss, *, teacher_labels,
            temperature, soft_weight, hard_weight, divergence, beta, ignore_index, grad_scale,
            reduction=REDUCE_NONE, refuse_bad_labels=False, total=None, label_counts=None):
    """One call of the C function on (N, V) / (B, S, V) CPU rows; returns its status."""
    num_classes = student_logits.shape[-1]
    num_rows = row_loss.shape[0]
    if teacher_labels:
        label_mode, labels_pointer = LABELS_TEACHER, None
    elif labels is not None:
        label_mode, labels_pointer = LABELS_TENSOR, labels.data_ptr()
    else:
        label_mode, labels_pointer = LABELS_NONE, None
    threads = torch.get_num_threads() if num_rows * num_classes >= THREADED_ELEMENTS else 1
    if grad is not None:
        grad_batch, grad_row, _ = row_layout(grad)
        grad_pointer, grad_dtype = grad.data_ptr(), DTYPE_CODES[grad.dtype]
    else:
        grad_batch = grad_row = grad_dtype = 0
        grad_pointer = None
    student_batch, student_row, rows_per_batch = row_layout(student_logits)
    teacher_batch, teacher_row, _ = row_layout(teacher_logits)
    status = _KERNEL.function()(
        student_logits.data_ptr(), student_batch, student_row, DTYPE_CODES[student_logits.dtype],
        teacher_logits.data_ptr(), teacher_batch, teacher_row, DTYPE_CODES[teacher_logits.dtype],
        grad_pointer, grad_batch, grad_row, grad_dtype,
        labels_pointer, label_mode, num_rows, rows_per_batch, num_classes,
        temperature, soft_weight, hard_weight, DIVERGENCE_CODES[divergence], beta,
        ignore_index, grad_scale, row_loss.data_ptr(), threads,
        reduction, refuse_bad_labels, total, label_counts)
    if status < 0:
        raise MemoryError(f"fastkd's CPU kernel could not allocate its row buffers "
                          f"({num_classes} classes)")
    return status


def kd_forward_cpu(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   labels: Optional[torch.Tensor], *, teacher_labels: bool, temperature: float,
                   soft_weight: float, hard_weight: float, divergence: str, beta: float,
                   ignore_index: int, grad_scale: float, grad: Optional[torch.Tensor],
                   **_unused) -> torch.Tensor:
    """The backend contract (``fastkd.loss._BACKEND_CONTRACT``): row losses ``(N,)`` float32 of
    CPU ``(N, V)`` / ``(B, S, V)`` logits (last-dim stride 1, float32 / float16 / bfloat16);
    fills ``grad`` with ``grad_scale * d row_loss / dz_s``. ``labels``: ``(N,)`` contiguous
    int64 or None; ``grad_scale`` a Python float. The kernel checks every label itself (a kept
    label outside ``[0, V)`` makes its row NaN), so the ``labels_in_range`` /
    ``all_rows_kept`` hints are not needed."""
    num_classes = student_logits.shape[-1]
    row_loss = torch.empty(student_logits.numel() // num_classes, dtype=torch.float32)
    if row_loss.numel():
        _launch(student_logits, teacher_logits, labels, grad, row_loss,
                teacher_labels=teacher_labels, temperature=temperature, soft_weight=soft_weight,
                hard_weight=hard_weight, divergence=divergence, beta=beta,
                ignore_index=ignore_index, grad_scale=grad_scale)
    return row_loss


class BadLabelsError(ValueError):
    """A kept label outside ``[0, V)``: the kernel refused the call before writing anything
    (the caller words the error, naming the label)."""


def kd_loss_cpu(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor], *, teacher_labels: bool, temperature: float,
                soft_weight: float, hard_weight: float, divergence: str, beta: float,
                ignore_index: int, reduction: str, grad: Optional[torch.Tensor],
                validate_labels: bool) -> torch.Tensor:
    """The whole loss in one call, for ``fastkd.loss`` on the CPU: the label check, the kept-row
    count and the reduction are made by the kernel too (no ATen op around it). Returns the loss
    (0-d float32, or ``(N,)`` rows for ``reduction="none"``) and fills ``grad`` with its
    gradient for ``grad_output == 1`` (per row unscaled for ``"none"``). With
    ``validate_labels`` a kept label outside ``[0, V)`` raises :class:`BadLabelsError` before
    anything is written (``grad`` may be the student's own storage); without, its row is
    NaN."""
    num_classes = student_logits.shape[-1]
    row_loss = torch.empty(student_logits.numel() // num_classes, dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float32)
    label_counts = (ctypes.c_int64 * 2)()
    status = _launch(student_logits, teacher_logits, labels, grad, row_loss,
                     teacher_labels=teacher_labels, temperature=temperature,
                     soft_weight=soft_weight, hard_weight=hard_weight, divergence=divergence,
                     beta=beta, ignore_index=ignore_index, grad_scale=1.0,
                     reduction=REDUCTIONS[reduction], refuse_bad_labels=bool(validate_labels),
                     total=total.data_ptr(), label_counts=label_counts)
    if status == 1:
        raise BadLabelsError(f"a label is outside [0, {num_classes}) (ignore_index "
                             f"{ignore_index})")
    return row_loss if reduction == "none" else total
