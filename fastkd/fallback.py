"""PyTorch fallback of the fused KD loss: chunked rows, gradient produced during the forward pass.

Follows ``fastkd.loss._BACKEND_CONTRACT``. Rows are processed in chunks whose fp32 work buffers
(a few of them, reused across chunks) stay in the CPU's caches; every op writes into those
buffers (``out=`` and in-place ops), so the only logits-sized tensor is the caller's ``grad``.

Per row, with ``w = (z - max z) / T`` (``max(z / T) = max(z) / T`` since ``T > 0``),
``e = exp(w)``, ``S = sum_v e`` and ``log p = w - log S``::

    forward_kl  T^2 KL(p_t||p_s) = T^2 [<e_t, w_t - w_s> / S_t - log S_t + log S_s]
                grad = T (p_s - p_t)
    reverse_kl  T^2 KL(p_s||p_t) = T^2 [<e_s, w_s - w_t> / S_s - log S_s + log S_t]
                grad = T p_s (w_s - w_t - log S_s + log S_t - KL)
    jsd         m = beta p_t + (1 - beta) p_s; J = beta KL(p_t||m) + (1 - beta) KL(p_s||m)
                grad = T (1 - beta) p_s (log(p_s / m) - KL(p_s||m))
    mse         mean_v (z_s - z_t)^2;  grad = 2 (z_s - z_t) / V
    hard CE     log S1 - (z_s[y] - max z_s) with S1 = sum_v exp(z_s - max z_s)
                grad = softmax(z_s) - onehot(y)

Row sums of products (``<a, b>``) are a multiply into a reused buffer and a row sum. When ``T``
or ``1 / T`` is a small integer, one student exponential is a few multiplies of the other
(``exp(d) = exp(d / T) ** T``) instead of a second ``exp``.

``-inf`` logits: the fast path lets ``0 * -inf`` produce NaN; a chunk whose divergence came out
NaN or infinite is recomputed with those ``p == 0`` terms masked to 0 and the jsd mixture
``log m`` taken as a log-sum-exp (NaN inputs stay NaN; a truly infinite reverse KL stays inf).
"""
import math
from typing import Optional

import torch

__all__ = ["kd_forward_torch", "CHUNK_BYTES"]

# Target size of one fp32 work buffer on CPU (up to ~5 are live per chunk: ~10 MB, inside L3;
# torch's intra-op threads split each op, so each core works on ~1 MB of each buffer). Measured
# at 2048 x 32000 on 2 cores: 256 KB buffers lose ~25% to per-op overhead, 2 MB beats 1 MB by
# ~15%. (A pool of single-threaded chunk workers instead was ~15% slower on an idle machine,
# though it degraded less when other processes took the cores.)
CHUNK_BYTES = 2 * 1024 * 1024
# Off the CPU (backend="torch" on a GPU) there is no cache to fit; big chunks keep launches few.
CHUNK_BYTES_DEVICE = 64 * 1024 * 1024
# Largest integer power computed by repeated multiplication instead of a second exp.
_MAX_INT_POWER = 4
# On CPU, small batches of short rows take the short path (_short_rows_chunk) for forward_kl
# and the hard term: fused ATen log_softmax kernels and ~20 ops per chunk instead of the
# workspace path's ~60, which wins where per-op overhead is the cost. Same-run measurements
# (2 threads, T = 2, fwd+bwd): the short path is faster at 256 x 10 and 256 x 100, but 1.3-1.4x
# slower than the workspace path at 256 x 1000 and 8192 x 100; hence both limits.
SHORT_ROW_CLASSES = 2048
SHORT_PATH_ELEMENTS = 64 * 1024


def _row_dot(left: torch.Tensor, right: torch.Tensor, work: "_Workspace") -> torch.Tensor:
    """sum_v left * right for (C, V) inputs -> (C, 1); the product goes to a reused buffer
    (``torch.linalg.vecdot`` would allocate it each time; a (C,1,V)x(C,V,1) ``bmm`` is several
    times slower on CPU)."""
    product = torch.mul(left, right, out=work.get("product", left.shape[0]))
    return product.sum(1, keepdim=True)


def _integer_ratio(value: float) -> Optional[int]:
    """value if it is an integer in [2, _MAX_INT_POWER], else None."""
    rounded = round(value)
    if 2 <= rounded <= _MAX_INT_POWER and value == rounded:
        return int(rounded)
    return None


