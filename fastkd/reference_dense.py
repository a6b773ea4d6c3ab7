"""The dense KD loss in plain PyTorch: a readable statement of the math, and the backend that runs
where no kernel does (``backend="torch"`` on a GPU, an install without a C compiler, or
``FASTKD_CPU_KERNEL=0``). Same contract as the kernels (``fastkd.dispatch.DenseBackend``); the
gradient is written out by formula, not by autograd.

Per row (``u = z / T``, ``p = softmax(u)``, ``log p = log_softmax(u)``, float32)::

    forward_kl  D = sum_v p_t (log p_t - log p_s)             dD/du_s = p_s - p_t
    reverse_kl  D = sum_v p_s (log p_s - log p_t)             dD/du_s = p_s (log p_s - log p_t - D)
    jsd         m = beta p_t + (1 - beta) p_s
                D = beta KL(p_t||m) + (1 - beta) KL(p_s||m)   dD/du_s = (1 - beta) p_s (log(p_s/m) - KL(p_s||m))
    soft        = T^2 D   (d soft / dz_s = T dD/du_s)
    mse         soft = mean_v (z_s - z_t)^2 (raw logits)     d soft / dz_s = 2 (z_s - z_t) / V
    hard CE     -log q_y, q = softmax(z_s)                     d / dz_s = q - onehot(y)

    row_loss = soft_weight * soft + hard_weight * CE

Terms with ``p == 0`` are 0 (``0 log 0 = 0``), so ``-inf`` logits are exact; ``m`` is formed
relative to the larger of ``p_t``, ``p_s``, so it never underflows. Rows go in chunks of at most
:data:`CHUNK_ELEMENTS` elements, so the temporaries stay a fixed size whatever ``N``.
"""
import math
from typing import Optional

import torch

