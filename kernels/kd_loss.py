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

One program handles ``BLOCK_ROWS`` rows and streams them in tiles of ``BLOCK_ROWS x BLOCK_V``
columns. Large vocabularies use one row per program (a row fills it); small ones (V = 10 ...
1000, classic KD) pack many rows into one tile, so a program is not mostly padding:

* pass 1 (statistics): per row, running raw maxima ``M_s``, ``M_t`` and rescaled sums of
  ``exp((z - M) / T)`` for student and teacher, ``exp(z_s - M_s)`` for the hard CE, the teacher's
  first argmax, the sum of squares for mse, and for the KL divergences the rescaled accumulator
  ``sum exp(s_t) (s_t - s_s)`` (forward) or ``sum exp(s_s) (s_s - s_t)`` (reverse) with
  ``s = (z - M) / T`` relative to the *current* maxima. Keeping every difference inside one row
  (``z - M``) instead of forming ``lse_s - lse_t`` makes logits shifted by 1e4 (even by opposite
  amounts for student and teacher) lose no precision.
* pass 2 (jsd only): ``g`` needs normalised ``p_s`` and ``p_t``, so a second statistics pass
  gathers ``sum p_t (log p_t - log m)`` and ``<p_s, g>``.
* last pass: writes the gradient (skipped when no gradient is wanted). It is the only pass that
  writes, and each tile is read before the same program overwrites it, so the gradient buffer
  may be the student tensor itself.