def _power_into(base: torch.Tensor, exponent: int, out: torch.Tensor) -> torch.Tensor:
    """out = base ** exponent for a small integer exponent (2, 3 or 4), by multiplication."""
    torch.mul(base, base, out=out)
    if exponent == 3:
        out.mul_(base)
    elif exponent == 4:
        out.mul_(out)
    return out


def _mask_where_zero(values: torch.Tensor, weights: torch.Tensor) -> None:
    """values[weights == 0] = 0, so that <weights, values> has 0 * log 0 = 0 (guarded path)."""
    values.masked_fill_(weights == 0, 0.0)


class _Workspace:
    """Chunk-sized fp32 buffers, allocated on first use and reused for every chunk."""

    def __init__(self, rows: int, num_classes: int, device: torch.device):
        self.shape = (rows, num_classes)
        self.device = device
        self.buffers = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        if name not in self.buffers:
            self.buffers[name] = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        return self.buffers[name][:rows]


class _Options:
    def __init__(self, temperature, soft_weight, hard_weight, divergence, beta, grad_scale,
                 has_hard):
        self.temperature = temperature
        self.inv_temperature = 1.0 / temperature
        self.soft_weight = soft_weight
        self.hard_weight = hard_weight
        self.divergence = divergence
        self.beta = beta
        self.grad_scale = grad_scale
        self.soft = soft_weight > 0
        self.hard = has_hard and hard_weight > 0


def _scaled_shift(logits, max_logits, inv_temperature, out):
    """out = (logits - max) / T in fp32. One pass when 1/T is a power of two (then
    logits/T - max/T rounds exactly like (logits - max)/T), else a subtraction and a scaling."""
    if math.frexp(inv_temperature)[0] == 0.5:
        return torch.add(max_logits * -inv_temperature, logits, alpha=inv_temperature, out=out)
    return torch.sub(logits, max_logits, out=out).mul_(inv_temperature)


def _student_terms(student, opts, work):
    """(w_s, exp(w_s), exp(d_s), max_s) with d_s = z_s - max z_s and w_s = d_s / T; the
    exponentials are None when no term needs them and may share storage (T = 1)."""
    rows = student.shape[0]
    inv_temp = opts.inv_temperature
    soft_kl = opts.soft and opts.divergence != "mse"
    max_s = student.amax(1, keepdim=True).float()
    scaled_s = work.get("scaled_s", rows)
    exp_s = work.get("exp_s", rows) if soft_kl else None
    exp_hard = work.get("exp_hard", rows) if opts.hard else None
    power = _integer_ratio(opts.temperature)
    if not opts.hard or (soft_kl and power is not None):
        _scaled_shift(student, max_s, inv_temp, scaled_s)
        torch.exp(scaled_s, out=exp_s)
        if opts.hard:  # exp(d) = exp(d / T) ** T
            _power_into(exp_s, power, exp_hard)
        return scaled_s, exp_s, exp_hard, max_s
    # exp(d_s) first, then w_s = d_s / T in place
    torch.exp(torch.sub(student, max_s, out=scaled_s), out=exp_hard)
    if not soft_kl:
        return None, None, exp_hard, max_s
    if opts.temperature == 1.0:
        return scaled_s, exp_hard, exp_hard, max_s
    scaled_s.mul_(inv_temp)
    inverse_power = _integer_ratio(inv_temp)
    if inverse_power is not None:  # exp(d / T) = exp(d) ** (1 / T)
        _power_into(exp_hard, inverse_power, exp_s)
    else:
        torch.exp(scaled_s, out=exp_s)
    return scaled_s, exp_s, exp_hard, max_s


