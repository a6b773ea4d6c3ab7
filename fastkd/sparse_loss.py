"""The KD loss against a sparse teacher (:class:`~fastkd.TopKLogits`,
:class:`~fastkd.SampledTargets`): argument checks, autograd wiring (a ``torch.library`` custom
op under ``torch.compile``, so the compiler sees no graph break; a plain
``torch.autograd.Function`` in eager) and the entry :func:`sparse_kd_loss`, which
:func:`fastkd.kd_loss` calls when ``teacher_logits`` is a sparse target.

Math (rows flattened, student logits ``(N, V)``, teacher K entries per row, ``u = z_s / T``,
``p_s = softmax(u)`` over all V classes)::

    row_loss = soft_weight * T^2 * D(P, Q) + hard_weight * CE(z_s, y)

over buckets (see ``kernels/kd_sparse.py`` for every gradient):

* ``tail="bucket"``: K + 1 categories, the K teacher ids and one for the rest.
  Top-k: ``P_k = exp(v_k / T - lse)``, ``P_rest = 1 - sum_k P_k`` (exact when ``lse`` is the
  log-sum-exp of the full row at temperature T). Sampled: ``P_k = c_k / sum c``, ``P_rest = 0``.
  Student: ``Q_k = p_s(id_k)``, ``Q_rest = sum_{j not in ids} p_s(j)``. With K = V this is dense KD.
* ``tail="renormalize"``: K categories, ``P = softmax(v / T)``, ``Q = softmax(z_s[ids] / T)``
  over the K ids (axolotl's normalize_topk, NeMo-RL's default); no lse needed; 0 gradient elsewhere.
* ``tail="ignore"``: forward KL only, ``sum_k P_k log(P_k / Q_k)`` with the bucket ``P_k``,
  ``Q_k`` (verl's truncated KL); ``dD/du_j = p_s(j) sum_k P_k - [j in ids] P_j``.

The gradient with respect to the student logits is computed in the forward pass (dense over V)
and kept; backward scales it by ``grad_output``. Backends follow ``_SPARSE_BACKEND_CONTRACT``
and are chosen by :func:`fastkd.dispatch.dispatch` (family ``"sparse"``).
"""
from typing import Optional

import torch

from fastkd.checks import (check_inplace_target, check_labels, check_logits, check_options,
                           check_sparse_options, check_sparse_target, check_sparse_values)
from fastkd.loss import register_grad_in_forward_autograd
from fastkd.targets import SampledTargets

__all__ = ["sparse_kd_loss"]

_SPARSE_BACKEND_CONTRACT = """
kd_sparse_forward(student_logits, indices, values, lse, counts, labels, *, teacher_labels,
                  temperature, soft_weight, hard_weight, divergence, beta, tail, ignore_index,
                  grad_scale, grad) -> row_loss

student_logits: (N, V) floating, last-dim stride 1, or (B, S, V) rows (e.g. a logits[:, :-1]
    view) that the backend reads in place or flattens itself (grad then has the same shape).
indices: (N, K) integer, last-dim stride 1, ids in [0, V), unique within a row among its real
    entries. Top-k targets: values (N, K) floating (no NaN; -inf entries are padding: not kept
    ids, their classes in the rest bucket) and lse (N,) float32, counts None. Sampled targets:
    counts (N, K) (>= 0, positive row sums; count-0 entries are padding), values and lse None.
labels: (N,) int64 contiguous or None; teacher_labels: bool (labels None; the hard label is the id
    of the row's first largest real value / count; a row without real entries has no hard term).
divergence: forward_kl, reverse_kl or jsd with 0 < beta < 1; tail: bucket, renormalize, ignore
    (the option combinations are checked before: fastkd.checks.check_sparse_options).
Rows whose label == ignore_index get row_loss 0 and a zero gradient row.
grad: None or an (N, V) tensor of the student's dtype, last-dim stride 1, possibly the student
    tensor itself; filled with grad_scale * d row_loss / dz_s. Returns (N,) float32 row losses.
"""

_LABEL_NONE, _LABEL_TENSOR, _LABEL_TEACHER = 0, 1, 2


