"""Launcher of the compiled CPU kernel of the sparse-teacher KD loss (``kernels/kd_sparse_cpu.c``).

Built at install time (an optional extension) and loaded as the dense CPU kernel is
(``kernels/kd_loss_cpu.py``); where it was not built, the PyTorch reference
``fastkd/reference_sparse.py`` runs. One call takes one ``SparseCall`` struct.

``fastkd.dispatch`` hands out :func:`kd_sparse_cpu` for CPU rows when :func:`available`.
``FASTKD_CPU_KERNEL=0`` turns it off, as it does the dense CPU kernel; :func:`unavailable_reason`
says why it is not used. This module imports nothing from the ``fastkd`` API layer.
"""
import ctypes

import torch

from fastkd.kernels.cpu_library import (DTYPE_CODES, REDUCTIONS, CompiledFunction, set_rows,
                                        thread_count)

__all__ = ["available", "unavailable_reason", "library_path", "kd_sparse_cpu",
           "kd_sparse_rows_cpu", "last_work_bytes", "REFUSED"]

_ID_CODES = {torch.int64: 0, torch.int32: 1, torch.int16: 2}
if hasattr(torch, "uint16"):
    _ID_CODES[torch.uint16] = 3
_DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
_TAIL_CODES = {"bucket": 0, "renormalize": 1, "ignore": 2}
_LABELS_TENSOR, _LABELS_TEACHER = 1, 2   # 0: no labels
REFUSED = "refused"   # kd_sparse_rows_cpu's status when a data check may fail


class SparseCall(ctypes.Structure):
    """The C struct ``SparseCall`` (kernels/kd_sparse_cpu_parts.h), field for field."""
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "student", "grad", "ids", "values", "lse", "counts", "labels", "row_loss", "total",
        "label_counts")] + [
        ("student_strides", ctypes.c_int64 * 2), ("grad_strides", ctypes.c_int64 * 2)] + [
        (name, ctypes.c_int64) for name in (
            "ids_stride", "values_stride", "counts_stride", "num_rows", "rows_per_batch",
            "num_classes", "num_kept", "ignore_index")] + [
        (name, ctypes.c_double) for name in (
            "temperature", "soft_weight", "hard_weight", "beta", "grad_scale")] + [
        (name, ctypes.c_int32) for name in (
            "student_dtype", "grad_dtype", "ids_dtype", "values_dtype", "label_mode",
            "divergence", "tail", "num_threads", "refuse_bad_labels", "reduction",
            "check_values")] + [
        ("mass_temperature", ctypes.c_double), ("values_unit", ctypes.c_double),
        ("work_bytes", ctypes.c_int64)]


# setup.py's extension fastkd.kernels._kd_sparse_cpu
_KERNEL = CompiledFunction("_kd_sparse_cpu", "fastkd_kd_sparse_rows",
                           "the compiled sparse CPU kernel", SparseCall)
available, unavailable_reason = _KERNEL.available, _KERNEL.unavailable_reason
library_path, last_work_bytes = _KERNEL.library_path, _KERNEL.last_work_bytes


def _rows_of(tensor: torch.Tensor, allowed, fallback_dtype) -> torch.Tensor:
    """(N, K) contiguous in a dtype the kernel reads (else converted: it is K-sized)."""
    if tensor.dtype not in allowed:
        tensor = tensor.to(fallback_dtype)
    return tensor.contiguous()