def _soft_terms(student, teacher, scaled_s, exp_s, opts, work, guard):
    """Divergence per row (C,) (before T^2 and the weight) and a callable that writes
    ``scale * d(soft_term)/dz_s`` into ``out`` (C, V) with a single final write (it may reuse the
    work buffers in place, so it is called once, last). ``scaled_s`` is w_s = (z_s - max) / T."""
    rows, num_classes = student.shape
    temp, beta = opts.temperature, opts.beta
    if opts.divergence == "mse":
        diff = work.get("diff", rows).copy_(student).sub_(teacher)  # fp32 arithmetic
        div = _row_dot(diff, diff, work).view(-1) / num_classes

        def write_grad(out, scale):
            torch.mul(diff, scale * (2.0 / num_classes), out=out)
        return div, write_grad

    max_t = teacher.amax(1, keepdim=True).float()
    scaled_t = _scaled_shift(teacher, max_t, opts.inv_temperature, work.get("scaled_t", rows))
    exp_t = torch.exp(scaled_t, out=work.get("exp_t", rows))
    sum_s = exp_s.sum(1, keepdim=True)
    sum_t = exp_t.sum(1, keepdim=True)
    log_sum_s, log_sum_t = sum_s.log(), sum_t.log()

    if opts.divergence == "forward_kl":
        diff = torch.sub(scaled_t, scaled_s, out=scaled_t)  # w_t - w_s
        if guard:
            _mask_where_zero(diff, exp_t)
        div = _row_dot(exp_t, diff, work) / sum_t - log_sum_t + log_sum_s

        def write_grad(out, scale):
            exp_t.mul_(-scale * temp / sum_t)
            torch.addcmul(exp_t, exp_s, scale * temp / sum_s, out=out)
        return div.view(-1), write_grad

    if opts.divergence == "reverse_kl":
        diff = torch.sub(scaled_s, scaled_t, out=scaled_t)  # w_s - w_t
        if guard:
            _mask_where_zero(diff, exp_s)
        div = _row_dot(exp_s, diff, work) / sum_s - log_sum_s + log_sum_t

        def write_grad(out, scale):
            coef = scale * temp / sum_s
            torch.addcmul(-(log_sum_s - log_sum_t + div) * coef, diff, coef, out=diff)
            torch.mul(diff, exp_s, out=out)
        return div.view(-1), write_grad

    # jsd, 0 < beta < 1: log(p / m) = w - log m - log S
    if guard:
        # log m as a log-sum-exp of the two log-probabilities: beta p_t + (1 - beta) p_s formed
        # directly underflows to 0 while p_t is still a float32 subnormal, which makes
        # log(p_t / m) = +inf on finite inputs (the fast path's non-finite result sends the
        # chunk here)
        log_p_t = torch.sub(scaled_t, log_sum_t - math.log(beta), out=work.get("mixture", rows))
        log_p_s = torch.sub(scaled_s, log_sum_s - math.log1p(-beta),
                            out=work.get("product", rows))
        log_mixture = torch.logaddexp(log_p_t, log_p_s, out=log_p_t)
    else:
        mixture = torch.mul(exp_t, beta / sum_t, out=work.get("mixture", rows))
        log_mixture = mixture.addcmul_(exp_s, (1.0 - beta) / sum_s).log_()
    ratio_s = scaled_s.sub_(log_mixture)
    ratio_t = scaled_t.sub_(log_mixture)
    if guard:
        _mask_where_zero(ratio_s, exp_s)
        _mask_where_zero(ratio_t, exp_t)
    kl_s_m = _row_dot(exp_s, ratio_s, work) / sum_s - log_sum_s
    kl_t_m = _row_dot(exp_t, ratio_t, work) / sum_t - log_sum_t
    div = beta * kl_t_m + (1.0 - beta) * kl_s_m

    def write_grad(out, scale):
        coef = scale * temp * (1.0 - beta) / sum_s
        torch.addcmul(-(log_sum_s + kl_s_m) * coef, ratio_s, coef, out=ratio_s)
        torch.mul(ratio_s, exp_s, out=out)
    return div.view(-1), write_grad


