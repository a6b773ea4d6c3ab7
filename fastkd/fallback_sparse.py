"""PyTorch twin of the fused sparse-teacher KD kernel (kernels/kd_sparse.py): same buckets, same
formulas, same numbers, gradient produced during the forward pass.

Follows ``fastkd.sparse_loss._SPARSE_BACKEND_CONTRACT``. Rows go in chunks whose fp32 work
buffers (one or two ``(C, V)`` buffers, reused across chunks) stay in the CPU's caches; the only
logits-sized tensor is the caller's ``grad``. The teacher side is ``(C, K)`` throughout.

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
from typing import Optional

import torch

from fastkd.fallback import CHUNK_BYTES as _DENSE_CHUNK_BYTES
from fastkd.fallback import CHUNK_BYTES_DEVICE, _chunk_targets, _scaled_shift
from fastkd.scratch import Workspace as _Workspace

__all__ = ["kd_sparse_forward_torch", "bucket_terms"]

_MINUS_INF = float("-inf")
# fp32 work-buffer size per chunk on CPU: 4x the dense fallback's, since only one or two (C, V)
# buffers are live here (the dense path keeps ~5). Measured at 2048 x 32000 fp32, 2 threads,
# under load: 2 MB chunks 202 ms, 8 MB 160 ms, 32 MB 153 ms (the K-sized math is ~100 small ops
# per chunk, so fewer chunks save per-op overhead).
CHUNK_BYTES = 4 * _DENSE_CHUNK_BYTES


def _xlogy(weight, log_weight, log_other):
    """weight * (log_weight - log_other) with 0 * anything = 0."""
    return torch.where(weight == 0, torch.zeros_like(weight), weight * (log_weight - log_other))


def _log_mixture(log_q, log_p, beta):
    """log(beta p + (1 - beta) q) without underflow (logaddexp of the two weighted terms)."""
    import math
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


def _process_chunk(student, ids, values, lse, counts, targets, keep, grad, opts, work):
    """Row losses (C,) float32 of one chunk; fills ``grad`` (C, V) when it is not None."""
    rows, num_classes = student.shape
    temp, inv_temp = opts["temperature"], 1.0 / opts["temperature"]
    divergence, tail = opts["divergence"], opts["tail"]
    soft = opts["soft"]
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
    hard_on = row_active.view(-1).float() if hard and opts["teacher_labels"] else None
    z_kept = student.gather(1, ids).float().masked_fill(~active, _MINUS_INF)
    label_logit = student.gather(1, targets.unsqueeze(1)).float().view(-1) if hard else None

    shift = None
    if stats or hard:
        max_s = student.amax(1, keepdim=True).float()
        shift = torch.where(max_s == _MINUS_INF, torch.zeros_like(max_s), max_s)
    exp_s = sum_exp = None
    if stats:
        exp_s = _scaled_shift(student, shift, inv_temp, work.get("exp", rows)).exp_()
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
                                               sampled, divergence, opts["beta"], tail, full)
        row_loss += opts["soft_weight"] * temp * temp * div
    if hard:
        if stats and temp == 1.0:
            log_sum_ce, exp_ce = log_sum_s, exp_s        # p_s is softmax(z_s) at T = 1
        else:
            exp_ce = torch.sub(student, shift, out=work.get("exp_ce", rows)).exp_()
            log_sum_ce = exp_ce.sum(1).log()
        hard_term = log_sum_ce - (label_logit - shift.view(-1))
        if hard_on is not None:
            hard_term = torch.where(hard_on > 0, hard_term, torch.zeros_like(hard_term))
        row_loss += opts["hard_weight"] * hard_term
    if keep is not None:
        row_loss = torch.where(keep, row_loss, torch.zeros_like(row_loss))

    if grad is not None:
        # Everything read: grad may alias the student chunk from here on.
        soft_scale = opts["grad_scale"] * opts["soft_weight"] * temp
        hard_scale = opts["grad_scale"] * opts["hard_weight"]
        if hard_on is not None:
            hard_scale = hard_scale * hard_on      # (C,): 0 in rows without a teacher label
        shares = hard and exp_ce is exp_s
        kept_grad = soft_scale * kept_du if soft else torch.zeros_like(z_kept)
        # the whole row, written once: source * coef (coef None: source is the gradient)
        source = coef = None
        if hard:
            scale_ce = hard_scale * (-log_sum_ce).exp()
        if stats:   # p_s * soft_scale * coef_rest (+ hard_scale * softmax(z): the same p_s at T = 1)
            source, coef = exp_s, soft_scale * coef_rest * (-log_sum_s).exp()
            if shares:
                coef = coef + scale_ce
            elif hard:   # T != 1: add the hard CE's softmax in the fp32 buffer first
                source = exp_s.mul_(coef.unsqueeze(1)).addcmul_(exp_ce, scale_ce.unsqueeze(1))
                coef = None
        elif hard:
            source, coef = exp_ce, scale_ce
        if source is None:
            grad.zero_()
        elif coef is None:
            grad.copy_(source)
        else:
            torch.mul(source, coef.unsqueeze(1), out=grad)
        if hard:
            # the label column: - hard_scale, added in fp32 and rounded once (a kept label
            # column is rewritten with the kept gradient below, which includes it)
            label_column = targets.unsqueeze(1)
            at_label = source.gather(1, label_column)
            if coef is not None:
                at_label = at_label * coef.unsqueeze(1)
            row_hard_scale = (hard_scale.unsqueeze(1) if isinstance(hard_scale, torch.Tensor)
                              else hard_scale)
            grad.scatter_(1, label_column, (at_label - row_hard_scale).to(grad.dtype))
            q_ce = (z_kept - shift - log_sum_ce.unsqueeze(1)).exp()
            kept_grad += row_hard_scale * (q_ce - (ids == label_column).float())
        kept_grad = torch.where(active, kept_grad, kept_grad.gather(1, first_active))
        kept_grad = torch.where(row_active, kept_grad, grad.gather(1, ids).float())
        grad.scatter_(1, ids, kept_grad.to(grad.dtype))
        if keep is not None:
            grad.masked_fill_(~keep.unsqueeze(1), 0.0)
    return row_loss


@torch.no_grad()
def kd_sparse_forward_torch(student_logits: torch.Tensor, indices: torch.Tensor,
                            values: Optional[torch.Tensor], lse: Optional[torch.Tensor],
                            counts: Optional[torch.Tensor], labels: Optional[torch.Tensor], *,
                            teacher_labels: bool, temperature: float, soft_weight: float,
                            hard_weight: float, divergence: str, beta: float, tail: str,
                            ignore_index: int, grad_scale: float,
                            grad: Optional[torch.Tensor]) -> torch.Tensor:
    """Row losses ``(N,)`` float32; fills ``grad`` with ``grad_scale * d row_loss / dz_s``
    when it is given (see the contract in ``fastkd.sparse_loss``)."""
    if student_logits.dim() == 3:   # (B, S, V) rows: flattened (a copy when not mergeable)
        rows_grad = None if grad is None else grad.reshape(-1, grad.shape[-1])
        row_loss = kd_sparse_forward_torch(
            student_logits.reshape(-1, student_logits.shape[-1]), indices, values, lse, counts,
            labels,
            teacher_labels=teacher_labels, temperature=temperature, soft_weight=soft_weight,
            hard_weight=hard_weight, divergence=divergence, beta=beta, tail=tail,
            ignore_index=ignore_index, grad_scale=grad_scale, grad=rows_grad)
        if grad is not None and rows_grad.data_ptr() != grad.data_ptr():
            grad.copy_(rows_grad.view(grad.shape))   # grad was not a view of rows
        return row_loss
    num_rows, num_classes = student_logits.shape
    device = student_logits.device
    row_loss = torch.zeros(num_rows, dtype=torch.float32, device=device)
    if num_rows == 0:
        return row_loss
    opts = dict(temperature=float(temperature), soft_weight=float(soft_weight),
                hard_weight=float(hard_weight), divergence=divergence, beta=float(beta),
                tail=tail, grad_scale=float(grad_scale), soft=soft_weight > 0,
                teacher_labels=bool(teacher_labels))
    has_hard = hard_weight > 0 and (labels is not None or teacher_labels)
    chunk_bytes = CHUNK_BYTES if device.type == "cpu" else CHUNK_BYTES_DEVICE
    chunk_rows = max(1, min(num_rows, chunk_bytes // (4 * num_classes)))
    work = _Workspace(chunk_rows, num_classes, device, family="sparse")
    for start in range(0, num_rows, chunk_rows):
        stop = min(start + chunk_rows, num_rows)
        part = slice(start, stop)
        ids = indices[part].long()
        grad_chunk = grad[part] if grad is not None else None
        targets = keep = None
        if labels is not None:
            # the caller checked every label (fastkd.checks.check_sparse_values): no clamping
            targets, keep, _, kept = _chunk_targets(labels[part], ignore_index, num_classes,
                                                    labels_in_range=True)
            if kept == 0:
                if grad_chunk is not None:
                    grad_chunk.zero_()
                continue
        elif teacher_labels:
            score = counts[part].float() if counts is not None else values[part].float()
            targets = ids.gather(1, score.argmax(1, keepdim=True)).view(-1)
        if not has_hard:
            targets = None
        row_loss[part] = _process_chunk(
            student_logits[part], ids, values[part] if values is not None else None,
            lse[part] if lse is not None else None,
            counts[part] if counts is not None else None, targets, keep, grad_chunk, opts, work)
    return row_loss
