"""Fused sparse-teacher KD loss in Triton: the teacher is K (id, value) pairs per row, the student
a full row of V logits; loss and dense student gradient from one kernel launch.

Buckets (``u = z_s / T``, ``p_s = softmax(u)`` over all V classes, ``S`` = the K teacher ids)::

    tail="bucket"       K + 1 buckets: each kept id, plus one for every other class
                        teacher P_k = exp(v_k / T - lse)  (top-k)  or  c_k / sum c  (sampled)
                        P_rest = 1 - sum_k P_k (0 for sampled targets and when the real ids
                        cover all V classes)
    padding entries (a count of 0, a value of -inf) are no bucket: their class stays in the
    rest; a row without real entries has P_rest = Q_rest = 1 (divergence 0) and, with
    labels="teacher", no hard term
                        student Q_k = p_s(id_k),  Q_rest = sum_{j not in S} p_s(j)
    tail="renormalize"  K buckets: P = softmax(v / T) over the K ids, Q = softmax(z_s[S] / T)
    tail="ignore"       forward KL over the K ids only: P_k as for "bucket", Q_k = p_s(id_k)

    row_loss = soft_weight * T^2 * D(P, Q) + hard_weight * (-log softmax(z_s)[y])

with D one of forward KL, reverse KL, generalized JSD(beta) over the buckets. For every
divergence, with ``G_b = dD/dQ_b`` and ``w(j)`` the student probability that forms the buckets
(``p_s(j)``, or ``Q_k`` at the kept ids and 0 elsewhere for "renormalize")::

    dD/du_j = w(j) * (G_{b(j)} - <Q, G>)          (d(T^2 D)/dz_s = T dD/du)
    forward_kl  G_b = -P_b / Q_b     -> kept: w_k sum_b P_b - P_k
                                        rest: p_s(j) (sum_b P_b - P_rest / Q_rest)
    reverse_kl  G_b = log(Q_b / P_b) + 1  -> w(j) (log(Q_b / P_b) - D)
    jsd         G_b = (1 - beta) log(Q_b / M_b), M = beta P + (1 - beta) Q  -> w(j) (G_b - <Q, G>)
    ignore      forward KL without the rest term: kept w_k sum_k P_k - P_k, rest p_s(j) sum_k P_k

One program per row:

* gather: the K ids, teacher values (or counts) and the K student logits at those ids (read
  before anything is written, so the gradient buffer may be the student tensor itself).
* pass 1 (statistics; skipped for "renormalize" without a hard term): running raw max of the
  student row and the rescaled sum of ``exp((z - max) / T)``; in bucket mode the sum runs over
  the classes *outside* S only (``tl.histogram`` of the ids falling in the block marks them), so
  the student rest mass ``Q_rest = R / (R + sum_k e_k)`` is exact even when it is tiny (no
  ``1 - sum`` cancellation). ``exp(z - max)`` for the hard CE when ``T != 1``.
* the K-sized bucket math (loss, ``G``, ``<Q, G>``) on one vector.
* pass 2: writes ``p_s(j) * coefficient_rest`` (+ the hard-CE gradient) over the whole row,
  then, after a barrier, overwrites the K kept columns with their own gradient.

Reads the student row twice, the teacher K pairs once, writes the gradient once; no (N, V)
temporary. All arithmetic float32, no exp of an unshifted logit; ``-inf`` student or teacher
entries are probability 0 (``0 * log 0`` dropped); a NaN student logit in a kept row makes the
loss NaN (NaN values in the teacher are refused before launch).
"""
import torch
import triton
import triton.language as tl

from fastkd.kernels.kd_loss import (check_labels_and_divergence, column_settings, log_mixture,
                                    safe_max)

__all__ = ["kd_sparse_forward_triton", "MAX_K"]

# divergence codes (constexpr); NONE when soft_weight == 0
_NONE, _FORWARD_KL, _REVERSE_KL, _JSD = 0, 1, 2, 3
_DIVERGENCE_CODES = {"forward_kl": _FORWARD_KL, "reverse_kl": _REVERSE_KL, "jsd": _JSD}
_BUCKET, _RENORMALIZE, _IGNORE = 0, 1, 2
_TAIL_CODES = {"bucket": _BUCKET, "renormalize": _RENORMALIZE, "ignore": _IGNORE}