def _process_chunk(student, teacher, targets, keep, grad, opts, work, guard=False):
    """Row losses (C,) float32 of one chunk; fills ``grad`` (C, V) when it is not None."""
    rows = student.shape[0]
    scaled_s = exp_s = exp_hard = None
    if opts.hard or (opts.soft and opts.divergence != "mse"):
        scaled_s, exp_s, exp_hard, max_s = _student_terms(student, opts, work)

    row_loss = torch.zeros(rows, dtype=torch.float32, device=student.device)
    if opts.hard:
        sum_hard = exp_hard.sum(1, keepdim=True)
        target_shifted = student.gather(1, targets.unsqueeze(1)).float() - max_s
        row_loss += opts.hard_weight * (sum_hard.log() - target_shifted).view(-1)
    if opts.soft:
        div, write_soft_grad = _soft_terms(student, teacher, scaled_s, exp_s, opts, work, guard)
        if not guard and opts.divergence != "mse" and not bool(torch.isfinite(div).all()):
            # 0 * -inf somewhere (p == 0 entries), or a jsd mixture that underflowed: redo with
            # those terms masked out and log m as a log-sum-exp.
            return _process_chunk(student, teacher, targets, keep, grad, opts, work, guard=True)
        if opts.divergence != "mse":
            div = div.clamp_min(0.0) * (opts.temperature ** 2)  # >= 0 up to rounding
        row_loss += opts.soft_weight * div
    if keep is not None:
        row_loss = torch.where(keep, row_loss, torch.zeros_like(row_loss))

    if grad is not None:
        # The student chunk has been read in full; grad may alias it from here on. Everything
        # is summed in fp32 work buffers and ``grad`` is written once (rounded once).
        soft_scale = opts.grad_scale * opts.soft_weight
        if opts.hard:
            hard_scale = opts.grad_scale * opts.hard_weight
            minus_one_hot = torch.ones((rows, 1), device=grad.device).mul_(-hard_scale)
            if opts.soft:
                soft_grad = work.get("soft_grad", rows)
                write_soft_grad(soft_grad, soft_scale)
                soft_grad.scatter_add_(1, targets.unsqueeze(1), minus_one_hot)
                torch.addcmul(soft_grad, exp_hard, hard_scale / sum_hard, out=grad)
            else:
                exp_hard.mul_(hard_scale / sum_hard)
                exp_hard.scatter_add_(1, targets.unsqueeze(1), minus_one_hot)
                grad.copy_(exp_hard)
        elif opts.soft:
            write_soft_grad(grad, soft_scale)
        else:
            grad.zero_()
        if keep is not None:
            grad.masked_fill_(~keep.unsqueeze(1), 0.0)
    return row_loss


def _row_blocks(student_logits, teacher_logits, grad, chunk_rows):
    """(first row, student, teacher, grad) 2-D views of at most ``chunk_rows`` rows each, in
    row order. (B, S, V) inputs are chunked along S within each b: every block is a plain view
    of the caller's memory (e.g. ``logits[:, :-1]``), so nothing logits-sized is copied."""
    if student_logits.dim() == 2:
        for start in range(0, student_logits.shape[0], chunk_rows):
            block = slice(start, start + chunk_rows)
            yield (start, student_logits[block], teacher_logits[block],
                   grad[block] if grad is not None else None)
        return
    seq_len = student_logits.shape[1]
    for batch in range(student_logits.shape[0]):
        for start in range(0, seq_len, chunk_rows):
            block = slice(start, start + chunk_rows)
            yield (batch * seq_len + start, student_logits[batch, block],
                   teacher_logits[batch, block],
                   grad[batch, block] if grad is not None else None)


def _short_rows_chunk(student, teacher, targets, keep, grad, opts):
    """Row losses (C,) of forward_kl and/or the hard term for short rows (V <= SHORT_ROW_CLASSES)
    with fused ATen kernels; fills ``grad``. Same math as :func:`_process_chunk`::

        soft = T^2 sum_v p_t (log p_t - log p_s)   (0 log 0 = 0 where p_t = 0)
        hard = -log q[y],  q = softmax(z_s)
        grad = grad_scale (soft_weight T (p_s - p_t) + hard_weight (q - onehot(y)))
    """
    temp = opts.temperature
    student = student.float()
    row_loss = grad_acc = log_p_s = p_s = None
    if opts.soft:
        log_p_s = torch.log_softmax(student if temp == 1.0 else student * opts.inv_temperature, 1)
        teacher = teacher.float()
        log_p_t = torch.log_softmax(teacher if temp == 1.0 else teacher * opts.inv_temperature, 1)
        p_t = log_p_t.exp()
        # 0 * log 0 = 0 where p_t == 0; a NaN teacher entry keeps p_t (hence the row) NaN
        log_ratio = torch.where(p_t > 0, log_p_t - log_p_s, 0.0)
        row_loss = torch.linalg.vecdot(p_t, log_ratio).clamp_min_(0.0).mul_(
            opts.soft_weight * temp * temp)
        if grad is not None:
            p_s = log_p_s.exp()
            grad_acc = torch.sub(p_s, p_t).mul_(opts.grad_scale * opts.soft_weight * temp)
    if opts.hard:
        log_q = log_p_s if temp == 1.0 and log_p_s is not None else torch.log_softmax(student, 1)
        picked = log_q.gather(1, targets.unsqueeze(1)).view(-1)
        if row_loss is None:
            row_loss = picked.mul_(-opts.hard_weight)
        else:
            row_loss.sub_(picked, alpha=opts.hard_weight)
        if grad is not None:
            hard_scale = opts.grad_scale * opts.hard_weight
            if grad_acc is None:
                grad_acc = log_q.exp().mul_(hard_scale)
            else:
                grad_acc.add_(p_s if temp == 1.0 else log_q.exp(), alpha=hard_scale)
            grad_acc.scatter_(1, targets.unsqueeze(1), -hard_scale, reduce="add")
    if row_loss is None:
        row_loss = torch.zeros(student.shape[0], dtype=torch.float32, device=student.device)
    if keep is not None:
        row_loss = torch.where(keep, row_loss, 0.0)
    if grad is not None:
        # the student chunk has been read in full: grad may alias it from here on
        if grad_acc is None:
            grad.zero_()
        else:
            grad.copy_(grad_acc)
        if keep is not None:
            grad.masked_fill_(~keep.unsqueeze(1), 0.0)
    return row_loss