Inputs are read twice (three times for jsd; a row that fits in one tile is re-read from cache),
the gradient is written once and no (N, V) temporary is allocated. At T = 1 the hard CE reuses
the student softmax instead of its own exp per element. All arithmetic is float32; no exp is
ever taken of an unshifted logit. ``-inf`` logits are probability 0 exactly (their
``0 * log 0`` terms are dropped), and a NaN in any input of a kept row makes its loss NaN: NaN
enters every sum of exps it touches, and no ``where`` guard on ``-inf`` can select it away.
Ignored rows are never read (their loads are masked) and get loss 0 and a zero gradient row.
"""
import torch
import triton
import triton.language as tl

__all__ = ["kd_forward_triton", "block_settings", "column_settings", "launch_config",
           "aot_specializations", "safe_max", "log_mixture", "check_labels_and_divergence"]

# divergence codes (constexpr); NONE when soft_weight == 0
_NONE, _FORWARD_KL, _REVERSE_KL, _JSD, _MSE = 0, 1, 2, 3, 4
_DIVERGENCE_CODES = {"forward_kl": _FORWARD_KL, "reverse_kl": _REVERSE_KL, "jsd": _JSD,
                     "mse": _MSE}

# Largest block of columns a program holds at once; longer rows are streamed. 4096 columns over
# 8 warps is 16 per thread and tensor, which compiles without spills (ptxas figures:
# benchmarks/results/kernel-resources-aot); 8192 nears the 255-register limit.
MAX_BLOCK_V = 4096
# Elements per tile when several rows share a program (small V), at 4 warps: 4 per thread.
# Every row keeps ~20 running statistics in registers, replicated over the threads that share
# the row, so packed rows cost far more registers than their elements: 2048-element tiles spill.
TILE_ELEMENTS = 512
MAX_BLOCK_ROWS = 32
_MAX_GRID_Y = 65535


def block_settings(num_classes: int):
    """``(BLOCK_ROWS, BLOCK_V, num_warps)``: BLOCK_V is the next power of two of V capped at
    ``MAX_BLOCK_V``; rows per program fill a tile of ``TILE_ELEMENTS`` when V is small
    (V = 10: 32 rows of 16 columns; V = 100: 4 x 128), else 1. Packed tiles use 4 warps; a
    single row one warp per 512 columns (16 elements per thread), between 1 and 8 warps.

    Fixed rule instead of ``triton.autotune``: autotuning cannot be checked in Triton's CPU
    interpreter and would multiply its run time by the number of configurations.
    """
    block_v, num_warps = column_settings(num_classes)
    block_rows = max(1, min(MAX_BLOCK_ROWS, TILE_ELEMENTS // block_v))
    return block_rows, block_v, 4 if block_rows > 1 else num_warps


def column_settings(num_classes: int):
    """``(BLOCK_V, num_warps)`` for a kernel with one row per program (the sparse family): the
    next power of two of V capped at ``MAX_BLOCK_V``, one warp per 512 columns, 1 to 8 warps."""
    block_v = min(triton.next_power_of_2(num_classes), MAX_BLOCK_V)
    return block_v, max(1, min(8, block_v // 512))


@triton.jit
def _load_tile(row_ptrs, cols, mask):
    """A (rows, BLOCK_V) tile as float32; masked entries (padding, ignored rows) read as -inf."""
    return tl.load(row_ptrs[:, None] + cols[None, :], mask=mask,
                   other=float("-inf")).to(tl.float32)


@triton.jit
def safe_max(running_max):
    """The shift to subtract: the running max, or 0 while everything seen so far is -inf
    (keeps ``-inf - -inf`` out of exp; NaN passes through unchanged)."""
    return tl.where(running_max == float("-inf"), 0.0, running_max)


@triton.jit
def log_mixture(log_p_s, log_p_t, beta):
    """``log(beta p_t + (1 - beta) p_s)`` formed relative to the larger of the two
    log-probabilities: no underflow, and exactly ``log p`` where ``p_t = p_s`` (``beta + (1 -
    beta)`` is exactly 1 in float32). Written with comparisons, not tl.maximum, so a NaN stays
    NaN."""
    top = tl.where(log_p_t > log_p_s, log_p_t, log_p_s)
    top = tl.where(top == float("-inf"), 0.0, top)
    return top + tl.log(beta * tl.exp(log_p_t - top) + (1.0 - beta) * tl.exp(log_p_s - top))


@triton.jit
def _kd_loss_kernel(
    student_ptr, teacher_ptr, labels_ptr, grad_ptr, row_loss_ptr,
    student_row_stride, teacher_row_stride, grad_row_stride,
    student_batch_stride, teacher_batch_stride, grad_batch_stride, rows_per_batch, num_rows,
    num_classes, temperature, soft_weight, hard_weight, beta, ignore_index, grad_scale,
    DIVERGENCE: tl.constexpr,      # _NONE, _FORWARD_KL, _REVERSE_KL, _JSD or _MSE
    SOFTMAX_DIVERGENCE: tl.constexpr,  # DIVERGENCE is forward_kl, reverse_kl or jsd
    LOAD_TEACHER: tl.constexpr,    # some term reads the teacher
    HARD: tl.constexpr,            # hard CE term present (hard_weight > 0 and some label)
    CE_SHARES_SOFTMAX: tl.constexpr,  # T == 1 and a softmax divergence: q is p_s, no extra exp
    HAS_LABELS: tl.constexpr,      # labels tensor given (ignore_index applies)
    TEACHER_LABELS: tl.constexpr,  # hard label = first argmax of the teacher row
    WRITE_GRAD: tl.constexpr,
    SCALE_IN_MEMORY: tl.constexpr,  # grad_scale points to one float32 (kept count on device)
    BATCHED: tl.constexpr,         # (B, S, V) view with batch strides (else (N, V))
    BLOCK_ROWS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``BLOCK_ROWS`` rows per program: ``row_loss[rows]`` and, if WRITE_GRAD, ``grad[rows, :]``.

    A (B, S, V) view (BATCHED) such as ``logits[:, :-1]`` is read in place on a 2-D grid,
    program (i, b) taking rows ``b * S + i * BLOCK_ROWS ...`` (no division per row); a 2-D
    (N, V) tensor on a 1-D grid.
    Statistics are vectors over the rows."""
    if BATCHED:   # (B, S, V) view: grid (S blocks, B); flat row r = b * S + s
        batch = tl.program_id(1).to(tl.int64)
        positions = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_valid = positions < rows_per_batch
        rows = batch * rows_per_batch + positions
        student_rows = (student_ptr + batch * student_batch_stride
                        + positions * student_row_stride)
        teacher_rows = (teacher_ptr + batch * teacher_batch_stride
                        + positions * teacher_row_stride)
        grad_rows = grad_ptr + batch * grad_batch_stride + positions * grad_row_stride
    else:         # (N, V)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_valid = rows < num_rows
        student_rows = student_ptr + rows * student_row_stride
        teacher_rows = teacher_ptr + rows * teacher_row_stride
        grad_rows = grad_ptr + rows * grad_row_stride
    block_cols = tl.arange(0, BLOCK_V)
    if SCALE_IN_MEMORY:
        grad_scale = tl.load(grad_scale)

    keep = row_valid
    label = tl.zeros([BLOCK_ROWS], dtype=tl.int64)
    label_ok = row_valid
    if HAS_LABELS:
        label = tl.load(labels_ptr + rows, mask=row_valid, other=ignore_index).to(tl.int64)
        keep = row_valid & (label != ignore_index)
        # an unvalidated label outside [0, V) is never used as an address: NaN loss instead
        label_ok = (label >= 0) & (label < num_classes)
        label = tl.where(label_ok, label, 0)
    inv_temperature = 1.0 / temperature

    # -------------------------------------------------------------------- pass 1: statistics
    minus_inf = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)
    zero = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    max_s = minus_inf          # running max of raw student logits (shared by T and T = 1)
    max_t = minus_inf          # running max of raw teacher logits
    sum_exp_s = zero           # sum exp((z_s - max_s) / T)
    sum_exp_t = zero           # sum exp((z_t - max_t) / T)
    sum_exp_ce = zero          # sum exp(z_s - max_s)
    kl_acc = zero              # forward: sum e_t (s_t - s_s); reverse: sum e_s (s_s - s_t)
    sum_sq = zero              # mse: sum (z_s - z_t)^2
    best_t = minus_inf         # teacher argmax (first index of the maximum)
    best_idx = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
    teacher_nan = tl.zeros([BLOCK_ROWS], dtype=tl.int32)  # a NaN the argmax would hide
    for start in range(0, num_classes, BLOCK_V):
        cols = start + block_cols
        mask = keep[:, None] & (cols < num_classes)[None, :]
        z_s = _load_tile(student_rows, cols, mask)
        z_t = z_s
        if LOAD_TEACHER:
            z_t = _load_tile(teacher_rows, cols, mask)
            if TEACHER_LABELS:   # one reduction gives the block's max and its first index
                block_max_t, block_argmax_t = tl.max(z_t, axis=1, return_indices=True)
                is_better = block_max_t > best_t   # strict: an earlier block wins ties
                best_idx = tl.where(is_better, start + block_argmax_t, best_idx)
                best_t = tl.where(is_better, block_max_t, best_t)
                teacher_nan = tl.maximum(teacher_nan, tl.max((z_t != z_t).to(tl.int32), axis=1))
            else:
                block_max_t = tl.max(z_t, axis=1)
        if DIVERGENCE == 4:
            diff = tl.where(mask, z_s - z_t, 0.0)
            sum_sq += tl.sum(diff * diff, axis=1)
        if SOFTMAX_DIVERGENCE or HARD:
            new_max_s = tl.maximum(max_s, tl.max(z_s, axis=1))
            shift_s = safe_max(new_max_s)
            # old-to-new max step in units of 1/T (<= 0; -inf when nothing was seen yet)
            step_s = (max_s - shift_s) * inv_temperature
            if HARD and not CE_SHARES_SOFTMAX:
                sum_exp_ce = (sum_exp_ce * tl.exp(max_s - shift_s)
                              + tl.sum(tl.exp(z_s - shift_s[:, None]), axis=1))
            if SOFTMAX_DIVERGENCE:
                new_max_t = tl.maximum(max_t, block_max_t)
                shift_t = safe_max(new_max_t)
                step_t = (max_t - shift_t) * inv_temperature
                scaled_s = (z_s - shift_s[:, None]) * inv_temperature
                scaled_t = (z_t - shift_t[:, None]) * inv_temperature
                exp_s = tl.exp(scaled_s)
                exp_t = tl.exp(scaled_t)
                if DIVERGENCE == 1:
                    # moving both maxima shifts every old (s_t - s_s) by step_t - step_s
                    moved = tl.where(sum_exp_t > 0, sum_exp_t * (step_t - step_s), 0.0)
                    terms = tl.where(z_t == float("-inf"), 0.0, exp_t * (scaled_t - scaled_s))
                    kl_acc = tl.exp(step_t) * (kl_acc + moved) + tl.sum(terms, axis=1)
                if DIVERGENCE == 2:
                    moved = tl.where(sum_exp_s > 0, sum_exp_s * (step_s - step_t), 0.0)
                    terms = tl.where(z_s == float("-inf"), 0.0, exp_s * (scaled_s - scaled_t))
                    kl_acc = tl.exp(step_s) * (kl_acc + moved) + tl.sum(terms, axis=1)
                sum_exp_s = sum_exp_s * tl.exp(step_s) + tl.sum(exp_s, axis=1)
                sum_exp_t = sum_exp_t * tl.exp(step_t) + tl.sum(exp_t, axis=1)
                max_t = new_max_t
            max_s = new_max_s

    row_loss = zero
    divergence = zero
    if SOFTMAX_DIVERGENCE or HARD:
        shift_s = safe_max(max_s)
    if SOFTMAX_DIVERGENCE:
        shift_t = safe_max(max_t)
        log_sum_s = tl.log(sum_exp_s)
        log_sum_t = tl.log(sum_exp_t)
    if DIVERGENCE == 1:   # KL(p_t||p_s) = sum p_t (s_t - s_s) - log sum_t + log sum_s
        divergence = kl_acc / sum_exp_t - log_sum_t + log_sum_s
    if DIVERGENCE == 2:
        divergence = kl_acc / sum_exp_s - log_sum_s + log_sum_t

    # -------------------------------------------------------------------- pass 2 (jsd only)
    student_dot_g = zero   # <p_s, g>, g = (1 - beta) log(p_s / m)
    if DIVERGENCE == 3:
        teacher_term = zero   # sum p_t (log p_t - log m)
        for start in range(0, num_classes, BLOCK_V):
            cols = start + block_cols
            mask = keep[:, None] & (cols < num_classes)[None, :]
            z_s = _load_tile(student_rows, cols, mask)
            z_t = _load_tile(teacher_rows, cols, mask)
            log_p_s = (z_s - shift_s[:, None]) * inv_temperature - log_sum_s[:, None]
            log_p_t = (z_t - shift_t[:, None]) * inv_temperature - log_sum_t[:, None]
            log_m = log_mixture(log_p_s, log_p_t, beta)
            g = (1.0 - beta) * (log_p_s - log_m)
            student_dot_g += tl.sum(
                tl.where(log_p_s == float("-inf"), 0.0, tl.exp(log_p_s) * g), axis=1)
            teacher_term += tl.sum(
                tl.where(log_p_t == float("-inf"), 0.0, tl.exp(log_p_t) * (log_p_t - log_m)),
                axis=1)
        divergence = beta * teacher_term + student_dot_g

    if SOFTMAX_DIVERGENCE:
        row_loss += soft_weight * temperature * temperature * divergence
    if DIVERGENCE == 4:
        row_loss += soft_weight * sum_sq / num_classes
    if HARD:
        log_sum_ce = log_sum_s if CE_SHARES_SOFTMAX else tl.log(sum_exp_ce)
        if TEACHER_LABELS:
            label = best_idx.to(tl.int64)
        # read before the gradient pass may overwrite the row (in-place)
        label_logit = tl.load(student_rows + label, mask=keep, other=0.0).to(tl.float32)
        row_loss += hard_weight * (log_sum_ce - (label_logit - shift_s))
    # NaN for a kept row whose hard label is out of range or came from a NaN teacher row
    poison = zero
    if HAS_LABELS:
        poison += tl.where(label_ok, 0.0, float("nan"))
    if TEACHER_LABELS:
        poison += tl.where(teacher_nan > 0, float("nan"), 0.0)
    row_loss = tl.where(keep, row_loss + poison, 0.0)
    tl.store(row_loss_ptr + rows, row_loss, mask=row_valid)

    # -------------------------------------------------------------------- last pass: gradient
    if WRITE_GRAD:
        soft_scale = grad_scale * soft_weight * temperature
        hard_scale = grad_scale * hard_weight
        for start in range(0, num_classes, BLOCK_V):
            cols = start + block_cols
            in_row = (cols < num_classes)[None, :]
            mask = keep[:, None] & in_row
            z_s = _load_tile(student_rows, cols, mask)
            z_t = z_s
            if DIVERGENCE != 0:
                z_t = _load_tile(teacher_rows, cols, mask)
            grad = tl.zeros([BLOCK_ROWS, BLOCK_V], dtype=tl.float32)
            if SOFTMAX_DIVERGENCE:
                log_p_s = (z_s - shift_s[:, None]) * inv_temperature - log_sum_s[:, None]
                log_p_t = (z_t - shift_t[:, None]) * inv_temperature - log_sum_t[:, None]
                p_s = tl.exp(log_p_s)
                if DIVERGENCE == 1:
                    grad += soft_scale * (p_s - tl.exp(log_p_t))
                if DIVERGENCE == 2:
                    grad += soft_scale * tl.where(
                        log_p_s == float("-inf"), 0.0,
                        p_s * (log_p_s - log_p_t - divergence[:, None]))
                if DIVERGENCE == 3:
                    log_m = log_mixture(log_p_s, log_p_t, beta)
                    g = (1.0 - beta) * (log_p_s - log_m)
                    grad += soft_scale * tl.where(
                        log_p_s == float("-inf"), 0.0, p_s * (g - student_dot_g[:, None]))
            if DIVERGENCE == 4:
                grad += (grad_scale * soft_weight * 2.0 / num_classes) * (z_s - z_t)
            if HARD:
                q = (p_s if CE_SHARES_SOFTMAX
                     else tl.exp(z_s - shift_s[:, None] - log_sum_ce[:, None]))
                grad += hard_scale * tl.where(cols[None, :] == label[:, None], q - 1.0, q)
            grad = tl.where(keep[:, None], grad + poison[:, None], 0.0)
            tl.store(grad_rows[:, None] + cols[None, :], grad.to(grad_ptr.dtype.element_ty),
                     mask=row_valid[:, None] & in_row)


