"""Fused knowledge-distillation loss in Triton: loss and student gradient from one kernel launch.

Per row (``u = z / T``, ``p = softmax(u)``, ``q = softmax(z_s)`` at T = 1)::

    row_loss = soft_weight * T^2 * D(p_t, p_s) + hard_weight * (-log q[y])
    D        = KL(p_t || p_s)                     forward_kl
             = KL(p_s || p_t)                     reverse_kl
             = beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s   jsd
    row_loss = soft_weight * mean_v (z_s - z_t)^2 + hard term        mse (raw logits, no T)

and, when a gradient buffer is given, ``grad = grad_scale * d row_loss / d z_s``::

    forward_kl  T (p_s - p_t)
    reverse_kl  T p_s (log p_s - log p_t - D)
    jsd         T p_s (g - <p_s, g>),   g = (1 - beta) log(p_s / m)
    mse         2 (z_s - z_t) / V
    hard CE     q - onehot(y)            (each times its weight)

One program handles one row and streams it in blocks of ``BLOCK_V`` columns:

* pass 1 (statistics): running raw maxima ``M_s``, ``M_t`` and rescaled sums of
  ``exp((z - M) / T)`` for student and teacher, ``exp(z_s - M_s)`` for the hard CE, the teacher's
  first argmax, the sum of squares for mse, and for the KL divergences the rescaled accumulator
  ``sum exp(s_t) (s_t - s_s)`` (forward) or ``sum exp(s_s) (s_s - s_t)`` (reverse) with
  ``s = (z - M) / T`` relative to the *current* maxima. Keeping every difference inside one row
  (``z - M``) instead of forming ``lse_s - lse_t`` makes logits shifted by 1e4 (even by opposite
  amounts for student and teacher) lose no precision.
* pass 2 (jsd only): ``g`` needs normalised ``p_s`` and ``p_t``, so a second statistics pass
  gathers ``sum p_t (log p_t - log m)`` and ``<p_s, g>``.
* last pass: writes the gradient (skipped when no gradient is wanted). It is the only pass that
  writes, and each block is read before the same program overwrites it, so the gradient buffer
  may be the student tensor itself.

Inputs are read twice (three times for jsd), the gradient is written once and no (N, V)
temporary is allocated. At T = 1 the hard CE reuses the student softmax instead of its own
exp per element. All arithmetic is float32; no exp is ever taken of an unshifted logit.
``-inf`` logits are probability 0 exactly (their ``0 * log 0`` terms are dropped), and a NaN in
any input of a kept row makes its loss NaN: NaN enters every sum of exps it touches, and no
``where`` guard on ``-inf`` can select it away.

One row per program even for small V: distillation vocabularies are 32k-256k columns, where a
row already fills a program; packing several short rows into a 2-D tile would make every
statistic a vector and was not worth the extra code without a GPU to measure the gain on.
"""
import torch
import triton
import triton.language as tl

__all__ = ["kd_forward_triton", "block_settings"]

# divergence codes (constexpr); NONE when soft_weight == 0
_NONE, _FORWARD_KL, _REVERSE_KL, _JSD, _MSE = 0, 1, 2, 3, 4
_DIVERGENCE_CODES = {"forward_kl": _FORWARD_KL, "reverse_kl": _REVERSE_KL, "jsd": _JSD,
                     "mse": _MSE}

# Largest block of columns a program holds at once; longer rows are streamed. 4096 columns over
# 8 warps is 16 per thread and tensor. ptxas (sm_90, triton 3.8, bf16 student + fp16 teacher,
# hard CE from the teacher argmax, gradient written) reports 91-109 registers per thread and no
# spills at 4096, but ~200 registers at 8192, close to the 255 limit where whole-row kernels
# start spilling (design notes: they degrade past ~32-64k columns).
MAX_BLOCK_V = 4096


