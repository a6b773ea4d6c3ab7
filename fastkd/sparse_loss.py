"""The KD loss against a sparse teacher (:class:`~fastkd.TopKLogits`,
:class:`~fastkd.SampledTargets`): argument checks, the forward pass of the sparse family and the
entry :func:`sparse_kd_loss`, which :func:`fastkd.kd_loss` calls when ``teacher_logits`` is a
sparse target.

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
and kept; backward scales it by ``grad_output`` (fastkd/autograd.py). Backends follow
``fastkd.dispatch.SparseBackend`` and are chosen by :func:`fastkd.dispatch.dispatch` (family
``"sparse"``).
"""
import torch

from fastkd.autograd import Family, register_family, run_loss
from fastkd.checks import (check_labels, check_logits, check_sparse_options,
                           check_sparse_values)
from fastkd.dispatch import dispatch
from fastkd.options import LossOptions
from fastkd.rows import row_views
from fastkd.targets import SampledTargets, check_sparse_target

__all__ = ["sparse_kd_loss", "sparse_forward"]


def sparse_forward(tensors, options, needs_grad, grad_buffer=None, defer_check=False):
    """The sparse family's forward (the contract in fastkd/autograd.py) of ``tensors = (student
    rows, indices, values, lse, counts, labels (N,) or None, _)``: value checks (one host sync),
    then the backend; ``(loss, (grad, None, None), None)``. A backend that ``reduces`` (the CPU
    kernel) checks the data, counts the kept rows and reduces in the same call; when it finds
    a row that may fail a check, :func:`check_sparse_values` runs and names the problem."""
    student_rows, indices, values, lse, counts, labels_1d = tensors[:6]
    num_classes = student_rows.shape[-1]
    implementation = dispatch(options.backend, "sparse", student_rows.device, student_rows)
    if student_rows.stride(-1) != 1:
        student_rows = student_rows.contiguous()
    grad = None
    if needs_grad:
        grad = grad_buffer if grad_buffer is not None else torch.empty(
            student_rows.shape, dtype=student_rows.dtype, device=student_rows.device)
    mass_temperature = None if options.tail == "renormalize" else options.temperature
    if getattr(implementation, "reduces", False):
        loss = implementation(
            student_rows, indices, values, lse, counts, labels_1d, options, grad=grad,
            reduction=options.reduction, check_values=True, mass_temperature=mass_temperature)
        if loss is not None:
            return loss, (grad, None, None), None
    labels_1d, kept = check_sparse_values(
        indices, num_classes, values=values, lse=lse, counts=counts, labels=labels_1d,
        ignore_index=options.ignore_index, temperature=mass_temperature)
    if labels_1d is not None:
        labels_1d = labels_1d.contiguous()
    grad_scale = 1.0 / kept if (options.reduction == "batchmean" and kept > 0) else 1.0
    indices, values, lse, counts = (
        None if part is None else part.contiguous() for part in (indices, values, lse, counts))
    if lse is not None:
        lse = lse.float()
    rows, rows_grad = student_rows, grad
    if student_rows.dim() == 3:   # (B, S, V): flattened (a copy when not mergeable)
        rows = student_rows.reshape(-1, num_classes)
        rows_grad = None if grad is None else grad.reshape(-1, num_classes)
    row_loss = implementation(rows, indices, values, lse, counts, labels_1d, options,
                              grad=rows_grad, grad_scale=grad_scale)
    if grad is not None and rows_grad.data_ptr() != grad.data_ptr():
        grad.copy_(rows_grad.view(grad.shape))   # grad was not a view of the rows
    loss = row_loss if options.reduction == "none" else row_loss.sum() * grad_scale
    return loss, (grad, None, None), None


register_family("sparse", Family(sparse_forward, LossOptions))


def sparse_kd_loss(student_logits, teacher, labels, *, tail, temperature, soft_weight,
                   hard_weight, divergence, beta, ignore_index, reduction, backend,
                   grad_inplace):
    """:func:`fastkd.kd_loss` with a ``TopKLogits`` / ``SampledTargets`` teacher (same
    arguments; see its docstring and this module's for the math)."""
    check_logits("student_logits", student_logits)
    target_temperature = check_sparse_target("teacher_logits", teacher, student_logits)
    check_labels(labels, student_logits.shape[:-1], student_logits.device)
    options = LossOptions.build(
        temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
        divergence=divergence, beta=beta, ignore_index=ignore_index, reduction=reduction,
        backend=backend, tail=tail, labels=labels, device=student_logits.device)
    sampled = isinstance(teacher, SampledTargets)
    check_sparse_options(options.divergence, tail, sampled, options.temperature,
                         target_temperature)
    num_kept = teacher.indices.shape[-1]
    def rows(part, shape=(-1, num_kept)):
        return part.detach().reshape(shape)
    parts = (rows(teacher.indices), None, None, rows(teacher.counts)) if sampled else \
        (rows(teacher.indices), rows(teacher.values), rows(teacher.lse, (-1,)), None)
    labels_1d = labels.reshape(-1) if isinstance(labels, torch.Tensor) else None
    loss = run_loss("sparse", row_views(student_logits) + parts + (labels_1d,), options,
                    requires_grad=student_logits.requires_grad, grad_inplace=grad_inplace,
                    student_logits=student_logits,
                    part_names=tuple("teacher_logits." + name
                                     for name in ("indices", "values", "lse", "counts")))
    return loss.reshape(student_logits.shape[:-1]) if reduction == "none" else loss
