"""The sparse-teacher KD loss in plain PyTorch: the math of the sparse kernels
(kernels/kd_sparse.py, kernels/kd_sparse_cpu.c) and the backend that runs where they do not
(``backend="torch"`` on a GPU, an install without a C compiler). Same buckets, same formulas,
same numbers; the gradient is written out by formula during the forward pass. Follows
``fastkd.dispatch.SparseBackend`` on ``(N, V)`` rows; rows go in chunks of at most
``CHUNK_ELEMENTS`` student elements. The teacher side is ``(C, K)`` throughout.

Per chunk (``u = z_s / T``, ``e = exp((z_s - max z_s) / T)``, ``S`` = the K teacher ids):

* student statistics: ``e`` into a work buffer; in bucket mode its kept columns are zeroed (a
  scatter), so ``R = sum e`` is the exact rest sum and ``Q_rest = R / (R + sum_k e_k)`` has no
  ``1 - sum`` cancellation.
* bucket math on ``(C, K)``: :func:`bucket_terms` (loss, ``dD/du`` at the kept ids, and the
  coefficient ``c`` with ``dD/du_j = p_s(j) c`` outside S); the formulas are in the kernel
  module's docstring.
* gradient: ``p_s * c`` (+ the hard-CE term) over the whole chunk in one write, then a scatter of
  the kept columns' own gradient.

Count-0 entries of sampled targets and ``-inf`` values of top-k targets are padding: they are no
bucket (their class stays in the rest bucket) and are never written (their scatter is redirected
to the row's first real entry, with that entry's value; in a row without real entries it writes
back the value already there).
"""
import math
from typing import Optional

import torch

from fastkd.reference_dense import CHUNK_ELEMENTS

__all__ = ["kd_sparse_torch", "bucket_terms"]

_MINUS_INF = float("-inf")


def _xlogy(weight, log_weight, log_other):
    """weight * (log_weight - log_other) with 0 * anything = 0."""
    return torch.where(weight == 0, torch.zeros_like(weight), weight * (log_weight - log_other))


def _log_mixture(log_q, log_p, beta):
    """log(beta p + (1 - beta) q) without underflow (logaddexp of the two weighted terms)."""
    return torch.logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)


def bucket_terms(log_q, log_p, active, log_q_rest, has_rest, sampled, divergence, beta, tail,
                 full=None):
    """The K-sized part of the loss, for ``(C, K)`` student / teacher bucket log-masses.
    ``full`` (C,) bool: rows whose real ids cover every class (their rest bucket is empty).

    Returns ``(divergence (C,), kept_du (C, K), coef_rest (C,))`` with ``dD/du`` at the kept ids
    and ``dD/du_j = p_s(j) * coef_rest`` outside S (``coef_rest`` is 0 where the student rest
    mass is 0: every p_s(j) there is 0 too)."""
    log_q = log_q.masked_fill(~active, _MINUS_INF)
    log_p = log_p.masked_fill(~active, _MINUS_INF)
    q_kept, p_kept = log_q.exp(), log_p.exp()
    rows = log_q.shape[0]
    coef_rest = log_q.new_zeros(rows)
    zero = torch.zeros_like(q_kept)
    if has_rest:
        if sampled:
            p_rest = log_q.new_zeros(rows)
        else:
            p_rest = (1.0 - p_kept.sum(1)).clamp_min(0.0)
            if full is not None:
                p_rest = p_rest.masked_fill(full, 0.0)
        log_p_rest = p_rest.log()
        q_rest = log_q_rest.exp()
    if divergence == "forward_kl":
        div = _xlogy(p_kept, log_p, log_q).sum(1)
        p_total = p_kept.sum(1)
        if has_rest:
            div = div + _xlogy(p_rest, log_p_rest, log_q_rest)
            p_total = p_total + p_rest
            coef_rest = p_total - (log_p_rest - log_q_rest).exp()
        if tail == "ignore":
            coef_rest = p_total
        kept_du = q_kept * p_total.unsqueeze(1) - p_kept
    elif divergence == "reverse_kl":
        div = _xlogy(q_kept, log_q, log_p).sum(1)
        if has_rest:
            div = div + _xlogy(q_rest, log_q_rest, log_p_rest)
            coef_rest = log_q_rest - log_p_rest - div
        kept_du = torch.where(q_kept == 0, zero,
                              q_kept * (log_q - log_p - div.unsqueeze(1)))
    else:  # jsd, 0 < beta < 1
        log_m = _log_mixture(log_q, log_p, beta)
        g_kept = (1.0 - beta) * (log_q - log_m)
        student_dot_g = torch.where(q_kept == 0, zero, q_kept * g_kept).sum(1)
        teacher_term = _xlogy(p_kept, log_p, log_m).sum(1)
        if has_rest:
            log_m_rest = _log_mixture(log_q_rest, log_p_rest, beta)
            g_rest = (1.0 - beta) * (log_q_rest - log_m_rest)
            student_dot_g = student_dot_g + torch.where(
                q_rest == 0, torch.zeros_like(q_rest), q_rest * g_rest)
            teacher_term = teacher_term + _xlogy(p_rest, log_p_rest, log_m_rest)
            coef_rest = g_rest - student_dot_g
        div = beta * teacher_term + student_dot_g
        kept_du = torch.where(q_kept == 0, zero,
                              q_kept * (g_kept - student_dot_g.unsqueeze(1)))
    if has_rest:
        coef_rest = torch.where(q_rest == 0, torch.zeros_like(coef_rest), coef_rest)
    return div, kept_du, coef_rest


