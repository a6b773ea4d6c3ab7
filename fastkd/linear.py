"""Fused linear + KD loss: the distillation loss from hidden states without ``(N, V)`` logits.

Orchestration only: the loss math is the fused KD kernel family behind ``fastkd.dispatch.dispatch``
(``fastkd.dispatch.DenseBackend`` / ``SparseBackend``), called on one chunk of rows at a
time. Per chunk of ``C`` kept rows (rows whose label is ``ignore_index`` are dropped before the
matmul, with ``index_select``)::

    r      = h W^T (+ b)                       (C, V)  torch matmul, fp32 accumulation
    z      = cap * tanh(scale * r / cap)       or z = scale * r without a softcap
    row_loss, g = kernel(z, teacher chunk)     g = d loss / dz, written in place into z
    g_r    = scale * g * (1 - tanh^2)          (1 - (z / cap)^2: the softcap's derivative)
    dL/dh  = g_r W                             (C, H)  rows of the hidden-state gradient
    dL/dW += g_r^T h                           (V, H)  float32 accumulator
    dL/db += sum_rows g_r

all in the forward pass; backward only scales these gradients by ``grad_output`` (except per-row
losses with a trainable head: the head's gradient is then weighted row by row, so backward runs
the chunked pass again with ``g`` scaled by ``grad_output``). A teacher given as a
:class:`~fastkd.targets.TeacherHead` gets its chunk logits made the same way (no gradient) and
dropped after the kernel has read them; a sparse teacher (``TopKLogits``, ``SampledTargets``)
goes with its chunk rows to the sparse kernel family (``dispatch(backend, "sparse")``), which
reads K entries per row and writes the dense student gradient the same way.

A softcap on a float16 / bfloat16 side (student or teacher head) runs in float32, as in a loss
that upcasts its chunk logits before capping (TRL's chunked loss): ``r`` is the matmul's
low-precision result, ``z`` a float32 chunk buffer, the kernel reads it in float32 and writes
``g`` over it, ``g * (1 - tanh^2(scale * r / cap))`` is formed in float32 (the tanh recomputed
from ``r`` in blocks of rows) and rounded once to the low dtype for the matmuls. Peak extra
memory: for the student one ``C x V`` buffer, two with a softcap (float32: ``g`` beside ``z``;
low precision: ``r`` beside the float32 ``z``), one for a teacher head's logits (two with a
low-precision softcap), plus the gradients themselves; independent of ``N``.

``C`` comes from ``chunk_budget_bytes`` or ``chunk_rows`` (see :func:`linear_kd_loss`). The
chunked pass itself (chunk planning, logit transforms, the loop above) is
:mod:`fastkd.linear_chunks`; this module holds the family's part in the shared autograd wiring
(fastkd/autograd.py) and the public API. Under ``torch.autocast`` the chunk logits are in the
autocast dtype (bf16 / fp16, as ``F.linear`` gives under autocast: same numbers as the unfused
path, half the buffer); the kernel accumulates in float32, the logits gradient is rounded once to
that dtype, and the weight and bias gradients are accumulated over chunks in float32 and
returned in the parameters' dtypes.
"""
from typing import Optional, Union

import torch

from fastkd.autograd import Family, register_family, run_loss
from fastkd.checks import (TEACHER_EXTRA_COLUMNS, check_choice, check_chunking, check_labels,
                           check_linear_head, check_logit_transform, check_logits,
                           check_sparse_options)
from fastkd.linear_chunks import (DEFAULT_CHUNK_BUDGET_BYTES, TEACHER_HEAD, TEACHER_LOGITS,
                                  TEACHER_SAMPLED, TEACHER_TOPK, LinearOptions, fused_forward)
from fastkd.options import LossOptions
from fastkd.targets import (SPARSE_TARGETS, SampledTargets, TeacherHead, TopKLogits,
                            check_sparse_target)

__all__ = ["linear_kd_loss", "LinearKDLoss", "DEFAULT_CHUNK_BUDGET_BYTES"]