# The K entries of a row live in registers as one vector; top-k caches use K = 8..128.
MAX_K = 4096


@triton.jit
def _masked_xlogy(weight, log_weight, log_other):
    """``weight * (log_weight - log_other)`` with ``0 * anything = 0`` (weight == 0 dropped)."""
    return tl.where(weight == 0.0, 0.0, weight * (log_weight - log_other))


@triton.jit
def _kd_sparse_kernel(
    student_ptr, ids_ptr, values_ptr, lse_ptr, counts_ptr, labels_ptr, grad_ptr, row_loss_ptr,
    student_row_stride, ids_row_stride, values_row_stride, counts_row_stride, grad_row_stride,
    num_classes, num_kept, temperature, soft_weight, hard_weight, beta, ignore_index, grad_scale,
    DIVERGENCE: tl.constexpr,      # _NONE, _FORWARD_KL, _REVERSE_KL or _JSD
    TAIL: tl.constexpr,            # _BUCKET, _RENORMALIZE or _IGNORE
    STATS: tl.constexpr,           # pass 1 gathers the student's full-row softmax sums
    SAMPLED: tl.constexpr,         # counts given (SampledTargets), else values + lse (TopKLogits)
    HAS_REST: tl.constexpr,        # bucket mode (a row may have classes outside its real ids)
    HARD: tl.constexpr,            # hard CE term present
    CE_SHARES_SOFTMAX: tl.constexpr,  # T == 1 and pass 1 gathers the full student sum
    HAS_LABELS: tl.constexpr,
    TEACHER_LABELS: tl.constexpr,  # hard label = id of the teacher's largest value (count)
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per row: ``row_loss[row]`` and, if WRITE_GRAD, ``grad[row, :]``."""
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    block_cols = tl.arange(0, BLOCK_V)
    k_offsets = tl.arange(0, BLOCK_K)
    k_mask = k_offsets < num_kept
    minus_inf = float("-inf")

    keep = True
    label = 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        keep = label != ignore_index
    if keep:
        inv_temperature = 1.0 / temperature

        # ---------------------------------------------------------------- gather
        ids = tl.load(ids_ptr + row * ids_row_stride + k_offsets, mask=k_mask, other=0).to(tl.int32)
        if SAMPLED:
            counts = tl.load(counts_ptr + row * counts_row_stride + k_offsets, mask=k_mask,
                             other=0).to(tl.float32)
            active = k_mask & (counts > 0)      # count-0 entries are padding
            teacher_score = tl.where(active, counts, minus_inf)
        else:
            values = tl.load(values_ptr + row * values_row_stride + k_offsets, mask=k_mask,
                             other=minus_inf).to(tl.float32)
            active = k_mask & (values != minus_inf)   # -inf entries are padding
            teacher_score = values
        # labels="teacher" in a row without real entries: no label, no hard term
        hard_on = 1.0
        if TEACHER_LABELS:
            hard_on = tl.where(tl.sum(active.to(tl.int32), axis=0) > 0, 1.0, 0.0)
        z_kept = tl.load(student_row + ids, mask=active, other=minus_inf).to(tl.float32)
        if TEACHER_LABELS:
            _, best = tl.max(teacher_score, axis=0, return_indices=True)
            label = tl.sum(tl.where(k_offsets == best, ids, 0), axis=0)
        label_logit = 0.0
        if HARD:
            label_logit = tl.load(student_row + label).to(tl.float32)

        # ---------------------------------------------------------------- pass 1: statistics
        max_s = minus_inf        # running raw max of the student row
        sum_exp = 0.0            # sum exp((z - max) / T): outside S (bucket) or all classes
        sum_exp_ce = 0.0         # sum exp(z - max) (hard CE, T != 1)
        if STATS or HARD:
            for start in range(0, num_classes, BLOCK_V):
                cols = start + block_cols
                mask = cols < num_classes
                z = tl.load(student_row + cols, mask=mask, other=minus_inf).to(tl.float32)
                new_max = tl.maximum(max_s, tl.max(z, axis=0))
                shift = safe_max(new_max)
                if HARD and not CE_SHARES_SOFTMAX:
                    sum_exp_ce = (sum_exp_ce * tl.exp(max_s - shift)
                                  + tl.sum(tl.exp(z - shift), axis=0))
                if STATS:
                    exp_block = tl.exp((z - shift) * inv_temperature)
                    if TAIL == 0:   # drop the kept columns that fall in this block
                        local = ids - start
                        in_block = active & (local >= 0) & (local < BLOCK_V)
                        hits = tl.histogram(local, BLOCK_V, mask=in_block)
                        exp_block = tl.where(hits > 0, 0.0, exp_block)
                    sum_exp = (sum_exp * tl.exp((max_s - shift) * inv_temperature)
                               + tl.sum(exp_block, axis=0))
                max_s = new_max
        shift_s = safe_max(max_s)

        # ---------------------------------------------------------------- bucket math (K-sized)
        row_loss = 0.0
        coef_rest = 0.0          # dD/du_j = p_s(j) * coef_rest outside S
        kept_du = tl.zeros([BLOCK_K], dtype=tl.float32)   # dD/du at the kept ids
        log_sum_s = 0.0
        if DIVERGENCE != 0:
            # student bucket log-masses log Q_k and the weights w_k of the kept columns
            if TAIL == 1:
                max_kept = safe_max(tl.max(z_kept, axis=0))
                scaled_kept = (z_kept - max_kept) * inv_temperature
                log_q = scaled_kept - tl.log(tl.sum(tl.exp(scaled_kept), axis=0))
            else:
                scaled_kept = (z_kept - shift_s) * inv_temperature
                if TAIL == 0:
                    rest_sum = sum_exp
                    log_sum_s = tl.log(rest_sum + tl.sum(tl.exp(scaled_kept), axis=0))
                    log_q_rest = tl.log(rest_sum) - log_sum_s
                else:
                    log_sum_s = tl.log(sum_exp)
                log_q = scaled_kept - log_sum_s
            log_q = tl.where(active, log_q, minus_inf)
            q_kept = tl.exp(log_q)
            # teacher bucket log-masses log P_k
            if SAMPLED:
                log_p = tl.log(counts) - tl.log(tl.sum(tl.where(active, counts, 0.0), axis=0))
            elif TAIL == 1:
                max_v = safe_max(tl.max(values, axis=0))
                scaled_v = (values - max_v) * inv_temperature
                log_p = scaled_v - tl.log(tl.sum(tl.exp(scaled_v), axis=0))
            else:
                log_p = values * inv_temperature - tl.load(lse_ptr + row).to(tl.float32)
            log_p = tl.where(active, log_p, minus_inf)
            p_kept = tl.exp(log_p)
            p_rest = tl.full([], 0.0, tl.float32)    # sampled targets: nothing outside S
            if HAS_REST and not SAMPLED:
                p_rest = tl.maximum(1.0 - tl.sum(p_kept, axis=0), 0.0)
                # real ids covering every class (unique): the rest bucket is empty
                num_active = tl.sum(active.to(tl.int32), axis=0)
                p_rest = tl.where(num_active >= num_classes, 0.0, p_rest)
            log_p_rest = tl.log(p_rest)
            if DIVERGENCE == 1:
                divergence = tl.sum(_masked_xlogy(p_kept, log_p, log_q), axis=0)
                p_total = tl.sum(p_kept, axis=0)
                if HAS_REST:
                    divergence += _masked_xlogy(p_rest, log_p_rest, log_q_rest)
                    p_total += p_rest
                    coef_rest = p_total - tl.exp(log_p_rest - log_q_rest)
                if TAIL == 2:
                    coef_rest = p_total
                kept_du = q_kept * p_total - p_kept
            if DIVERGENCE == 2:
                divergence = tl.sum(_masked_xlogy(q_kept, log_q, log_p), axis=0)
                if HAS_REST:
                    q_rest = tl.exp(log_q_rest)
                    divergence += _masked_xlogy(q_rest, log_q_rest, log_p_rest)
                    coef_rest = log_q_rest - log_p_rest - divergence
                kept_du = tl.where(q_kept == 0.0, 0.0, q_kept * (log_q - log_p - divergence))
            if DIVERGENCE == 3:
                log_m = log_mixture(log_q, log_p, beta)
                g_kept = (1.0 - beta) * (log_q - log_m)
                student_dot_g = tl.sum(tl.where(q_kept == 0.0, 0.0, q_kept * g_kept), axis=0)
                teacher_term = tl.sum(_masked_xlogy(p_kept, log_p, log_m), axis=0)
                if HAS_REST:
                    q_rest = tl.exp(log_q_rest)
                    log_m_rest = log_mixture(log_q_rest, log_p_rest, beta)
                    g_rest = (1.0 - beta) * (log_q_rest - log_m_rest)
                    student_dot_g += tl.where(q_rest == 0.0, 0.0, q_rest * g_rest)
                    teacher_term += _masked_xlogy(p_rest, log_p_rest, log_m_rest)
                    coef_rest = g_rest - student_dot_g
                divergence = beta * teacher_term + student_dot_g
                kept_du = tl.where(q_kept == 0.0, 0.0, q_kept * (g_kept - student_dot_g))
            if HAS_REST:   # no class outside the real ids: no rest gradient (0 / 0 above)
                coef_rest = tl.where(rest_sum == 0.0, 0.0, coef_rest)
            row_loss += soft_weight * temperature * temperature * divergence
        if HARD:
            log_sum_ce = log_sum_s if CE_SHARES_SOFTMAX else tl.log(sum_exp_ce)
            row_loss += hard_on * hard_weight * (log_sum_ce - (label_logit - shift_s))
        tl.store(row_loss_ptr + row, row_loss)

        # ---------------------------------------------------------------- pass 2: gradient
        if WRITE_GRAD:
            soft_scale = grad_scale * soft_weight * temperature
            hard_scale = grad_scale * hard_weight * hard_on
            for start in range(0, num_classes, BLOCK_V):
                cols = start + block_cols
                mask = cols < num_classes
                grad = tl.zeros([BLOCK_V], dtype=tl.float32)
                if STATS or HARD:
                    z = tl.load(student_row + cols, mask=mask, other=minus_inf).to(tl.float32)
                if STATS:
                    p_s = tl.exp((z - shift_s) * inv_temperature - log_sum_s)
                    grad += soft_scale * tl.where(p_s == 0.0, 0.0, p_s * coef_rest)
                if HARD:
                    q = p_s if CE_SHARES_SOFTMAX else tl.exp(z - shift_s - log_sum_ce)
                    grad += hard_scale * tl.where(cols == label, q - 1.0, q)
                tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
            # the kept columns: their own soft gradient and the hard-CE term, written after
            # every thread's block stores (the barrier orders the two writes of a column)
            tl.debug_barrier()
            kept_grad = soft_scale * kept_du
            if HARD:
                q_ce = tl.exp(z_kept - shift_s - log_sum_ce)
                kept_grad += hard_scale * tl.where(ids == label, q_ce - 1.0, q_ce)
            tl.store(grad_row + ids, kept_grad.to(grad_ptr.dtype.element_ty), mask=active)
    else:
        tl.store(row_loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, num_classes, BLOCK_V):
                cols = start + block_cols
                zeros = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
                tl.store(grad_row + cols, zeros, mask=cols < num_classes)


def launch_config(num_classes: int, num_kept: int, *, divergence: str, soft_weight: float,
                  hard_weight: float, tail: str, sampled: bool, has_labels: bool,
                  teacher_labels: bool, temperature: float, write_grad: bool):
    """(constexprs, num_warps) of one launch: the specialization the launcher compiles, and the
    one :func:`aot_specializations` compiles ahead of time for the same options."""
    block, num_warps = column_settings(num_classes)
    code = _DIVERGENCE_CODES[divergence] if soft_weight > 0 else _NONE
    tail_code = _TAIL_CODES[tail]
    hard = hard_weight > 0 and (has_labels or bool(teacher_labels))
    stats = code != _NONE and tail_code != _RENORMALIZE
    constexprs = dict(
        DIVERGENCE=code,
        TAIL=tail_code,
        STATS=stats,
        SAMPLED=sampled,
        # top-k rows with -inf padding have a rest bucket even when K >= V
        HAS_REST=tail_code == _BUCKET,
        HARD=hard,
        CE_SHARES_SOFTMAX=hard and stats and temperature == 1.0,
        HAS_LABELS=has_labels,
        TEACHER_LABELS=bool(teacher_labels) and hard,
        WRITE_GRAD=write_grad,
        BLOCK_V=block,
        BLOCK_K=max(triton.next_power_of_2(num_kept), 2),
    )
    return constexprs, num_warps


def _check_rows(name: str, tensor, shape, dtype=None) -> None:
    """``tensor`` has ``shape`` (and ``dtype``) and last-dim stride 1; an empty tensor may have
    any strides (no element is addressed), as the torch backend takes it."""
    if tensor.shape != shape or (tensor.stride(-1) != 1 and tensor.numel()) or \
            (dtype and tensor.dtype != dtype):
        raise ValueError(f"{name} must be a {shape} tensor{' of ' + str(dtype) if dtype else ''} "
                         f"with last-dim stride 1, got {tuple(tensor.shape)} {tensor.dtype} "
                         f"strides {tensor.stride()}")


def kd_sparse_forward_triton(student_logits, indices, values, lse, counts, labels, options, *,
                             grad, grad_scale=1.0, block_v=None):
    """Row losses ``(N,)`` float32 of the sparse KD loss of ``(N, V)`` student rows; fills
    ``grad`` (if not None) with ``grad_scale * d row_loss / d student_logits``. Follows the
    sparse backend contract (``fastkd.dispatch.SparseBackend``); ``options`` carries
    temperature, soft_weight, hard_weight, divergence, beta, tail, ignore_index and
    teacher_labels; ``block_v`` overrides the block size (a power of two, for tests).
    """
    if student_logits.dim() != 2 or (student_logits.stride(-1) != 1 and student_logits.numel()):
        raise ValueError("student_logits must be a 2-D (N, V) tensor with last-dim stride 1, got "
                         f"{tuple(student_logits.shape)} strides {student_logits.stride()}")
    num_rows, num_classes = student_logits.shape
    num_kept = indices.shape[-1]
    if num_kept > MAX_K:
        raise ValueError(f"the Triton sparse loss supports K <= {MAX_K} teacher entries per row, "
                         f"got {num_kept}; use backend='torch'")
    _check_rows("indices", indices, (num_rows, num_kept))
    sampled = counts is not None
    if sampled:
        _check_rows("counts", counts, (num_rows, num_kept))
    else:
        _check_rows("values", values, (num_rows, num_kept))
        _check_rows("lse", lse, (num_rows,), torch.float32)
    teacher_labels = options.teacher_labels
    check_labels_and_divergence(labels, teacher_labels, num_rows, options.divergence,
                                 _DIVERGENCE_CODES)
    if grad is not None:
        _check_rows("grad", grad, tuple(student_logits.shape), student_logits.dtype)

    row_loss = torch.empty(num_rows, dtype=torch.float32, device=student_logits.device)
    if num_rows == 0:
        return row_loss
    constexprs, num_warps = launch_config(
        num_classes, num_kept, divergence=options.divergence, soft_weight=options.soft_weight,
        hard_weight=options.hard_weight, tail=options.tail, sampled=counts is not None,
        has_labels=labels is not None, teacher_labels=teacher_labels,
        temperature=options.temperature, write_grad=grad is not None)
    if block_v is not None:
        constexprs["BLOCK_V"] = block_v
    placeholder = row_loss
    _kd_sparse_kernel[(num_rows,)](
        student_logits, indices,
        values if values is not None else placeholder,      # placeholders are never read
        lse if lse is not None else placeholder,
        counts if counts is not None else placeholder,
        labels if labels is not None else placeholder,
        grad if grad is not None else student_logits,       # placeholder, never written
        row_loss,
        student_logits.stride(0), indices.stride(0),
        values.stride(0) if values is not None else 0,
        counts.stride(0) if counts is not None else 0,
        grad.stride(0) if grad is not None else 0,
        num_classes, num_kept, options.temperature, options.soft_weight, options.hard_weight,
        options.beta, options.ignore_index, float(grad_scale),
        **constexprs,
        num_warps=num_warps,
    )
    return row_loss


# ----------------------------------------------------------------------------- AOT compile list
def aot_specializations():
    """The sparse kernel specializations to compile ahead of time (no GPU needed) for every
    target in ``tests/loss/test_kernel_aot.py``: those the benchmarks launch (top-32 ``TopKLogits``
    with int32 ids, forward_kl + hard labels at T = 1, bucket tail, forward+backward, fp32 and
    bf16, V = 32000 and 128256; the fused-linear path launches the same ones on its chunks) and
    one per divergence, tail, target kind and label mode the tests run. Same record layout as
    :func:`fastkd.kernels.kd_loss.aot_specializations`."""
    base = dict(divergence="forward_kl", soft_weight=0.5, hard_weight=0.5, tail="bucket",
                sampled=False, has_labels=True, teacher_labels=False, temperature=1.0,
                write_grad=True)
    cases = [(f"bench-top32-V{vocab}-{dtype}", vocab, 32, dtype, dtype, "i32", dict(base))
             for vocab in (32000, 128256) for dtype in ("fp32", "bf16")]
    test_variants = [  # (name, V, K, student, teacher values, id dtype, overrides)
        ("reverse_kl-renormalize-no_grad", 1000, 8, "fp32", "fp16", "i64",
         dict(divergence="reverse_kl", tail="renormalize", write_grad=False)),
        ("jsd-ignore_tail-T2", 1000, 16, "bf16", "bf16", "i32",
         dict(divergence="jsd", tail="ignore", temperature=2.0)),
        ("sampled-teacher_labels", 32000, 32, "fp32", "fp32", "i32",
         dict(sampled=True, has_labels=False, teacher_labels=True)),
        ("hard_only", 100, 4, "fp16", "fp16", "i64", dict(soft_weight=0.0)),
        ("soft_only-no_labels", 128256, 64, "bf16", "bf16", "i32",
         dict(hard_weight=0.0, has_labels=False)),
    ]
    for name, vocab, num_kept, student, teacher, ids, overrides in test_variants:
        options = dict(base)
        options.update(overrides)
        cases.append((f"test-{name}-V{vocab}-K{num_kept}-{student}-{teacher}", vocab, num_kept,
                      student, teacher, ids, options))
    specs = []
    for name, vocab, num_kept, student, teacher, ids, options in cases:
        constexprs, num_warps = launch_config(vocab, num_kept, **options)
        signature = dict(
            student_ptr="*" + student, ids_ptr="*" + ids,
            values_ptr="*fp32" if options["sampled"] else "*" + teacher,
            lse_ptr="*fp32", counts_ptr="*i32" if options["sampled"] else "*fp32",
            labels_ptr="*i64" if options["has_labels"] else "*fp32",
            grad_ptr="*" + student, row_loss_ptr="*fp32", student_row_stride="i64",
            ids_row_stride="i64", values_row_stride="i64", counts_row_stride="i64",
            grad_row_stride="i64", num_classes="i32", num_kept="i32", temperature="fp32",
            soft_weight="fp32", hard_weight="fp32", beta="fp32", ignore_index="i32",
            grad_scale="fp32")
        signature.update({key: "constexpr" for key in constexprs})
        specs.append(dict(name=name, kernel=_kd_sparse_kernel, signature=signature,
                          constexprs=constexprs, num_warps=num_warps))
    return specs