def _log_softmax_kept(scaled, active):
    """log-softmax over the active entries of (C, K) (inactive entries -inf)."""
    scaled = scaled.masked_fill(~active, _MINUS_INF)
    top = scaled.amax(1, keepdim=True)
    top = torch.where(top == _MINUS_INF, torch.zeros_like(top), top)
    shifted = scaled - top
    return shifted - shifted.exp().sum(1, keepdim=True).log()


def _process_chunk(student, ids, values, lse, counts, targets, keep, grad, options, grad_scale):
    """Row losses (C,) float32 of one chunk; fills ``grad`` (C, V) when it is not None."""
    rows, num_classes = student.shape
    temp, inv_temp = options.temperature, options.inv_temperature
    divergence, tail = options.divergence, options.tail
    soft = options.soft_weight > 0
    stats = soft and tail != "renormalize"
    hard = targets is not None
    sampled = counts is not None
    if sampled:
        counts = counts.float()
        active = counts > 0
    else:
        values = values.float()
        active = values != _MINUS_INF
    # padding: point its id (and later its gradient) at the row's first real entry; a row
    # without one keeps its ids (nothing of it is a bucket: its writes put back what is there)
    row_active = active.any(1, keepdim=True)
    first_active = active.to(torch.uint8).argmax(1, keepdim=True)
    ids = torch.where(active | ~row_active, ids, ids.gather(1, first_active))
    # labels="teacher" in a row without real entries: no label, no hard term
    hard_on = row_active.view(-1).float() if hard and options.teacher_labels else None
    z_kept = student.gather(1, ids).float().masked_fill(~active, _MINUS_INF)
    label_logit = student.gather(1, targets.unsqueeze(1)).float().view(-1) if hard else None

    shift = None
    if stats or hard:
        max_s = student.amax(1, keepdim=True).float()
        shift = torch.where(max_s == _MINUS_INF, torch.zeros_like(max_s), max_s)
    exp_s = sum_exp = None
    if stats:
        exp_s = ((student.float() - shift) * inv_temp).exp_()
        if tail == "bucket":            # the kept columns are their own buckets
            exp_s.scatter_(1, ids, torch.where(row_active, 0.0, exp_s.gather(1, ids)))
        sum_exp = exp_s.sum(1)

    row_loss = torch.zeros(rows, dtype=torch.float32, device=student.device)
    log_sum_s = None
    if soft:
        if tail == "renormalize":
            log_q = _log_softmax_kept(z_kept * inv_temp, active)
            log_q_rest = None
        else:
            scaled_kept = (z_kept - shift) * inv_temp
            if tail == "bucket":
                log_sum_s = (sum_exp + scaled_kept.exp().sum(1)).log()
                log_q_rest = sum_exp.log() - log_sum_s
            else:
                log_sum_s = sum_exp.log()
                log_q_rest = None
            log_q = scaled_kept - log_sum_s.unsqueeze(1)
        if sampled:
            log_p = counts.log() - counts.sum(1, keepdim=True).log()
        elif tail == "renormalize":
            log_p = _log_softmax_kept(values * inv_temp, active)
        else:
            log_p = values * inv_temp - lse.float().unsqueeze(1)
        has_rest = tail == "bucket" and (sampled or ids.shape[1] < num_classes
                                         or not bool(active.all()))
        full = None
        if has_rest and not sampled and ids.shape[1] >= num_classes:
            full = active.sum(1) == num_classes    # ids are unique among real entries
        div, kept_du, coef_rest = bucket_terms(log_q, log_p, active, log_q_rest, has_rest,
                                               sampled, divergence, options.beta, tail, full)
        row_loss += options.soft_weight * temp * temp * div
    if hard:
        exp_ce = (student.float() - shift).exp()
        log_sum_ce = exp_ce.sum(1).log()
        hard_term = log_sum_ce - (label_logit - shift.view(-1))
        if hard_on is not None:
            hard_term = torch.where(hard_on > 0, hard_term, torch.zeros_like(hard_term))
        row_loss += options.hard_weight * hard_term
    if keep is not None:
        row_loss = torch.where(keep, row_loss, torch.zeros_like(row_loss))
    if grad is None:
        return row_loss

    # Everything read: grad may alias the student chunk from here on. Every column outside the
    # kept ids: soft p_s(j) coef_rest + hard (softmax(z)_j - [j = y]); the kept columns are
    # written last with their own gradient (kept_du and the hard term at the ids).
    soft_scale = grad_scale * options.soft_weight * temp
    hard_scale = grad_scale * options.hard_weight * torch.ones(rows, 1, device=grad.device)
    if hard_on is not None:
        hard_scale = hard_scale * hard_on.unsqueeze(1)   # 0 in rows without a teacher label
    full = torch.zeros(student.shape, dtype=torch.float32, device=student.device)
    kept_grad = soft_scale * kept_du if soft else torch.zeros_like(z_kept)
    if stats:
        full += (soft_scale * coef_rest * (-log_sum_s).exp()).unsqueeze(1) * exp_s
    if hard:
        full += hard_scale * (-log_sum_ce).exp().unsqueeze(1) * exp_ce
        label_column = targets.unsqueeze(1)
        full.scatter_add_(1, label_column, -hard_scale)
        q_ce = (z_kept - shift - log_sum_ce.unsqueeze(1)).exp()
        kept_grad += hard_scale * (q_ce - (ids == label_column).float())
    # padding entries write their row's first real entry again; a row without real entries
    # writes back what is there
    kept_grad = torch.where(active, kept_grad, kept_grad.gather(1, first_active))
    kept_grad = torch.where(row_active, kept_grad, full.gather(1, ids))
    full.scatter_(1, ids, kept_grad)
    if keep is not None:
        full.masked_fill_(~keep.unsqueeze(1), 0.0)
    grad.copy_(full)
    return row_loss