# ----------------------------------------------------------------------------- launcher
def _check_matrix(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() not in (2, 3) or (tensor.stride(-1) != 1 and tensor.shape[-1] > 1):
        raise ValueError(f"{name} must be a 2-D (N, V) or 3-D (B, S, V) tensor with last-dim "
                         f"stride 1, got shape {tuple(tensor.shape)} and strides "
                         f"{tensor.stride()}")


def check_labels_and_divergence(labels, teacher_labels, num_rows, divergence, codes) -> None:
    """The launch arguments the dense and the sparse launchers check alike: ``labels`` None or
    a contiguous ``(num_rows,)`` int64 tensor (None with ``teacher_labels``) and a ``divergence``
    the kernel has a code for."""
    if labels is not None:
        if teacher_labels:
            raise ValueError("labels must be None when teacher_labels=True")
        if labels.shape != (num_rows,) or labels.dtype != torch.int64 or labels.stride(0) != 1:
            raise ValueError(f"labels must be a contiguous ({num_rows},) int64 tensor, got "
                             f"{tuple(labels.shape)} {labels.dtype}")
    if divergence not in codes:
        raise ValueError(f"divergence must be one of {', '.join(codes)}; got {divergence!r}")


def _row_strides(tensor: torch.Tensor):
    """(row stride, batch stride) of an (N, V) or (B, S, V) tensor (batch stride 0 for 2-D)."""
    if tensor.dim() == 2:
        return tensor.stride(0), 0
    return tensor.stride(1), tensor.stride(0)


def launch_config(num_classes, *, divergence, soft_weight, hard_weight, temperature,
                  has_labels, teacher_labels, write_grad, scale_in_memory, batched=False,
                  block_v=None, block_rows=None):
    """``(constexprs, num_warps, BLOCK_ROWS)`` of the kernel specialization a call launches: the
    launcher and the ahead-of-time compile test (``aot_specializations``) share this rule."""
    rows, block, num_warps = block_settings(num_classes)
    if block_v is not None:
        block, rows = block_v, 1
    if block_rows is not None:
        rows = block_rows
    code = _DIVERGENCE_CODES[divergence] if soft_weight > 0 else _NONE
    hard = hard_weight > 0 and (has_labels or bool(teacher_labels))
    teacher_labels = bool(teacher_labels) and hard   # the argmax only feeds the hard term
    softmax_divergence = code in (_FORWARD_KL, _REVERSE_KL, _JSD)
    constexprs = dict(
        DIVERGENCE=code,
        SOFTMAX_DIVERGENCE=softmax_divergence,
        LOAD_TEACHER=code != _NONE or teacher_labels,
        HARD=hard,
        CE_SHARES_SOFTMAX=hard and softmax_divergence and temperature == 1.0,
        HAS_LABELS=has_labels,
        TEACHER_LABELS=teacher_labels,
        WRITE_GRAD=write_grad,
        SCALE_IN_MEMORY=scale_in_memory,
        BATCHED=batched,
        BLOCK_ROWS=rows,
        BLOCK_V=block,
    )
    return constexprs, num_warps


def kd_forward_triton(student_logits, teacher_logits, labels, options, *, grad, grad_scale=1.0,
                      block_v=None, block_rows=None):
    """Row losses ``(N,)`` float32 of the fused KD loss; fills ``grad`` (if not None) with
    ``grad_scale * d row_loss / d student_logits``. Follows ``fastkd.dispatch.DenseBackend``;
    ``block_v`` / ``block_rows`` (powers of two) override :func:`block_settings`, for tests.
    """
    _check_matrix("student_logits", student_logits)
    _check_matrix("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError("teacher_logits must have the student's shape "
                         f"{tuple(student_logits.shape)}, got {tuple(teacher_logits.shape)}")
    num_classes = student_logits.shape[-1]
    num_rows = student_logits.numel() // max(num_classes, 1)
    check_labels_and_divergence(labels, options.teacher_labels, num_rows, options.divergence,
                                 _DIVERGENCE_CODES)
    if grad is not None:
        _check_matrix("grad", grad)
        if grad.shape != student_logits.shape or grad.dtype != student_logits.dtype:
            raise ValueError(f"grad must be a {tuple(student_logits.shape)} "
                             f"{student_logits.dtype} tensor, got {tuple(grad.shape)} {grad.dtype}")

    row_loss = torch.empty(num_rows, dtype=torch.float32, device=student_logits.device)
    if num_rows == 0:
        return row_loss
    rows_per_batch = student_logits.shape[1] if student_logits.dim() == 3 else num_rows
    student_strides = _row_strides(student_logits)
    teacher_strides = _row_strides(teacher_logits)
    grad_strides = _row_strides(grad) if grad is not None else (0, 0)
    scale_in_memory = isinstance(grad_scale, torch.Tensor)
    grad_scale = (grad_scale.to(device=student_logits.device, dtype=torch.float32).reshape(1)
                  if scale_in_memory else float(grad_scale))
    constexprs, num_warps = launch_config(
        num_classes, divergence=options.divergence, soft_weight=options.soft_weight,
        hard_weight=options.hard_weight, temperature=options.temperature,
        has_labels=labels is not None, teacher_labels=options.teacher_labels,
        write_grad=grad is not None, scale_in_memory=scale_in_memory,
        batched=student_logits.dim() == 3, block_v=block_v, block_rows=block_rows)
    row_blocks = triton.cdiv(rows_per_batch, constexprs["BLOCK_ROWS"])
    batches = student_logits.shape[0] if constexprs["BATCHED"] else 1
    # a grid's second dim holds at most 65535 programs: launch larger batches in slices
    for first in range(0, batches, _MAX_GRID_Y):
        count = min(_MAX_GRID_Y, batches - first)
        offset = first * rows_per_batch
        _kd_loss_kernel[(row_blocks, count)](
            student_logits[first:] if batches > 1 else student_logits,
            teacher_logits[first:] if batches > 1 else teacher_logits,
            labels[offset:] if labels is not None else row_loss,   # placeholder, never read
            (grad[first:] if batches > 1 else grad) if grad is not None
            else student_logits,                                   # placeholder, never written
            row_loss[offset:],
            student_strides[0], teacher_strides[0], grad_strides[0],
            student_strides[1], teacher_strides[1], grad_strides[1], rows_per_batch, num_rows,
            num_classes, options.temperature, options.soft_weight, options.hard_weight,
            options.beta, options.ignore_index, grad_scale,
            **constexprs,
            num_warps=num_warps,
        )
    return row_loss


# ----------------------------------------------------------------------------- AOT compile list
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_specializations():
    """The kernel specializations to compile ahead of time (no GPU needed) for every target in
    ``tests/loss/test_kernel_aot.py``: those the benchmarks launch (forward_kl at T = 2 with hard
    labels and the kept-row count on the device, forward only and forward+backward, fp32 / bf16 /
    bf16 + fp16 teacher, the tile shapes of V = 10, 100, 1000 and >= 32000) and one per
    divergence, label mode and host-scale variant (direct callers such as the fused-linear path)
    the tests run. Returns dicts with ``name``, ``kernel``, ``signature``,
    ``constexprs`` and ``num_warps``."""
    base = dict(divergence="forward_kl", soft_weight=0.5, hard_weight=0.5, temperature=2.0,
                has_labels=True, teacher_labels=False, write_grad=True, scale_in_memory=True)
    # the benchmarks' presets; V = 32000 has the one 4096-column tile of every larger V
    presets = ((10, ("fp32-fp32", "bf16-bf16")), (1000, ("fp32-fp32", "bf16-bf16")),
               (32000, ("fp32-fp32", "bf16-bf16", "bf16-fp16")))
    cases = [(f"bench-V{vocab}-{pair}-grad{int(write_grad)}", vocab, *pair.split("-"),
              dict(base, write_grad=write_grad))
             for vocab, pairs in presets for pair in pairs for write_grad in (True, False)]
    test_variants = [  # (name, V, student, teacher, overrides): the tests' other branches
        ("reverse_kl-teacher_labels", 100, "fp32", "fp16",
         dict(divergence="reverse_kl", teacher_labels=True, has_labels=False)),
        ("jsd-T1-shared_softmax", 32000, "fp16", "bf16", dict(divergence="jsd",
                                                             temperature=1.0)),
        ("jsd-teacher_labels", 100, "bf16", "bf16", dict(divergence="jsd", teacher_labels=True,
                                                         has_labels=False)),
        ("mse-labels", 32000, "bf16", "bf16", dict(divergence="mse")),
        ("hard_only", 100, "fp32", "fp16", dict(soft_weight=0.0)),
        ("soft_only-batched_view", 32000, "fp16", "fp16", dict(hard_weight=0.0,
                                                              batched=True)),
        ("forward_kl-host_scale-batched_view", 100, "bf16", "bf16",
         dict(scale_in_memory=False, batched=True)),
    ]
    cases += [(f"test-{name}-V{vocab}-{student}-{teacher}", vocab, student, teacher,
               dict(base, **overrides))
              for name, vocab, student, teacher, overrides in test_variants]
    specs = []
    for name, vocab, student, teacher, options in cases:
        constexprs, num_warps = launch_config(vocab, **options)
        scale = "*fp32" if options["scale_in_memory"] else "fp32"
        signature = dict(
            student_ptr="*" + student, teacher_ptr="*" + teacher, labels_ptr="*i64",
            grad_ptr="*" + student, row_loss_ptr="*fp32", student_row_stride="i64",
            teacher_row_stride="i64", grad_row_stride="i64", student_batch_stride="i64",
            teacher_batch_stride="i64", grad_batch_stride="i64", rows_per_batch="i64",
            num_rows="i64", num_classes="i32", temperature="fp32", soft_weight="fp32",
            hard_weight="fp32", beta="fp32", ignore_index="i32", grad_scale=scale)
        signature.update({key: "constexpr" for key in constexprs})
        specs.append(dict(name=name, kernel=_kd_loss_kernel, signature=signature,
                          constexprs=constexprs, num_warps=num_warps))
    return specs