def kd_sparse_rows_cpu(student_logits, indices, values, lse, counts, labels, options, *,
                       grad_scale, grad, reduction="none", check_values=False,
                       mass_temperature=None):
    """One call of the C kernel: ``(row_loss (N,) float32, total, (kept rows, bad labels))``,
    or ``(REFUSED, None, (kept rows, bad labels))`` when ``check_values`` found a row that may
    fail ``fastkd.checks.check_sparse_values`` (a bad label, id, NaN, count, a repeated real
    id, or with ``mass_temperature`` a kept mass past 1): then nothing was written.

    ``student_logits``: CPU ``(N, V)`` or ``(B, S, V)`` rows (last-dim stride 1, float32 /
    float16 / bfloat16), read in place; ``grad`` None or a tensor of the same shape and dtype
    (last-dim stride 1; it may be the student's storage). ``indices`` / ``values`` / ``counts``
    ``(N, K)``, ``lse`` ``(N,)``, ``labels`` ``(N,)`` int64 or None. ``options``: temperature,
    soft_weight, hard_weight, divergence, beta, tail, ignore_index, teacher_labels (a
    ``fastkd.options.LossOptions``). ``total`` is the sum of the row losses as a float (divided
    by max(kept, 1) for ``reduction="batchmean"``, which also scales the gradient by it); a kept
    label outside ``[0, V)`` makes its row NaN."""
    num_classes = student_logits.shape[-1]
    num_rows = student_logits.numel() // max(num_classes, 1)
    num_kept = indices.shape[-1]
    row_loss = torch.empty(num_rows, dtype=torch.float32)
    total = ctypes.c_double(0.0)
    label_counts = (ctypes.c_int64 * 2)()
    call = SparseCall()
    indices = _rows_of(indices.reshape(num_rows, num_kept), _ID_CODES, torch.int64)
    call.ids, call.ids_stride, call.ids_dtype = (indices.data_ptr(), indices.stride(0),
                                                  _ID_CODES[indices.dtype])
    if counts is not None:
        counts = counts.reshape(num_rows, num_kept).to(torch.float32).contiguous()
        call.counts, call.counts_stride = counts.data_ptr(), counts.stride(0)
    else:
        values = _rows_of(values.reshape(num_rows, num_kept), DTYPE_CODES, torch.float32)
        lse = lse.reshape(num_rows).to(torch.float32).contiguous()
        call.values, call.values_stride = values.data_ptr(), values.stride(0)
        call.values_dtype = DTYPE_CODES[values.dtype]
        call.lse = lse.data_ptr()
    if options.teacher_labels:
        call.label_mode = _LABELS_TEACHER
    elif labels is not None:
        labels = labels.reshape(num_rows).to(torch.int64).contiguous()
        call.label_mode, call.labels = _LABELS_TENSOR, labels.data_ptr()
    rows_per_batch = set_rows(call, "student", student_logits)
    if grad is not None:
        set_rows(call, "grad", grad)
    call.row_loss = row_loss.data_ptr()
    call.total = ctypes.addressof(total)
    call.label_counts = ctypes.addressof(label_counts)
    call.num_rows, call.rows_per_batch = num_rows, rows_per_batch
    call.num_classes, call.num_kept = num_classes, num_kept
    call.ignore_index = options.ignore_index
    call.temperature, call.soft_weight = options.temperature, options.soft_weight
    call.hard_weight, call.beta = options.hard_weight, options.beta
    if isinstance(grad_scale, torch.Tensor):
        grad_scale = grad_scale.item()
    call.grad_scale = float(grad_scale)
    call.divergence = _DIVERGENCE_CODES[options.divergence]
    call.tail = _TAIL_CODES[options.tail]
    call.num_threads = thread_count(num_rows * num_classes)
    call.reduction = REDUCTIONS[reduction]
    call.check_values = bool(check_values)
    if mass_temperature is not None and counts is None:
        call.mass_temperature = float(mass_temperature)
        call.values_unit = torch.finfo(values.dtype).eps / 2
    if num_rows:
        status = _KERNEL(call)
        if status < 0:
            raise MemoryError(f"fastkd's sparse CPU kernel could not allocate its row buffers "
                              f"({num_classes} classes)")
        if status > 0 and check_values:
            return REFUSED, None, (label_counts[0], label_counts[1])
    return row_loss, total.value, (label_counts[0], label_counts[1])


def kd_sparse_cpu(student_logits, indices, values, lse, counts, labels, options, *, grad,
                  grad_scale=1.0, reduction="none", check_values=False, mass_temperature=None):
    """The one entry point, as ``fastkd.dispatch`` hands it out for CPU rows.
    ``reduction="none"``: the sparse backend contract (``fastkd.dispatch.SparseBackend``), row
    losses ``(N,)`` float32 with ``grad`` filled with ``grad_scale * d row_loss / dz_s``.
    ``"sum"`` / ``"batchmean"``: the whole loss in one call (0-d float32, the gradient of that
    reduction), with the data checks when ``check_values``: None when a row may fail one
    (nothing written: the caller runs the check that names it). ``mass_temperature``: the
    temperature of the kept-mass check, None to skip it."""
    row_loss, total, _ = kd_sparse_rows_cpu(
        student_logits, indices, values, lse, counts, labels, options, grad_scale=grad_scale,
        grad=grad, reduction=reduction, check_values=check_values,
        mass_temperature=mass_temperature)
    if row_loss is REFUSED:
        return None
    return row_loss if reduction == "none" else torch.tensor(total, dtype=torch.float32)


kd_sparse_cpu.reduces = True   # owns the reduction and the data checks (fastkd.sparse_loss)