__all__ = ["kd_dense_torch", "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 1 << 22   # elements per chunk of rows (16 MiB per float32 temporary)


def _xlogy_diff(weight, log_weight, log_other):
    """``weight * (log_weight - log_other)`` with ``0 * anything = 0`` (NaN stays NaN)."""
    return torch.where(weight == 0, 0.0, weight * (log_weight - log_other))


def _soft_term(student, teacher, options):
    """``(soft (C,), d soft / dz_s (C, V))`` of float32 chunk rows."""
    if options.divergence == "mse":
        diff = student - teacher
        return diff.square().mean(1), diff * (2.0 / student.shape[1])
    temperature = options.temperature
    log_p_s = torch.log_softmax(student / temperature, 1)
    log_p_t = torch.log_softmax(teacher / temperature, 1)
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    if options.divergence == "forward_kl":
        divergence = _xlogy_diff(p_t, log_p_t, log_p_s).sum(1)
        grad = p_s - p_t
    elif options.divergence == "reverse_kl":
        divergence = _xlogy_diff(p_s, log_p_s, log_p_t).sum(1)
        grad = torch.where(p_s == 0, 0.0,
                           p_s * (log_p_s - log_p_t - divergence.unsqueeze(1)))
    else:   # jsd, 0 < beta < 1
        beta = options.beta
        # log m relative to the larger side: no underflow, and exactly log p where p_t = p_s
        top = torch.maximum(log_p_t, log_p_s)
        top = torch.where(top == -math.inf, 0.0, top)
        log_m = top + (beta * (log_p_t - top).exp() + (1.0 - beta) * (log_p_s - top).exp()).log()
        kl_s_m = _xlogy_diff(p_s, log_p_s, log_m).sum(1)
        divergence = beta * _xlogy_diff(p_t, log_p_t, log_m).sum(1) + (1.0 - beta) * kl_s_m
        grad = torch.where(p_s == 0, 0.0,
                           (1.0 - beta) * p_s * (log_p_s - log_m - kl_s_m.unsqueeze(1)))
    # D >= 0 up to rounding
    return temperature ** 2 * divergence.clamp_min(0.0), temperature * grad


def _chunk(student, teacher, targets, options, want_grad):
    """Row losses (C,) and their gradient (C, V) float32 (None without ``want_grad``) of one chunk;
    ``targets`` (C,) in-range class ids or None (no hard term)."""
    student, teacher = student.float(), teacher.float()
    row_loss = torch.zeros(student.shape[0], device=student.device)
    grad = torch.zeros_like(student) if want_grad else None
    if options.soft_weight > 0:
        soft, soft_grad = _soft_term(student, teacher, options)
        row_loss += options.soft_weight * soft
        if want_grad:
            grad += options.soft_weight * soft_grad
    if targets is not None and options.hard_weight > 0:
        log_q = torch.log_softmax(student, 1)
        row_loss -= options.hard_weight * log_q.gather(1, targets.unsqueeze(1)).squeeze(1)
        if want_grad:
            hard_grad = log_q.exp().scatter_add_(1, targets.unsqueeze(1),
                                                 -torch.ones_like(log_q[:, :1]))
            grad += options.hard_weight * hard_grad
    return row_loss, grad


def _targets(labels, teacher, options, num_classes):
    """``(targets, kept, poisoned)`` of one chunk: in-range class ids (or None: no hard term),
    the kept rows (or None: all), rows whose loss must be NaN (or None)."""
    if options.teacher_labels:
        # argmax takes a NaN as the maximum, which would hide it from a hard-only loss
        poisoned = teacher.isnan().any(1) if options.hard_weight > 0 else None
        return teacher.argmax(1), None, poisoned
    if labels is None:
        return None, None, None
    kept = labels != options.ignore_index
    out_of_range = kept & ((labels < 0) | (labels >= num_classes))
    return torch.where(kept & ~out_of_range, labels, 0), kept, out_of_range


def _row_chunks(student, teacher, grad):
    """``(first row, student, teacher, grad)`` 2-D views of at most ``CHUNK_ELEMENTS``
    elements' worth of rows; ``(B, S, V)`` inputs are split within each ``b``."""
    if student.dim() == 2:
        student, teacher = student.unsqueeze(0), teacher.unsqueeze(0)
        grad = grad.unsqueeze(0) if grad is not None else None
    seq_len, num_classes = student.shape[1], student.shape[2]
    step = max(1, CHUNK_ELEMENTS // max(num_classes, 1))
    for batch in range(student.shape[0]):
        for start in range(0, seq_len, step):
            rows = slice(start, start + step)
            yield (batch * seq_len + start, student[batch, rows], teacher[batch, rows],
                   grad[batch, rows] if grad is not None else None)


@torch.no_grad()
def kd_dense_torch(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   labels: Optional[torch.Tensor], options, *, grad: Optional[torch.Tensor],
                   grad_scale=1.0) -> torch.Tensor:
    """Row losses ``(N,)`` float32 of ``(N, V)`` / ``(B, S, V)`` logits; fills ``grad`` (None,
    or the student's shape and dtype, possibly its own storage) with ``grad_scale *
    d row_loss / dz_s``. Ignored rows get loss 0 and a zero gradient; a kept label outside
    ``[0, V)`` gives its row a NaN loss and gradient (never an out-of-bounds read)."""
    num_classes = student_logits.shape[-1]
    row_loss = torch.zeros(student_logits.numel() // num_classes, device=student_logits.device)
    for start, student, teacher, grad_rows in _row_chunks(student_logits, teacher_logits, grad):
        stop = start + student.shape[0]
        chunk_labels = labels[start:stop] if labels is not None else None
        targets, kept, poisoned = _targets(chunk_labels, teacher, options, num_classes)
        loss, chunk_grad = _chunk(student, teacher, targets, options, grad_rows is not None)
        if kept is not None:
            loss = torch.where(kept, loss, 0.0)
        if poisoned is not None:
            loss = torch.where(poisoned, float("nan"), loss)
        row_loss[start:stop] = loss
        if grad_rows is None:
            continue
        chunk_grad *= grad_scale
        if kept is not None:
            chunk_grad.masked_fill_(~kept.unsqueeze(1), 0.0)
        if poisoned is not None:
            chunk_grad.masked_fill_(poisoned.unsqueeze(1), float("nan"))
        grad_rows.copy_(chunk_grad)   # every read of the student chunk is done: grad may alias it
    return row_loss
