"""PyTorch fallback of the fused KD loss: chunked rows, gradient produced during the forward pass.

Follows ``fastkd.loss._BACKEND_CONTRACT``. On the CPU the rows go to the compiled CPU kernel
(``kernels/kd_loss_cpu.c``, same math, one call per batch) wherever it was built
(``cpu_kernel_takes`` decides); the ATen implementation below serves ``backend="torch"`` on a
GPU and installs without a C compiler (or ``FASTKD_CPU_KERNEL=0``).

Rows are processed in chunks whose fp32 work buffers
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
import functools
import math
from typing import Optional

import torch

from fastkd.scratch import Workspace as _Workspace
from fastkd.scratch import kept_scratch_bytes, release_scratch  # noqa: F401 (public here too)

__all__ = ["kd_forward_torch", "CHUNK_BYTES", "release_scratch"]

# Target size of one fp32 work buffer on CPU (up to ~5 are live per chunk: ~10 MB, inside L3;
# torch's intra-op threads split each op, so each core works on ~1 MB of each buffer). Measured
# at 2048 x 32000 on 2 cores: 256 KB buffers lose ~25% to per-op overhead, 2 MB beats 1 MB by
# ~15%. (A pool of single-threaded chunk workers instead was ~15% slower on an idle machine,
# though it degraded less when other processes took the cores.)
CHUNK_BYTES = 2 * 1024 * 1024
# Short rows (V <= SHORT_ROW_CLASSES) take chunks this many times larger: each chunk costs ~50 ops
# of fixed overhead, which at small V outweighs the cache misses (8192 x 100, same run: one 3.2 MB
# chunk 4.27 ms against two chunks 4.79 ms; 2048 x 32000 is fastest at 2 MB).
SHORT_ROW_CHUNK_FACTOR = 2
# Off the CPU (backend="torch" on a GPU) there is no cache to fit; big chunks keep launches few.
CHUNK_BYTES_DEVICE = 64 * 1024 * 1024
# Largest integer power computed by repeated multiplication instead of a second exp.
_MAX_INT_POWER = 4
# Exponentials are taken as exp2 of base-2 exponents, w2 = w log2(e), folded into the one scaling
# pass: ATen's exp2 is ~1.8x faster than its exp on this CPU (same-run, 5242 x 100 fp32), and exp
# is most of the fallback's time. Row dots of base-2 differences are scaled back by ln 2.
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
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


def _scaled_shift(logits, max_logits, scale, out):
    """out = (logits - max) * scale in fp32: the subtraction first, so that entries near the
    row maximum keep their full precision (``scale`` folds 1/T and log2(e): see LOG2E)."""
    return torch.sub(logits, max_logits, out=out).mul_(scale)


def _student_terms(student, opts, work):
    """(w2_s, exp(w_s), exp(d_s), max_s) with d_s = z_s - max z_s, w_s = d_s / T and
    w2_s = w_s * log2(e) (base-2 units, see LOG2E); the exponentials are None when no term
    needs them and may share storage (T = 1)."""
    rows = student.shape[0]
    soft_kl = opts.soft and opts.divergence != "mse"
    max_s = student.amax(1, keepdim=True).float()
    scaled_s = work.get("scaled_s", rows)
    exp_s = work.get("exp_s", rows) if soft_kl else None
    exp_hard = work.get("exp_hard", rows) if opts.hard else None
    power = _integer_ratio(opts.temperature)
    if not opts.hard or (soft_kl and power is not None):
        _scaled_shift(student, max_s, opts.inv_temperature * LOG2E, scaled_s)
        torch.exp2(scaled_s, out=exp_s)
        if opts.hard:  # exp(d) = exp(d / T) ** T
            _power_into(exp_s, power, exp_hard)
        return scaled_s, exp_s, exp_hard, max_s
    # exp(d_s) first, then w2_s = d2_s / T in place
    torch.exp2(_scaled_shift(student, max_s, LOG2E, scaled_s), out=exp_hard)
    if not soft_kl:
        return None, None, exp_hard, max_s
    if opts.temperature == 1.0:
        return scaled_s, exp_hard, exp_hard, max_s
    scaled_s.mul_(opts.inv_temperature)
    inverse_power = _integer_ratio(opts.inv_temperature)
    if inverse_power is not None:  # exp(d / T) = exp(d) ** (1 / T)
        _power_into(exp_hard, inverse_power, exp_s)
    else:
        torch.exp2(scaled_s, out=exp_s)
    return scaled_s, exp_s, exp_hard, max_s


def _soft_terms(student, teacher, scaled_s, exp_s, opts, work, guard):
    """Divergence per row (C,) (before T^2 and the weight) and a callable that writes
    ``scale * d(soft_term)/dz_s`` into ``out`` (C, V) with a single final write (it may reuse the
    work buffers in place, so it is called once, last). ``scaled_s`` is w2_s = (z_s - max) / T
    in base-2 units (times log2(e)); row dots of base-2 differences are scaled back by ln 2."""
    rows, num_classes = student.shape
    temp, beta = opts.temperature, opts.beta
    if opts.divergence == "mse":
        diff = work.get("diff", rows).copy_(student).sub_(teacher)  # fp32 arithmetic
        div = _row_dot(diff, diff, work).view(-1) / num_classes

        def write_grad(out, scale):
            torch.mul(diff, scale * (2.0 / num_classes), out=out)
        return div, write_grad

    max_t = teacher.amax(1, keepdim=True).float()
    scaled_t = _scaled_shift(teacher, max_t, opts.inv_temperature * LOG2E,
                             work.get("scaled_t", rows))
    exp_t = torch.exp2(scaled_t, out=work.get("exp_t", rows))
    sum_s = exp_s.sum(1, keepdim=True)
    sum_t = exp_t.sum(1, keepdim=True)
    log_sum_s, log_sum_t = sum_s.log(), sum_t.log()

    if opts.divergence == "forward_kl":
        diff = torch.sub(scaled_t, scaled_s, out=scaled_t)  # (w_t - w_s) log2(e)
        if guard:
            _mask_where_zero(diff, exp_t)
        div = _row_dot(exp_t, diff, work) * (LN2 / sum_t) - log_sum_t + log_sum_s

        def write_grad(out, scale):
            # a mul and an addcmul with a (C, 1) factor: 2 passes (8192 x 100, same run: addcmul
            # 94 us against 137 us for a mul_ and an add)
            torch.mul(exp_s, scale * temp / sum_s, out=out).addcmul_(exp_t, -scale * temp / sum_t)
        return div.view(-1), write_grad

    if opts.divergence == "reverse_kl":
        diff = torch.sub(scaled_s, scaled_t, out=scaled_t)  # (w_s - w_t) log2(e)
        if guard:
            _mask_where_zero(diff, exp_s)
        div = _row_dot(exp_s, diff, work) * (LN2 / sum_s) - log_sum_s + log_sum_t

        def write_grad(out, scale):
            coef = scale * temp / sum_s
            torch.addcmul(-(log_sum_s - log_sum_t + div) * coef, diff, coef * LN2, out=diff)
            torch.mul(diff, exp_s, out=out)
        return div.view(-1), write_grad

    # jsd, 0 < beta < 1: log(p / m) = w - log m - log S
    if guard:
        # log m as a log-sum-exp of the two log-probabilities: beta p_t + (1 - beta) p_s formed
        # directly underflows to 0 while p_t is still a float32 subnormal, which makes
        # log(p_t / m) = +inf on finite inputs (the fast path's non-finite result sends the
        # chunk here)
        # (all in base 2: log2 of beta p_t and (1 - beta) p_s, then log2 m)
        log_p_t = torch.sub(scaled_t, (log_sum_t - math.log(beta)) * LOG2E,
                            out=work.get("mixture", rows))
        log_p_s = torch.sub(scaled_s, (log_sum_s - math.log1p(-beta)) * LOG2E,
                            out=work.get("product", rows))
        log_mixture = torch.logaddexp2(log_p_t, log_p_s, out=log_p_t)
    else:
        mixture = torch.mul(exp_t, beta / sum_t, out=work.get("mixture", rows))
        log_mixture = mixture.addcmul_(exp_s, (1.0 - beta) / sum_s).log2_()
    ratio_s = scaled_s.sub_(log_mixture)
    ratio_t = scaled_t.sub_(log_mixture)
    if guard:
        _mask_where_zero(ratio_s, exp_s)
        _mask_where_zero(ratio_t, exp_t)
    kl_s_m = _row_dot(exp_s, ratio_s, work) * (LN2 / sum_s) - log_sum_s
    kl_t_m = _row_dot(exp_t, ratio_t, work) * (LN2 / sum_t) - log_sum_t
    div = beta * kl_t_m + (1.0 - beta) * kl_s_m

    def write_grad(out, scale):
        coef = scale * temp * (1.0 - beta) / sum_s
        torch.addcmul(-(log_sum_s + kl_s_m) * coef, ratio_s, coef * LN2, out=ratio_s)
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


@functools.lru_cache(maxsize=256)
def _cpu_scalar(value: float) -> torch.Tensor:
    """A 0-d float32 CPU tensor holding ``value``. ATen converts a Python-number operand into a
    tensor on every op (~3 us, as much as the op itself on a short-row batch); a 0-d float32
    operand is used as is and rounds the same way. Cached: never modify one."""
    return torch.tensor(value, dtype=torch.float32)


def _short_rows_chunk(student, teacher, targets, keep, grad, opts):
    """Row losses (C,) of forward_kl and/or the hard term for short rows (V <= SHORT_ROW_CLASSES)
    with fused ATen kernels and as few ops as possible (per-op overhead is the cost at these
    sizes); fills ``grad``. Same math as :func:`_process_chunk`::

        soft = T^2 sum_v p_t (log p_t - log p_s)   (0 log 0 = 0 where p_t = 0)
        hard = -log q[y],  q = softmax(z_s)
        grad = grad_scale (soft_weight T (p_s - p_t) + hard_weight (q - onehot(y)))

    ``grad`` may be the student's own storage: every read of ``student`` comes before the one
    write into ``grad`` (the sum is formed in fp32 and rounded once)."""
    temp = opts.temperature
    student = student.float()
    row_loss = log_p_s = p_t = log_q = None
    if opts.soft:
        inv_temp = _cpu_scalar(opts.inv_temperature)
        log_p_s = torch.log_softmax(student if temp == 1.0 else student * inv_temp, 1)
        teacher = teacher.float()
        log_p_t = torch.log_softmax(teacher if temp == 1.0 else teacher * inv_temp, 1)
        p_t = log_p_t.exp()
        log_ratio = log_p_t.sub_(log_p_s)
        # 0 * log 0 = 0 where p_t == 0; a NaN teacher entry keeps p_t (hence the row) NaN
        log_ratio.masked_fill_(p_t == _cpu_scalar(0.0), 0.0)
        row_loss = torch.linalg.vecdot(p_t, log_ratio).clamp_min_(0.0).mul_(
            _cpu_scalar(opts.soft_weight * temp * temp))
    if opts.hard:
        log_q = log_p_s if temp == 1.0 and log_p_s is not None else torch.log_softmax(student, 1)
        target_columns = targets.unsqueeze(1)
        picked = log_q.gather(1, target_columns).view(-1)
        if row_loss is None:
            row_loss = picked.mul_(_cpu_scalar(-opts.hard_weight))
        else:
            row_loss.sub_(picked, alpha=opts.hard_weight)
    if row_loss is None:
        row_loss = torch.zeros(student.shape[0], dtype=torch.float32, device=student.device)
    if keep is not None:
        row_loss.masked_fill_(~keep, 0.0)
    if grad is None:
        return row_loss
    # the student has been read in full: grad may alias it from here on
    soft_scale = opts.grad_scale * opts.soft_weight * temp
    hard_scale = opts.grad_scale * opts.hard_weight
    if opts.soft:
        # (p_s - p_t + (hard/soft) (q - onehot)) * soft, q = p_s at T = 1
        p_s = log_p_s.exp_()
        acc = torch.sub(p_s, p_t, out=p_t)
        if opts.hard:
            acc.add_(p_s if log_q is log_p_s else log_q.exp_(), alpha=hard_scale / soft_scale)
        scale = soft_scale
    elif opts.hard:
        acc, scale = log_q.exp_(), hard_scale
    else:
        grad.zero_()
        return row_loss
    if opts.hard:
        acc.scatter_(1, target_columns, -hard_scale / scale, reduce="add")
    if keep is not None:
        acc.masked_fill_(~keep.unsqueeze(1), 0.0)
    torch.mul(acc, _cpu_scalar(scale), out=grad)
    return row_loss


def _chunk_targets(chunk_labels, ignore_index, num_classes, labels_in_range):
    """(targets, keep, out_of_range, kept) for one chunk's labels: ``keep`` is None when every
    row is kept, ``targets`` are safe to index with (ignored rows point at class 0, and labels
    the caller did not validate are clamped into range; ``out_of_range`` marks those rows)."""
    keep = chunk_labels != ignore_index
    kept = int(keep.sum())
    if kept == keep.shape[0]:
        keep, targets = None, chunk_labels
    else:
        targets = torch.where(keep, chunk_labels, 0)
    out_of_range = None
    if not labels_in_range:
        # never index out of bounds; such rows get a NaN loss
        clamped = targets.clamp(0, num_classes - 1)
        out_of_range = clamped != targets
        targets = clamped
    return targets, keep, out_of_range, kept


def _native_kernel():
    """The ``fastkd.kernels.kd_loss_cpu`` module when the compiled CPU kernel is built and not
    turned off (``FASTKD_CPU_KERNEL=0``), else None; looked up once."""
    if not _NATIVE:
        from fastkd.kernels import kd_loss_cpu
        _NATIVE.append(kd_loss_cpu if kd_loss_cpu.available() else None)
    return _NATIVE[0]


_NATIVE = []


def cpu_kernel_takes(student_rows: torch.Tensor):
    """The one decision between the compiled CPU kernel and the ATen ops below: the
    ``fastkd.kernels.kd_loss_cpu`` module for CPU rows when it is built, else None. It is
    2.2-3x faster than the ATen path at every shape measured (V = 10 to 262144, fp32 and bf16,
    every divergence; same runs, 2-core CPU), so the ATen path serves backend="torch" on a GPU
    and installs without a C compiler."""
    if student_rows.device.type != "cpu":
        return None
    return _native_kernel()


def kd_forward_torch(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     labels: Optional[torch.Tensor], *, teacher_labels: bool, temperature: float,
                     soft_weight: float, hard_weight: float, divergence: str, beta: float,
                     ignore_index: int, grad_scale, grad: Optional[torch.Tensor],
                     labels_in_range: bool = False, all_rows_kept: bool = False) -> torch.Tensor:
    """Row losses ``(N,)`` float32 of ``(N, V)`` (or ``(B, S, V)``) logits; fills ``grad`` (see
    the contract in ``fastkd.loss``) with ``grad_scale * d row_loss / d student_logits``.
    ``labels_in_range``: the caller has checked every kept label (skips the guard);
    ``all_rows_kept``: and no label is ``ignore_index`` (skips the keep mask)."""
    if torch.is_grad_enabled():  # the gradient is computed here, not traced (callers may pass
        with torch.no_grad():    # leaves); inside autograd.Function.forward this is skipped
            return kd_forward_torch(
                student_logits, teacher_logits, labels, teacher_labels=teacher_labels,
                temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
                divergence=divergence, beta=beta, ignore_index=ignore_index,
                grad_scale=grad_scale, grad=grad, labels_in_range=labels_in_range,
                all_rows_kept=all_rows_kept)
    num_classes = student_logits.shape[-1]
    num_rows = student_logits.numel() // num_classes
    device = student_logits.device
    if isinstance(grad_scale, torch.Tensor) and grad_scale.device.type == "cpu":
        grad_scale = grad_scale.item()
    elif not isinstance(grad_scale, torch.Tensor):
        grad_scale = float(grad_scale)
    cpu_kernel = cpu_kernel_takes(student_logits)
    if cpu_kernel is not None:
        return cpu_kernel.kd_forward_cpu(
            student_logits, teacher_logits, labels, teacher_labels=teacher_labels,
            temperature=float(temperature), soft_weight=float(soft_weight),
            hard_weight=float(hard_weight), divergence=divergence, beta=float(beta),
            ignore_index=int(ignore_index), grad_scale=grad_scale, grad=grad)
    opts = _Options(float(temperature), float(soft_weight), float(hard_weight), divergence,
                    float(beta), grad_scale, labels is not None or teacher_labels)
    short_rows = (device.type == "cpu" and num_classes <= SHORT_ROW_CLASSES
                  and num_rows * num_classes <= SHORT_PATH_ELEMENTS
                  and (not opts.soft or divergence == "forward_kl"))
    if (short_rows and student_logits.dim() == 2 and num_rows and labels is not None
            and labels_in_range and all_rows_kept):
        # the common small-batch call in one piece: no chunk loop, no keep mask
        return _short_rows_chunk(student_logits, teacher_logits, labels, None, grad, opts)

    row_loss = torch.zeros(num_rows, dtype=torch.float32, device=device)
    if num_rows == 0:
        return row_loss
    if device.type != "cpu":
        chunk_bytes = CHUNK_BYTES_DEVICE
    else:
        chunk_bytes = CHUNK_BYTES * (SHORT_ROW_CHUNK_FACTOR if num_classes <= SHORT_ROW_CLASSES
                                     else 1)
    chunk_rows = max(1, min(num_rows, chunk_bytes // (4 * num_classes)))
    work = _Workspace(chunk_rows, num_classes, device)
    for start, student, teacher, grad_chunk in _row_blocks(student_logits, teacher_logits, grad,
                                                           chunk_rows):
        stop = start + student.shape[0]
        targets = keep = out_of_range = None
        if labels is not None:
            targets, keep, out_of_range, kept = _chunk_targets(
                labels[start:stop], ignore_index, num_classes, labels_in_range)
            if kept == 0:  # nothing kept: loss 0 (already), gradient 0
                if grad_chunk is not None:
                    grad_chunk.zero_()
                continue
        elif teacher_labels:
            targets = teacher.argmax(1)  # first index of the maximum
        if short_rows:
            row_loss[start:stop] = _short_rows_chunk(student, teacher, targets, keep,
                                                     grad_chunk, opts)
        else:
            row_loss[start:stop] = _process_chunk(student, teacher, targets, keep, grad_chunk,
                                                  opts, work)
        if out_of_range is not None:
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