# ----------------------------------------------------------------------------- autograd
def _linear_forward(tensors, opts: LinearOptions, needs_grad, grad_buffer=None,
                    defer_check=False, row_weights=None):
    """The fused linear family's forward (the contract in fastkd/autograd.py) of ``tensors =
    (hidden (N, H), weight, bias, teacher parts 0-2, labels)``: :func:`fused_forward` without
    autograd or autocast. The forward pass of per-row losses with a trainable head leaves the
    head's gradients to the second pass."""
    if row_weights is None and opts.second_pass:
        opts = opts.replace(needs_weight=False, needs_bias=False)
    with torch.no_grad(), torch.autocast(tensors[0].device.type, enabled=False):
        loss, *grads = fused_forward(tensors[0], tensors[1], tensors[2], tensors[3:6],
                                     tensors[6], opts, row_weights=row_weights)
    wanted = (opts.needs_hidden, opts.needs_weight, opts.needs_bias)
    return loss, tuple(grad if want else None for grad, want in zip(grads, wanted)), None


def _grads_in_forward(opts: LinearOptions, needs_grad):
    in_forward = not opts.second_pass
    return opts.needs_hidden, opts.needs_weight and in_forward, opts.needs_bias and in_forward


def _second_pass(tensors, opts: LinearOptions, grad_output):
    """The head's gradients of per-row losses: the chunked pass again, each row's logits
    gradient times ``grad_output[row]``."""
    _, (_, grad_weight, grad_bias), _ = _linear_forward(
        tensors, opts.replace(needs_hidden=False), True, row_weights=grad_output.float())
    return grad_weight, grad_bias


register_family("linear", Family(_linear_forward, LinearOptions, _grads_in_forward,
                                 _second_pass, lambda opts: (opts.needs_weight, opts.needs_bias)))


# ----------------------------------------------------------------------------- public API
def _autocast_dtype(device: torch.device) -> str:
    """The autocast dtype's name when autocast is on for ``device``'s type, else ''."""
    if torch.is_autocast_enabled(device.type):
        return str(torch.get_autocast_dtype(device.type)).replace("torch.", "")
    return ""


def _check_teacher(teacher, leading, num_classes, device, teacher_extra_columns):
    """Teacher checks (metadata only; a sparse teacher's values are checked in the op). Returns
    a sparse target's temperature (None for the other kinds)."""
    if isinstance(teacher, SPARSE_TARGETS):   # shapes against the student logits' leading dims
        # the shared checks read only the leading dims and device of an empty logits probe
        probe = torch.empty(tuple(leading) + (0,), device=device)
        return check_sparse_target("teacher", teacher, probe, num_classes)
    if isinstance(teacher, TeacherHead):
        if tuple(teacher.hidden.shape[:-1]) != tuple(leading):
            raise ValueError(
                f"teacher.hidden must have the leading dims {tuple(leading)} of student_hidden, "
                f"got {tuple(teacher.hidden.shape)}")
        teacher_device, teacher_classes = teacher.hidden.device, teacher.num_classes
    elif isinstance(teacher, torch.Tensor):
        check_logits("teacher", teacher)
        if tuple(teacher.shape[:-1]) != tuple(leading):
            raise ValueError(
                f"teacher logits must have shape (..., V_t) with the leading dims "
                f"{tuple(leading)} of student_hidden, got {tuple(teacher.shape)}")
        teacher_device, teacher_classes = teacher.device, teacher.shape[-1]
    else:
        raise TypeError("teacher must be dense teacher logits (a tensor (..., V)), a "
                        "fastkd.TeacherHead, TopKLogits or SampledTargets, got "
                        f"{type(teacher).__name__}")
    if teacher_device != device:
        raise ValueError(f"teacher must be on student_hidden's device {device}, got "
                         f"{teacher_device}")
    if teacher_classes < num_classes:
        raise ValueError(f"the teacher's vocabulary ({teacher_classes}) is smaller than the "
                         f"student's (V = {num_classes} rows of student_weight)")
    if teacher_classes > num_classes and teacher_extra_columns == "error":
        raise ValueError(
            f"the teacher's vocabulary ({teacher_classes}) is wider than the student's "
            f"({num_classes}); if the extra columns are padding (e.g. an embedding matrix "
            "padded to a multiple of 64), pass teacher_extra_columns='drop' to use the first "
            f"{num_classes} teacher columns")
    return None


def linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                   teacher: Union[torch.Tensor, TeacherHead, TopKLogits, SampledTargets],
                   labels: Union[torch.Tensor, str, None] = None, *,
                   student_bias: Optional[torch.Tensor] = None, student_logit_scale: float = 1.0,
                   student_softcap: Optional[float] = None, chunk_rows: Optional[int] = None,
                   chunk_budget_bytes: Optional[int] = None,
                   teacher_extra_columns: str = "error", tail: str = "bucket",
                   temperature: float = 1.0, soft_weight: float = 0.5, hard_weight: float = 0.5,
                   divergence: str = "forward_kl", beta: float = 0.5, ignore_index: int = -100,
                   reduction: str = "batchmean", backend: str = "auto") -> torch.Tensor:
    """:func:`fastkd.kd_loss` of the student logits ``softcap(logit_scale * (student_hidden @
    student_weight.T + student_bias))`` against ``teacher``, without ever holding the ``(N, V)``
    logits: rows are processed in chunks (matmul, fused KD kernel, matmuls for the gradients).

    Args:
        student_hidden: ``(..., H)`` last hidden states (float32/float16/bfloat16).
        student_weight: ``(V, H)`` the output layer (``lm_head.weight``; tied embeddings too).
        teacher: dense teacher logits ``(..., V_t)``, a :class:`fastkd.TeacherHead`
            (the teacher's hidden states and output layer; its logits are made per chunk too),
            or a sparse teacher, :class:`fastkd.TopKLogits` / :class:`fastkd.SampledTargets`
            ``(..., K)`` (the sparse kernels of :func:`fastkd.kd_loss`, with ``tail``).
            A constant: no gradient flows into it.
        labels: ``(...)`` class ids (``ignore_index`` rows are dropped before the matmul),
            ``"teacher"`` or None, as in :func:`fastkd.kd_loss`.
        student_bias: ``(V,)`` or None.
        student_logit_scale: logits times this (Cohere's ``logit_scale``), before the softcap.
        student_softcap: None or ``cap``: logits ``cap * tanh(z / cap)`` (Gemma-2's
            ``final_logit_softcapping``), computed in float32 for float16 / bfloat16 heads.
            (The teacher's are set on its ``TeacherHead``.)
        chunk_rows: rows per chunk; overrides ``chunk_budget_bytes``.
        chunk_budget_bytes: memory for the chunk-sized buffers together (student chunk logits,
            their gradient or raw logits when there is a softcap, a teacher head's chunk
            logits). None (the default): ``DEFAULT_CHUNK_BUDGET_BYTES`` (256 MiB) for the
            student's buffers and as much again for a teacher head's, and at most 1024 rows
            per chunk.
        teacher_extra_columns: ``"error"`` (default) when the teacher's vocabulary is wider than
            the student's, or ``"drop"`` to use its first V columns (padding columns of an
            embedding matrix).
        tail, temperature, soft_weight, hard_weight, divergence, beta, ignore_index, reduction,
            backend: as in :func:`fastkd.kd_loss` (``tail`` for sparse teachers only).
            ``reduction="none"`` gives per-row losses ``(...)``; with a trainable head, whose
            gradient is a sum over rows weighted by the incoming per-row gradient, backward
            makes that gradient in a second chunked pass (the forward's cost again), since it
            cannot be summed before the weights are known.

    Returns:
        float32 scalar, or ``(...)`` float32 for ``reduction="none"``.

    Gradients reach ``student_hidden``, ``student_weight`` and ``student_bias`` when they require
    grad (a frozen or LoRA-wrapped head works), in their own dtypes.
    """
    check_linear_head("student_", student_hidden, student_weight, student_bias)
    student_logit_scale, student_softcap = check_logit_transform(
        "student_", student_logit_scale, student_softcap)
    check_chunking(chunk_rows, chunk_budget_bytes)
    check_choice("teacher_extra_columns", teacher_extra_columns, TEACHER_EXTRA_COLUMNS)
    leading = student_hidden.shape[:-1]
    device = student_hidden.device
    num_classes = student_weight.shape[0]
    options = LossOptions.build(
        temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
        divergence=divergence, beta=beta, ignore_index=ignore_index, reduction=reduction,
        backend=backend, tail=tail, labels=labels, device=device)
    check_labels(labels, leading, device)
    target_temperature = _check_teacher(teacher, leading, num_classes, device,
                                        teacher_extra_columns)
    if isinstance(teacher, SPARSE_TARGETS):
        check_sparse_options(options.divergence, tail, isinstance(teacher, SampledTargets),
                             options.temperature, target_temperature)

    grad_on = torch.is_grad_enabled()
    teacher_scale, teacher_softcap = 1.0, None
    if isinstance(teacher, TeacherHead):
        teacher_kind = TEACHER_HEAD
        teacher_parts = (teacher.hidden.reshape(-1, teacher.hidden.shape[-1]), teacher.weight,
                         teacher.bias)
        teacher_scale, teacher_softcap = teacher.logit_scale, teacher.softcap
    elif isinstance(teacher, SPARSE_TARGETS):
        num_ids = teacher.indices.shape[-1]

        def rows_of(part):   # (..., K) -> (N, K); lse (...) -> (N,)
            return part.detach().reshape((-1, num_ids) if part.dim() > len(leading) else (-1,))
        if isinstance(teacher, TopKLogits):   # (indices, values, lse)
            teacher_kind = TEACHER_TOPK
            teacher_parts = tuple(rows_of(part)
                                  for part in (teacher.indices, teacher.values, teacher.lse))
        else:                                   # (indices, counts, None)
            teacher_kind = TEACHER_SAMPLED
            teacher_parts = (rows_of(teacher.indices), rows_of(teacher.counts), None)
    else:
        teacher_kind = TEACHER_LOGITS
        teacher_parts = (teacher.detach().reshape(-1, teacher.shape[-1]), None, None)
    opts = LinearOptions(
        options, teacher_kind, num_classes, student_logit_scale, student_softcap, teacher_scale,
        teacher_softcap, _autocast_dtype(device), chunk_rows or 0, int(chunk_budget_bytes or 0),
        needs_hidden=grad_on and student_hidden.requires_grad,
        needs_weight=grad_on and student_weight.requires_grad,
        needs_bias=grad_on and student_bias is not None and student_bias.requires_grad)
    labels_1d = labels.reshape(-1) if isinstance(labels, torch.Tensor) else None
    tensors = (student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight,
               student_bias, *teacher_parts, labels_1d)
    loss = run_loss("linear", tensors, opts,
                    requires_grad=opts.needs_hidden or opts.needs_weight or opts.needs_bias)
    return loss.reshape(leading) if reduction == "none" else loss


class LinearKDLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`linear_kd_loss`; keyword options fixed at construction.

    ``forward(student_hidden, student_weight, teacher, labels=None, student_bias=None)``.
    """

    def __init__(self, *, student_logit_scale: float = 1.0, student_softcap: Optional[float] = None,
                 chunk_rows: Optional[int] = None,
                 chunk_budget_bytes: Optional[int] = None,
                 teacher_extra_columns: str = "error", tail: str = "bucket",
                 temperature: float = 1.0, soft_weight: float = 0.5, hard_weight: float = 0.5,
                 divergence: str = "forward_kl", beta: float = 0.5, ignore_index: int = -100,
                 reduction: str = "batchmean", backend: str = "auto"):
        super().__init__()
        check_logit_transform("student_", student_logit_scale, student_softcap)
        check_chunking(chunk_rows, chunk_budget_bytes)
        check_choice("teacher_extra_columns", teacher_extra_columns, TEACHER_EXTRA_COLUMNS)
        LossOptions.build(temperature=temperature, soft_weight=soft_weight,
                          hard_weight=hard_weight, divergence=divergence, beta=beta,
                          ignore_index=ignore_index, reduction=reduction, backend=backend,
                          tail=tail)
        self.options = dict(tail=tail,
            student_logit_scale=student_logit_scale, student_softcap=student_softcap,
            chunk_rows=chunk_rows, chunk_budget_bytes=chunk_budget_bytes,
            teacher_extra_columns=teacher_extra_columns, temperature=temperature,
            soft_weight=soft_weight, hard_weight=hard_weight, divergence=divergence, beta=beta,
            ignore_index=ignore_index, reduction=reduction, backend=backend)

    def forward(self, student_hidden, student_weight, teacher, labels=None, student_bias=None):
        return linear_kd_loss(student_hidden, student_weight, teacher, labels,
                              student_bias=student_bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