def _sparse_forward_impl(student_2d, indices, values, lse, counts, labels_1d, label_mode,
                         temperature, soft_weight, hard_weight, divergence, beta, tail,
                         ignore_index, reduction, backend, needs_grad, grad_buffer=None):
    """Value checks (one host sync), then the backend; returns (loss, grad) like the dense
    ``fastkd.loss._forward_impl``. A backend with a ``whole_loss`` entry (the CPU kernel) checks
    the data, counts the kept rows and reduces in the same call; when it finds a row that may
    fail a check, :func:`check_sparse_values` runs and names the problem."""
    from fastkd.dispatch import dispatch as _dispatch
    num_classes = student_2d.shape[-1]
    implementation = _dispatch(backend, "sparse", student_2d.device)
    if student_2d.stride(-1) != 1:
        student_2d = student_2d.contiguous()
    grad = None
    if needs_grad:
        grad = grad_buffer if grad_buffer is not None else torch.empty(
            student_2d.shape, dtype=student_2d.dtype, device=student_2d.device)
    empty_grad = grad if grad is not None else student_2d.new_empty((0,))
    mass_temperature = None if tail == "renormalize" else temperature
    whole_loss = getattr(implementation, "whole_loss", None)
    if whole_loss is not None:
        loss = whole_loss(
            student_2d, indices, values, lse, counts,
            labels_1d if label_mode == _LABEL_TENSOR else None,
            teacher_labels=label_mode == _LABEL_TEACHER, temperature=temperature,
            soft_weight=soft_weight, hard_weight=hard_weight, divergence=divergence, beta=beta,
            tail=tail, ignore_index=ignore_index, reduction=reduction, grad=grad,
            mass_temperature=mass_temperature)
        if loss is not None:
            return loss, empty_grad
    labels_1d, kept = check_sparse_values(
        indices, num_classes, values=values, lse=lse, counts=counts,
        labels=labels_1d if label_mode == _LABEL_TENSOR else None, ignore_index=ignore_index,
        temperature=mass_temperature)
    if labels_1d is not None:
        labels_1d = labels_1d.contiguous()
    grad_scale = 1.0 / kept if (reduction == "batchmean" and kept > 0) else 1.0
    indices, values, lse, counts = (
        None if part is None else part.contiguous() for part in (indices, values, lse, counts))
    if lse is not None:
        lse = lse.float()
    row_loss = implementation(
        student_2d, indices, values, lse, counts, labels_1d,
        teacher_labels=label_mode == _LABEL_TEACHER, temperature=temperature,
        soft_weight=soft_weight, hard_weight=hard_weight, divergence=divergence, beta=beta,
        tail=tail, ignore_index=ignore_index, grad_scale=grad_scale, grad=grad)
    loss = row_loss if reduction == "none" else row_loss.sum() * grad_scale
    return loss, empty_grad