@torch.no_grad()  # the gradient is computed here, not traced (direct callers may pass leaves)
def kd_forward_torch(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     labels: Optional[torch.Tensor], *, teacher_labels: bool, temperature: float,
                     soft_weight: float, hard_weight: float, divergence: str, beta: float,
                     ignore_index: int, grad_scale, grad: Optional[torch.Tensor],
                     labels_in_range: bool = False) -> torch.Tensor:
    """Row losses ``(N,)`` float32 of ``(N, V)`` (or ``(B, S, V)``) logits; fills ``grad`` (see
    the contract in ``fastkd.loss``) with ``grad_scale * d row_loss / d student_logits``.
    ``labels_in_range``: the caller has checked every kept label (skips the guard)."""
    num_classes = student_logits.shape[-1]
    num_rows = student_logits.numel() // num_classes
    device = student_logits.device
    row_loss = torch.zeros(num_rows, dtype=torch.float32, device=device)
    if num_rows == 0:
        return row_loss
    if isinstance(grad_scale, torch.Tensor) and grad_scale.device.type == "cpu":
        grad_scale = grad_scale.item()
    elif not isinstance(grad_scale, torch.Tensor):
        grad_scale = float(grad_scale)
    opts = _Options(float(temperature), float(soft_weight), float(hard_weight), divergence,
                    float(beta), grad_scale, labels is not None or teacher_labels)
    chunk_bytes = CHUNK_BYTES if device.type == "cpu" else CHUNK_BYTES_DEVICE
    chunk_rows = max(1, min(num_rows, chunk_bytes // (4 * num_classes)))
    work = _Workspace(chunk_rows, num_classes, device)
    short_rows = (device.type == "cpu" and num_classes <= SHORT_ROW_CLASSES
                  and num_rows * num_classes <= SHORT_PATH_ELEMENTS
                  and (not opts.soft or divergence == "forward_kl"))

    for start, student, teacher, grad_chunk in _row_blocks(student_logits, teacher_logits, grad,
                                                           chunk_rows):
        stop = start + student.shape[0]
        targets = keep = None
        if labels is not None:
            chunk_labels = labels[start:stop]
            keep = chunk_labels != ignore_index
            kept = int(keep.sum())
            if kept == 0:  # nothing kept: loss 0 (already), gradient 0
                if grad_chunk is not None:
                    grad_chunk.zero_()
                continue
            if kept == keep.shape[0]:
                keep = None
                targets = chunk_labels
            else:
                targets = torch.where(keep, chunk_labels, 0)
            out_of_range = None
            if not labels_in_range:
                # labels the caller did not validate: never index out of bounds; such rows
                # get a NaN loss below
                clamped = targets.clamp(0, num_classes - 1)
                out_of_range = clamped != targets
                targets = clamped
        elif teacher_labels:
            targets = teacher.argmax(1)  # first index of the maximum
        if short_rows:
            row_loss[start:stop] = _short_rows_chunk(student, teacher, targets, keep,
                                                     grad_chunk, opts)
        else:
            row_loss[start:stop] = _process_chunk(student, teacher, targets, keep, grad_chunk,
                                                  opts, work)
        if labels is not None and out_of_range is not None:
            _poison_rows(out_of_range, row_loss[start:stop], grad_chunk)
        if teacher_labels and opts.hard:
            # argmax picks a NaN as the maximum, which would hide it from a hard-only loss
            _poison_rows(teacher.isnan().any(1), row_loss[start:stop], grad_chunk)
    return row_loss


def _poison_rows(nan_rows, row_loss, grad):
    """NaN loss (and gradient) for the rows in ``nan_rows``: a NaN input must reach the loss."""
    if bool(nan_rows.any()):
        row_loss.masked_fill_(nan_rows, float("nan"))
        if grad is not None:
            grad.masked_fill_(nan_rows.unsqueeze(1), float("nan"))