def block_settings(num_classes: int):
    """``(BLOCK_V, num_warps)``: the next power of two of V capped at ``MAX_BLOCK_V``, and one
    warp per 512 columns (16 elements per thread), between 1 and 8 warps.

    Fixed rule instead of ``triton.autotune``: autotuning cannot be checked on this CPU-only
    machine and would multiply the interpreter's run time by the number of configurations.
    """
    block_v = min(triton.next_power_of_2(num_classes), MAX_BLOCK_V)
    num_warps = max(1, min(8, block_v // 512))
    return block_v, num_warps


@triton.jit
def _load_row_block(row_ptr, cols, mask):
    """One block of a row as float32; padding columns read as -inf (probability 0)."""
    return tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _safe_max(running_max):
    """The shift to subtract: the running max, or 0 while everything seen so far is -inf
    (keeps ``-inf - -inf`` out of exp; NaN passes through unchanged)."""
    return tl.where(running_max == float("-inf"), 0.0, running_max)


@triton.jit
def _log_mixture(log_p_s, log_p_t, log_beta, log_one_minus_beta):
    """``log(beta p_t + (1 - beta) p_s)`` as a log-sum-exp of two terms, exact when either
    probability underflows. Written with comparisons, not tl.maximum, so a NaN stays NaN."""
    from_teacher = log_beta + log_p_t
    from_student = log_one_minus_beta + log_p_s
    teacher_larger = from_teacher > from_student
    larger = tl.where(teacher_larger, from_teacher, from_student)
    smaller = tl.where(teacher_larger, from_student, from_teacher)
    return larger + tl.log(1.0 + tl.exp(smaller - larger))


@triton.jit
def _kd_loss_kernel(
    student_ptr, teacher_ptr, labels_ptr, grad_ptr, row_loss_ptr,
    student_row_stride, teacher_row_stride, grad_row_stride,
    student_batch_stride, teacher_batch_stride, grad_batch_stride, rows_per_batch,
    num_classes, temperature, soft_weight, hard_weight, beta, ignore_index, grad_scale,
    DIVERGENCE: tl.constexpr,      # _NONE, _FORWARD_KL, _REVERSE_KL, _JSD or _MSE
    SOFTMAX_DIVERGENCE: tl.constexpr,  # DIVERGENCE is forward_kl, reverse_kl or jsd
    LOAD_TEACHER: tl.constexpr,    # some term reads the teacher
    HARD: tl.constexpr,            # hard CE term present (hard_weight > 0 and some label)
    CE_SHARES_SOFTMAX: tl.constexpr,  # T == 1 and a softmax divergence: q is p_s, no extra exp
    HAS_LABELS: tl.constexpr,      # labels tensor given (ignore_index applies)
    TEACHER_LABELS: tl.constexpr,  # hard label = first argmax of the teacher row
    WRITE_GRAD: tl.constexpr,
    SCALE_IN_MEMORY: tl.constexpr,  # grad_scale is a pointer to one float32 (no host sync)
    BLOCK_V: tl.constexpr,
):
    """One program per row: ``row_loss[row]`` and, if WRITE_GRAD, ``grad[row, :]``.

    Row ``r`` of a (B, S, V) view is ``(r // S, r % S)``; a 2-D (N, V) tensor is the case
    ``rows_per_batch = N`` (batch strides unused)."""
    row = tl.program_id(0).to(tl.int64)
    batch = row // rows_per_batch
    position = row % rows_per_batch
    student_row = student_ptr + batch * student_batch_stride + position * student_row_stride
    teacher_row = teacher_ptr + batch * teacher_batch_stride + position * teacher_row_stride
    grad_row = grad_ptr + batch * grad_batch_stride + position * grad_row_stride
    block_cols = tl.arange(0, BLOCK_V)
    if SCALE_IN_MEMORY:
        grad_scale = tl.load(grad_scale)

    keep = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
        # an unvalidated label outside [0, V) is never used as an address: NaN loss instead
        label_ok = (label >= 0) & (label < num_classes)
        label = tl.where(label_ok, label, 0)
    if keep:
        inv_temperature = 1.0 / temperature

        # ---------------------------------------------------------------- pass 1: statistics
        max_s = float("-inf")      # running max of raw student logits (shared by T and T = 1)
        max_t = float("-inf")      # running max of raw teacher logits
        sum_exp_s = 0.0            # sum exp((z_s - max_s) / T)
        sum_exp_t = 0.0            # sum exp((z_t - max_t) / T)
        sum_exp_ce = 0.0           # sum exp(z_s - max_s)
        kl_acc = 0.0               # forward: sum e_t (s_t - s_s); reverse: sum e_s (s_s - s_t)
        sum_sq = 0.0               # mse: sum (z_s - z_t)^2
        best_t = float("-inf")     # teacher argmax (first index of the maximum)
        best_idx = 0
        teacher_nan = 0            # some teacher logit is NaN (argmax would hide it)
        for start in range(0, num_classes, BLOCK_V):
            cols = start + block_cols
            mask = cols < num_classes
            z_s = _load_row_block(student_row, cols, mask)
            z_t = z_s
            if LOAD_TEACHER:
                z_t = _load_row_block(teacher_row, cols, mask)
                if TEACHER_LABELS:   # one reduction gives the block's max and its first index
                    block_max_t, block_argmax_t = tl.max(z_t, axis=0, return_indices=True)
                    teacher_nan = tl.maximum(teacher_nan, tl.max((z_t != z_t).to(tl.int32),
                                                                 axis=0))
                    is_better = block_max_t > best_t   # strict: an earlier block wins ties
                    best_idx = tl.where(is_better, start + block_argmax_t, best_idx)
                    best_t = tl.where(is_better, block_max_t, best_t)
                else:
                    block_max_t = tl.max(z_t, axis=0)
            if DIVERGENCE == 4:
                diff = tl.where(mask, z_s - z_t, 0.0)
                sum_sq += tl.sum(diff * diff, axis=0)
            if SOFTMAX_DIVERGENCE or HARD:
                new_max_s = tl.maximum(max_s, tl.max(z_s, axis=0))
                shift_s = _safe_max(new_max_s)
                # old-to-new max step in units of 1/T (<= 0; -inf when nothing was seen yet)
                step_s = (max_s - shift_s) * inv_temperature
                if HARD and not CE_SHARES_SOFTMAX:
                    sum_exp_ce = (sum_exp_ce * tl.exp(max_s - shift_s)
                                  + tl.sum(tl.exp(z_s - shift_s), axis=0))
                if SOFTMAX_DIVERGENCE:
                    new_max_t = tl.maximum(max_t, block_max_t)
                    shift_t = _safe_max(new_max_t)
                    step_t = (max_t - shift_t) * inv_temperature
                    scaled_s = (z_s - shift_s) * inv_temperature
                    scaled_t = (z_t - shift_t) * inv_temperature
                    exp_s = tl.exp(scaled_s)
                    exp_t = tl.exp(scaled_t)
                    if DIVERGENCE == 1:
                        # moving both maxima shifts every old (s_t - s_s) by step_t - step_s
                        moved = tl.where(sum_exp_t > 0, sum_exp_t * (step_t - step_s), 0.0)
                        terms = tl.where(z_t == float("-inf"), 0.0, exp_t * (scaled_t - scaled_s))
                        kl_acc = tl.exp(step_t) * (kl_acc + moved) + tl.sum(terms, axis=0)
                    if DIVERGENCE == 2:
                        moved = tl.where(sum_exp_s > 0, sum_exp_s * (step_s - step_t), 0.0)
                        terms = tl.where(z_s == float("-inf"), 0.0, exp_s * (scaled_s - scaled_t))
                        kl_acc = tl.exp(step_s) * (kl_acc + moved) + tl.sum(terms, axis=0)
                    sum_exp_s = sum_exp_s * tl.exp(step_s) + tl.sum(exp_s, axis=0)
                    sum_exp_t = sum_exp_t * tl.exp(step_t) + tl.sum(exp_t, axis=0)
                    max_t = new_max_t
                max_s = new_max_s

        row_loss = 0.0
        divergence = 0.0
        if SOFTMAX_DIVERGENCE or HARD:
            shift_s = _safe_max(max_s)
        if SOFTMAX_DIVERGENCE:
            shift_t = _safe_max(max_t)
            log_sum_s = tl.log(sum_exp_s)
            log_sum_t = tl.log(sum_exp_t)
        if DIVERGENCE == 1:   # KL(p_t||p_s) = sum p_t (s_t - s_s) - log sum_t + log sum_s
            divergence = kl_acc / sum_exp_t - log_sum_t + log_sum_s
        if DIVERGENCE == 2:
            divergence = kl_acc / sum_exp_s - log_sum_s + log_sum_t

        # ---------------------------------------------------------------- pass 2 (jsd only)
        student_dot_g = 0.0   # <p_s, g>, g = (1 - beta) log(p_s / m)
        if DIVERGENCE == 3:
            log_beta = tl.log(beta)
            log_one_minus_beta = tl.log(1.0 - beta)
            teacher_term = 0.0   # sum p_t (log p_t - log m)
            for start in range(0, num_classes, BLOCK_V):
                cols = start + block_cols
                mask = cols < num_classes
                z_s = _load_row_block(student_row, cols, mask)
                z_t = _load_row_block(teacher_row, cols, mask)
                log_p_s = (z_s - shift_s) * inv_temperature - log_sum_s
                log_p_t = (z_t - shift_t) * inv_temperature - log_sum_t
                log_m = _log_mixture(log_p_s, log_p_t, log_beta, log_one_minus_beta)
                g = (1.0 - beta) * (log_p_s - log_m)
                student_dot_g += tl.sum(
                    tl.where(log_p_s == float("-inf"), 0.0, tl.exp(log_p_s) * g), axis=0)
                teacher_term += tl.sum(
                    tl.where(log_p_t == float("-inf"), 0.0, tl.exp(log_p_t) * (log_p_t - log_m)),
                    axis=0)
            divergence = beta * teacher_term + student_dot_g

        if SOFTMAX_DIVERGENCE:
            row_loss += soft_weight * temperature * temperature * divergence
        if DIVERGENCE == 4:
            row_loss += soft_weight * sum_sq / num_classes
        if HARD:
            if CE_SHARES_SOFTMAX:
                log_sum_ce = log_sum_s
            else:
                log_sum_ce = tl.log(sum_exp_ce)
            if TEACHER_LABELS:
                label = best_idx
            # read before the gradient pass may overwrite the row (in-place)
            label_logit = tl.load(student_row + label).to(tl.float32)
            row_loss += hard_weight * (log_sum_ce - (label_logit - shift_s))
        # NaN poison for a row whose hard label is bad or came from a NaN teacher row
        poison = 0.0
        if HAS_LABELS:
            poison += tl.where(label_ok, 0.0, float("nan"))
        if TEACHER_LABELS:
            poison += tl.where(teacher_nan > 0, float("nan"), 0.0)
        row_loss += poison
        tl.store(row_loss_ptr + row, row_loss)

        # ---------------------------------------------------------------- last pass: gradient
        if WRITE_GRAD:
            soft_scale = grad_scale * soft_weight * temperature
            hard_scale = grad_scale * hard_weight
            for start in range(0, num_classes, BLOCK_V):
                cols = start + block_cols
                mask = cols < num_classes
                z_s = _load_row_block(student_row, cols, mask)
                z_t = z_s
                if DIVERGENCE != 0:
                    z_t = _load_row_block(teacher_row, cols, mask)
                grad = tl.zeros([BLOCK_V], dtype=tl.float32)
                if SOFTMAX_DIVERGENCE:
                    log_p_s = (z_s - shift_s) * inv_temperature - log_sum_s
                    log_p_t = (z_t - shift_t) * inv_temperature - log_sum_t
                    p_s = tl.exp(log_p_s)
                    if DIVERGENCE == 1:
                        grad += soft_scale * (p_s - tl.exp(log_p_t))
                    if DIVERGENCE == 2:
                        grad += soft_scale * tl.where(
                            log_p_s == float("-inf"), 0.0, p_s * (log_p_s - log_p_t - divergence))
                    if DIVERGENCE == 3:
                        log_m = _log_mixture(log_p_s, log_p_t, log_beta, log_one_minus_beta)
                        g = (1.0 - beta) * (log_p_s - log_m)
                        grad += soft_scale * tl.where(
                            log_p_s == float("-inf"), 0.0, p_s * (g - student_dot_g))
                if DIVERGENCE == 4:
                    grad += (grad_scale * soft_weight * 2.0 / num_classes) * (z_s - z_t)
                if HARD:
                    if CE_SHARES_SOFTMAX:
                        q = p_s
                    else:
                        q = tl.exp(z_s - shift_s - log_sum_ce)
                    grad += hard_scale * tl.where(cols == label, q - 1.0, q)
                grad += poison
                tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(row_loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, num_classes, BLOCK_V):
                cols = start + block_cols
                zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
                tl.store(grad_row + cols, zeros, mask=cols < num_classes)


def _check_matrix(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() not in (2, 3) or (tensor.stride(-1) != 1 and tensor.shape[-1] > 1):
        raise ValueError(f"{name} must be a 2-D (N, V) or 3-D (B, S, V) tensor with last-dim "
                         f"stride 1, got shape {tuple(tensor.shape)} and strides "
                         f"{tensor.stride()}")


def _row_strides(tensor: torch.Tensor):
    """(row stride, batch stride) of an (N, V) or (B, S, V) tensor (batch stride 0 for 2-D)."""
    if tensor.dim() == 2:
        return tensor.stride(0), 0
    return tensor.stride(1), tensor.stride(0)


def kd_forward_triton(student_logits, teacher_logits, labels, *, teacher_labels, temperature,
                      soft_weight, hard_weight, divergence, beta, ignore_index, grad_scale, grad,
                      block_v=None):
    """Row losses ``(N,)`` float32 of the fused KD loss; fills ``grad`` (if not None) with
    ``grad_scale * d row_loss / d student_logits``. Follows ``_BACKEND_CONTRACT`` in
    ``fastkd/loss.py``; ``block_v`` (a power of two) overrides :func:`block_settings`, for tests.
    """
    _check_matrix("student_logits", student_logits)
    _check_matrix("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError("teacher_logits must have the student's shape "
                         f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
    num_classes = student_logits.shape[-1]
    num_rows = student_logits.numel() // max(num_classes, 1)
    if labels is not None:
        if teacher_labels:
            raise ValueError("labels must be None when teacher_labels=True")
        if labels.shape != (num_rows,) or labels.dtype != torch.int64 or labels.stride(0) != 1:
            raise ValueError(f"labels must be a contiguous ({num_rows},) int64 tensor, got "
                             f"{tuple(labels.shape)} {labels.dtype}")
    if grad is not None:
        _check_matrix("grad", grad)
        if grad.shape != student_logits.shape or grad.dtype != student_logits.dtype:
            raise ValueError(f"grad must be a {tuple(student_logits.shape)} "
                             f"{student_logits.dtype} tensor, got {tuple(grad.shape)} {grad.dtype}")
    if divergence not in _DIVERGENCE_CODES:
        raise ValueError(f"divergence must be one of {', '.join(_DIVERGENCE_CODES)}; "
                         f"got {divergence!r}")

    row_loss = torch.empty(num_rows, dtype=torch.float32, device=student_logits.device)
    if num_rows == 0:
        return row_loss
    rows_per_batch = student_logits.shape[1] if student_logits.dim() == 3 else num_rows
    student_strides = _row_strides(student_logits)
    teacher_strides = _row_strides(teacher_logits)
    grad_strides = _row_strides(grad) if grad is not None else (0, 0)
    scale_in_memory = isinstance(grad_scale, torch.Tensor)
    if scale_in_memory:
        grad_scale = grad_scale.to(device=student_logits.device, dtype=torch.float32).reshape(1)
    else:
        grad_scale = float(grad_scale)
    block, num_warps = block_settings(num_classes)
    if block_v is not None:
        block = block_v
    code = _DIVERGENCE_CODES[divergence] if soft_weight > 0 else _NONE
    hard = hard_weight > 0 and (labels is not None or bool(teacher_labels))
    teacher_labels = bool(teacher_labels) and hard   # the argmax only feeds the hard term
    _kd_loss_kernel[(num_rows,)](
        student_logits, teacher_logits,
        labels if labels is not None else row_loss,         # placeholder, never read
        grad if grad is not None else student_logits,       # placeholder, never written
        row_loss,
        student_strides[0], teacher_strides[0], grad_strides[0],
        student_strides[1], teacher_strides[1], grad_strides[1], rows_per_batch,
        num_classes, float(temperature), float(soft_weight), float(hard_weight), float(beta),
        int(ignore_index), grad_scale,
        DIVERGENCE=code,
        SOFTMAX_DIVERGENCE=code in (_FORWARD_KL, _REVERSE_KL, _JSD),
        LOAD_TEACHER=code != _NONE or teacher_labels,
        HARD=hard,
        CE_SHARES_SOFTMAX=hard and code in (_FORWARD_KL, _REVERSE_KL, _JSD) and temperature == 1.0,
        HAS_LABELS=labels is not None,
        TEACHER_LABELS=teacher_labels,
        WRITE_GRAD=grad is not None,
        SCALE_IN_MEMORY=scale_in_memory,
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return row_loss