@torch.no_grad()
def kd_sparse_torch(student_logits: torch.Tensor, indices: torch.Tensor,
                    values: Optional[torch.Tensor], lse: Optional[torch.Tensor],
                    counts: Optional[torch.Tensor], labels: Optional[torch.Tensor], options, *,
                    grad: Optional[torch.Tensor], grad_scale=1.0) -> torch.Tensor:
    """Row losses ``(N,)`` float32 of ``(N, V)`` student rows; fills ``grad`` with
    ``grad_scale * d row_loss / dz_s`` when it is given. The caller has checked every label."""
    num_rows, num_classes = student_logits.shape
    device = student_logits.device
    row_loss = torch.zeros(num_rows, dtype=torch.float32, device=device)
    has_hard = options.hard_weight > 0 and (labels is not None or options.teacher_labels)
    chunk_rows = max(1, CHUNK_ELEMENTS // max(num_classes, 1))
    for start in range(0, num_rows, chunk_rows):
        part = slice(start, start + chunk_rows)
        ids = indices[part].long()
        grad_chunk = grad[part] if grad is not None else None
        targets = keep = None
        if labels is not None:
            keep = labels[part] != options.ignore_index
            if not bool(keep.any()):   # nothing kept: loss 0 (already), gradient 0
                if grad_chunk is not None:
                    grad_chunk.zero_()
                continue
            targets = torch.where(keep, labels[part], 0)
        elif options.teacher_labels:
            score = counts[part].float() if counts is not None else values[part].float()
            targets = ids.gather(1, score.argmax(1, keepdim=True)).view(-1)
        if not has_hard:
            targets = None
        row_loss[part] = _process_chunk(
            student_logits[part], ids, values[part] if values is not None else None,
            lse[part] if lse is not None else None,
            counts[part] if counts is not None else None, targets, keep, grad_chunk, options,
            grad_scale)
    return row_loss