# ----------------------------------------------------------------------------- autograd (custom op)
@torch.library.custom_op("fastkd::kd_sparse_loss_forward", mutates_args=())
def _kd_sparse_loss_op(student_logits: torch.Tensor, indices: torch.Tensor,
                       values: Optional[torch.Tensor], lse: Optional[torch.Tensor],
                       counts: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                       label_mode: int, temperature: float, soft_weight: float,
                       hard_weight: float, divergence: str, beta: float, tail: str,
                       ignore_index: int, reduction: str, backend: str,
                       needs_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    loss, grad = _sparse_forward_impl(student_logits, indices, values, lse, counts, labels,
                                      label_mode, temperature, soft_weight, hard_weight,
                                      divergence, beta, tail, ignore_index, reduction, backend,
                                      needs_grad)
    return loss.clone() if loss._base is not None else loss, grad


@_kd_sparse_loss_op.register_fake
def _(student_logits, indices, values, lse, counts, labels, label_mode, temperature,
      soft_weight, hard_weight, divergence, beta, tail, ignore_index, reduction, backend,
      needs_grad):
    loss_shape = (student_logits.shape[0],) if reduction == "none" else ()
    loss = student_logits.new_empty(loss_shape, dtype=torch.float32)
    grad = student_logits.new_empty(student_logits.shape if needs_grad else (0,))
    return loss, grad


_NUM_INPUTS = 17


register_grad_in_forward_autograd(_kd_sparse_loss_op, _NUM_INPUTS, reduction_index=14)


class _SparseKDLossFunction(torch.autograd.Function):
    """Eager autograd wiring (as for dense teachers: no custom-op dispatch, nothing of
    torch._dynamo imported): the gradient made in forward is saved and scaled in backward. With
    ``grad_inplace`` it is written into the student logits' own storage."""

    @staticmethod
    def forward(ctx, student_2d, grad_inplace, *args):
        loss, grad = _sparse_forward_impl(student_2d, *args, True,
                                          grad_buffer=student_2d if grad_inplace else None)
        if grad_inplace:
            # the logits' values are gone: any other saved use of them must fail loudly
            torch.autograd.graph.increment_version(student_2d)
        ctx.save_for_backward(grad)
        ctx.per_row = args[13] == "none"
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        from fastkd.loss import _scale_grad
        (grad,) = ctx.saved_tensors
        return (_scale_grad(grad, grad_output, ctx.per_row),) + (None,) * (_NUM_INPUTS - 1)


# ----------------------------------------------------------------------------- entry point
def _student_rows(student_logits):
    """The student as (N, V) rows, or as (B, S, V) when its leading dims do not merge into one
    (e.g. a ``logits[:, :-1]`` view): a view either way (the CPU kernel reads it in place; the
    other backends flatten it), a copy only for a last dim of stride != 1 or leading dims that
    merge into neither."""
    num_classes = student_logits.shape[-1]
    if student_logits.stride(-1) != 1 and num_classes > 1:
        student_logits = student_logits.contiguous()
    if student_logits.dim() >= 2:
        try:
            return student_logits.view(-1, num_classes)
        except RuntimeError:
            pass
        try:
            return student_logits.view(-1, student_logits.shape[-2], num_classes)
        except RuntimeError:
            pass
    return student_logits.reshape(-1, num_classes)


def sparse_kd_loss(student_logits, teacher, labels, *, tail, temperature, soft_weight,
                   hard_weight, divergence, beta, ignore_index, reduction, backend,
                   grad_inplace):
    """:func:`fastkd.kd_loss` with a ``TopKLogits`` / ``SampledTargets`` teacher (same
    arguments; see its docstring and this module's for the math)."""
    from fastkd.dispatch import resolve_backend as _resolve_backend
    check_logits("student_logits", student_logits)
    target_temperature = check_sparse_target("teacher_logits", teacher, student_logits)
    check_labels(labels, student_logits.shape[:-1], student_logits.device)
    check_options(temperature, soft_weight, hard_weight, divergence, beta, ignore_index,
                  reduction, backend)
    if divergence == "jsd" and beta == 0.0:   # TRL GKD / Liger convention, as for dense
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    sampled = isinstance(teacher, SampledTargets)
    check_sparse_options(divergence, tail, sampled, float(temperature), target_temperature)
    resolved = _resolve_backend(backend, student_logits.device)

    leading = student_logits.shape[:-1]
    num_classes = student_logits.shape[-1]
    student_2d = _student_rows(student_logits)
    num_kept = teacher.indices.shape[-1]
    indices = teacher.indices.detach().reshape(-1, num_kept)
    if sampled:
        values = lse = None
        counts = teacher.counts.detach().reshape(-1, num_kept)
    else:
        values = teacher.values.detach().reshape(-1, num_kept)
        lse = teacher.lse.detach().reshape(-1)
        counts = None
    if isinstance(labels, torch.Tensor):
        label_mode, labels_1d = _LABEL_TENSOR, labels.reshape(-1)
    else:
        label_mode = _LABEL_TEACHER if labels == "teacher" else _LABEL_NONE
        labels_1d = None
    args = (indices, values, lse, counts, labels_1d, label_mode, float(temperature),
            float(soft_weight), float(hard_weight), divergence, float(beta), tail,
            int(ignore_index), reduction, resolved)
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if torch.compiler.is_compiling():
        if grad_inplace and needs_grad:
            raise ValueError("grad_inplace=True is not supported under torch.compile")
        loss, _ = _kd_sparse_loss_op(student_2d.reshape(-1, num_classes), *args, needs_grad)
    elif needs_grad:
        if grad_inplace:
            if student_2d.data_ptr() != student_logits.data_ptr() or student_2d.stride(-1) != 1:
                raise ValueError("grad_inplace=True needs student_logits whose rows are a view "
                                 "(last-dim stride 1, leading dims flattenable without a copy)")
            check_inplace_target(student_2d, *(("teacher_logits." + name, part) for name, part
                                               in zip(("indices", "values", "lse", "counts"),
                                                      args[:4])))
        loss = _SparseKDLossFunction.apply(student_2d, bool(grad_inplace), *args)
    else:
        loss, _ = _sparse_forward_impl(student_2d, *args, False)
    return loss.reshape(leading) if reduction == "none" else loss
