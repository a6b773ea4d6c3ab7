/* The fused KD loss on the CPU, compiled: loss and gradient of whole rows in one call.
 *
 * The CPU member of the dense kernel family (the Triton kernel is kernels/kd_loss.py, the
 * PyTorch reference fastkd/reference_dense.py): fastkd/dispatch.py sends every CPU row here when
 * it is built. Same contract as every dense backend (fastkd.dispatch.DenseBackend), plus the
 * label check, the kept-row count and the reduction in the same call; tested against the float64
 * reference (tests/reference.py) in tests/loss/test_cpu_kernel.py and
 * tests/loss/test_dense_grid.py. Loaded with ctypes by kernels/kd_loss_cpu.py: plain C, no
 * Python headers; the call's parameters come as one struct (KDArgs).
 *
 * Per row, with k = log2(e) / T, w = (z - max z) * k (base-2 tempered logits), e = 2^w,
 * S = sum_v e, log2 p = w - log2 S, and everything accumulated in float32:
 *
 *   forward_kl  D = ln2 <e_t, w_t - w_s> / S_t - ln S_t + ln S_s;   d(T^2 D)/dz_s = T (p_s - p_t)
 *   reverse_kl  D = ln2 <e_s, w_s - w_t> / S_s - ln S_s + ln S_t;
 *               grad = T p_s (ln2 (w_s - w_t) - ln S_s + ln S_t - D)
 *   jsd         m = beta p_t + (1 - beta) p_s, formed relative to max(p_t, p_s) in bits (so it
 *               never underflows and is exactly p where p_t = p_s);
 *               J = beta KL(p_t||m) + (1 - beta) KL(p_s||m);
 *               grad = T (1 - beta) p_s (ln(p_s / m) - KL(p_s||m))
 *   mse         D = mean_v (z_s - z_t)^2 (raw logits);  grad = 2 (z_s - z_t) / V
 *   hard CE     ln S1 - (z_s[y] - max z_s), S1 = sum_v exp(z_s - max z_s);  grad = q - onehot(y)
 *
 *   row_loss = soft_weight * T^2 * D (mse: soft_weight * D) + hard_weight * CE
 *   grad     = grad_scale * (soft_weight * dsoft + hard_weight * dhard)
 *
 * Terms with p == 0 are dropped (0 log 0 = 0), so -inf logits are exact. A NaN or +inf in an
 * input the row's loss reads makes its loss and gradient NaN; an ignored row (label ==
 * ignore_index) has loss 0 and a zero gradient whatever it holds; a kept label outside [0, V)
 * makes its row NaN (never an out-of-bounds read). Every student element is read before the row's
 * gradient is written, so ``grad`` may be the student's own storage.
 *
 * Rows are copied into padded, aligned float32 buffers (a multiple of VEC lanes; the padding
 * holds -inf, i.e. probability 0) and every pass over them is written with GCC/Clang vector
 * extensions: exp2 and log2 are polynomials (kernels/kd_loss_cpu_math.h) that vectorize, where
 * libm's do not.
 * Large calls split their rows over up to ``num_threads`` OpenMP threads when it is built with
 * OpenMP (setup.py tries), else they run on the calling thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kd_loss_cpu_math.h"   /* vfloat, vexp2, vlog2, fp16 / bf16 loads and stores, plumbing */

enum { DIV_FORWARD_KL = 0, DIV_REVERSE_KL = 1, DIV_JSD = 2, DIV_MSE = 3 };

/* ----------------------------------------------------------------------------- one call */
/* The one argument of fastkd_kd_rows (KDArgs in kernels/kd_loss_cpu.py, field for field).
 * Row r of a tensor is at base + (r / rows_per_batch) * strides[0] + (r % rows_per_batch) *
 * strides[1] (byte strides; 2-D inputs pass rows_per_batch = N). */
typedef struct {
    const void *student, *teacher;
    void *grad;                          /* NULL: no gradient */
    const int64_t *labels;               /* (rows,) when label_mode is LABELS_TENSOR */
    float *row_loss;                     /* (rows,) out */
    float *total;                        /* NULL, or the reduced loss out */
    int64_t student_strides[2], teacher_strides[2], grad_strides[2];
    int64_t num_rows, rows_per_batch, num_classes, ignore_index;
    int64_t label_counts[2];             /* out: kept rows, kept labels outside [0, V) */
    int64_t work_bytes;                  /* out: bytes of the row buffers the call allocated */
    double temperature, soft_weight, hard_weight, beta, grad_scale;
    int32_t student_dtype, teacher_dtype, grad_dtype, label_mode, divergence, num_threads;
    int32_t reduction, refuse_bad_labels;
} KDArgs;

/* What the row code reads: the call's tensors, and its options in the row code's types */
typedef struct {
    const KDArgs *args;                 /* pointers, byte strides, dtypes, labels, row_loss */
    int64_t rows_per_batch, num_classes, padded;
    int divergence, soft, hard;
    int hard_power;    /* exp(d) = exp(d / T)^hard_power for T = 2, 3, 4; else 0 */
    float temperature, soft_weight, hard_weight, beta, grad_scale;
} Call;

typedef struct {
    const Call *call;
    int64_t first_row, end_row;
    float *work;                        /* 6 * padded floats, VEC-aligned */
} Slice;

/* The six row buffers of a slice: the raw rows, then w and e = 2^w of each side. */
typedef struct {
    float *student, *teacher, *scaled_s, *exp_s, *scaled_t, *exp_t;
    float *exp_hard;   /* exp(z_s - max): exp_s at T = 1, else a buffer the gradient pass does
                          not read (the teacher's raw row once its terms are formed, or exp_t
                          where there is no KL-type soft term) */
    float *grad_row;   /* formed in place of w_s (each lane read before it is written) */
} Rows;

/* max over the padded row, and whether it holds a NaN or +inf (either makes the row's loss NaN:
 * log-softmax of a row with +inf is NaN) */
INLINE float row_max(const float *row, int64_t padded, int *not_finite_above) {
    vfloat best = splat(-INFINITY);
    vint bad_lanes = {0};
    for (int64_t i = 0; i < padded; i += VEC) {
        vfloat x = *(const vfloat *)(row + i);
        bad_lanes |= (x != x) | (x == splat(INFINITY));
        best = pick(x > best, x, best);
    }
    int any_bad = 0;
    for (int lane = 0; lane < VEC; lane++) any_bad |= bad_lanes[lane] != 0;
    *not_finite_above = any_bad;
    return lane_max(best);
}

/* scaled = (row - max) * scale, exps = 2^scaled; returns sum(exps). With power > 0 also
 * hard = exps^power and *hard_sum = sum(hard) (the hard term's exp(z - max) at T = power). */
INLINE float scaled_exps(const float *row, float max, float scale, int64_t padded, float *scaled,
                         float *exps, int power, float *hard, float *hard_sum) {
    vfloat total = splat(0.0f), hard_total = splat(0.0f);
    vfloat vmax = splat(max), vscale = splat(scale);
    for (int64_t i = 0; i < padded; i += VEC) {
        vfloat w = (*(const vfloat *)(row + i) - vmax) * vscale;
        vfloat e = vexp2(w);
        *(vfloat *)(scaled + i) = w;
        *(vfloat *)(exps + i) = e;
        total += e;
        if (power) {
            vfloat e2 = e * e;
            vfloat h = power == 2 ? e2 : power == 3 ? e2 * e : e2 * e2;
            *(vfloat *)(hard + i) = h;
            hard_total += h;
        }
    }
    if (power) *hard_sum = lane_sum(hard_total);
    return lane_sum(total);
}

/* sum_i [weight_i > 0] weight_i * (left_i - right_i)   (0 * anything = 0) */
INLINE float guarded_dot(const float *weight, const float *left, const float *right,
                         int64_t padded) {
    vfloat total = splat(0.0f);
    for (int64_t i = 0; i < padded; i += VEC) {
        vfloat p = *(const vfloat *)(weight + i);
        vfloat term = p * (*(const vfloat *)(left + i) - *(const vfloat *)(right + i));
        total += keep_where(p > splat(0.0f), term);
    }
    return lane_sum(total);
}

/* lanes of the block at `first` that lie inside the row (the rest is padding) */
INLINE vint inside_row(int64_t first, int64_t num_classes) {
    const vint lane_ids = {0, 1, 2, 3, 4, 5, 6, 7};
    int64_t left = num_classes - first;
    return lane_ids < (vint){0} + (int32_t)(left < VEC ? left : VEC);
}

/* Loss of one kept row without NaN (loaded into rows->student / rows->teacher, maxima given);
 * with want_grad, its gradient into rows->grad_row. */
INLINE float row_terms(const Call *call, const Rows *rows, int64_t target, float max_s,
                       float max_t, int kl_like, int want_grad) {
    const int64_t num_classes = call->num_classes, padded = call->padded;
    const float temperature = call->temperature;
    const int soft = call->soft, hard = call->hard, divergence = call->divergence;
    const vfloat zero = splat(0.0f);
    const float *student = rows->student, *teacher = rows->teacher;
    float *scaled_s = rows->scaled_s, *exp_s = rows->exp_s;
    float *scaled_t = rows->scaled_t, *exp_t = rows->exp_t, *exp_hard = rows->exp_hard;

    /* --- exponentials and their row sums S_s, S_t, S1 --- */
    float sum_s = 1.0f, sum_t = 1.0f, sum_hard = 1.0f;
    int hard_done = 0;
    if (kl_like) {
        const float k = LOG2E / temperature;
        int power = hard && exp_hard != exp_s ? call->hard_power : 0;
        /* the teacher first: exp_hard may take the teacher's raw row */
        sum_t = scaled_exps(teacher, max_t, k, padded, scaled_t, exp_t, 0, NULL, NULL);
        sum_s = scaled_exps(student, max_s, k, padded, scaled_s, exp_s, power, exp_hard,
                            &sum_hard);
        hard_done = power != 0 || exp_hard == exp_s;
        if (exp_hard == exp_s) sum_hard = sum_s;
    }
    if (hard && !hard_done) {
        vfloat total = zero, vmax = splat(max_s), log2e = splat(LOG2E);
        for (int64_t i = 0; i < padded; i += VEC) {
            vfloat e = vexp2((*(const vfloat *)(student + i) - vmax) * log2e);
            *(vfloat *)(exp_hard + i) = e;
            total += e;
        }
        sum_hard = lane_sum(total);
    }
    /* natural logs of the three sums in one vector call */
    vfloat logs = vlog2((vfloat){sum_s, sum_t, sum_hard, 1, 1, 1, 1, 1}) * splat(LN2);
    const float log_sum_s = logs[0], log_sum_t = logs[1], log_sum_hard = logs[2];

    /* --- soft term: D (before T^2) and what its gradient needs --- */
    float divergence_value = 0.0f, kl2_s_m = 0.0f;
    if (kl_like && divergence == DIV_FORWARD_KL) {
        divergence_value = LN2 * guarded_dot(exp_t, scaled_t, scaled_s, padded) / sum_t
                           - log_sum_t + log_sum_s;
    } else if (kl_like && divergence == DIV_REVERSE_KL) {
        divergence_value = LN2 * guarded_dot(exp_s, scaled_s, scaled_t, padded) / sum_s
                           - log_sum_s + log_sum_t;
    } else if (kl_like) {
        /* jsd, 0 < beta < 1, in bits, relative to the larger probability of each class: with
           d = log2 p_t - log2 p_s and L = log2 (m / max(p_t, p_s)) = log2 of a number in
           (0, 1] (exactly 0 where p_t = p_s), log2 (p_s / m) and log2 (p_t / m) are -L and
           d - L (d <= 0) or -d - L and -L (d > 0): m never underflows, nothing cancels */
        const vfloat log2_sum_s = splat(log_sum_s * LOG2E), log2_sum_t = splat(log_sum_t * LOG2E);
        const vfloat beta = splat(call->beta), rest = splat(1.0f - call->beta);
        const vint sign_bit = (vint){0} + (int32_t)0x80000000;
        vfloat total_t = zero, total_s = zero;
        for (int64_t i = 0; i < padded; i += VEC) {
            vfloat d = (*(vfloat *)(scaled_t + i) - log2_sum_t)
                       - (*(vfloat *)(scaled_s + i) - log2_sum_s);
            vint teacher_below = d <= zero;
            vfloat ratio = vexp2((vfloat)((vint)d | sign_bit));   /* 2^-|d| */
            vfloat L = vlog2(pick(teacher_below, beta * ratio + rest, beta + rest * ratio));
            vfloat log_ratio_s = pick(teacher_below, -L, -d - L);   /* log2 (p_s / m) */
            vfloat log_ratio_t = pick(teacher_below, d - L, -L);    /* log2 (p_t / m) */
            vfloat e_t = *(vfloat *)(exp_t + i), e_s = *(vfloat *)(exp_s + i);
            total_t += keep_where(e_t > zero, e_t * log_ratio_t);
            total_s += keep_where(e_s > zero, e_s * log_ratio_s);
            *(vfloat *)(scaled_s + i) = log_ratio_s;   /* for the gradient */
        }
        float kl_t_m = LN2 * lane_sum(total_t) / sum_t;
        kl2_s_m = lane_sum(total_s) / sum_s;   /* KL(p_s || m) in bits */
        divergence_value = call->beta * kl_t_m + (1.0f - call->beta) * LN2 * kl2_s_m;
    } else if (soft) {   /* mse on raw logits, over the row's own lanes */
        vfloat total = zero;
        for (int64_t i = 0; i < padded; i += VEC) {
            vfloat diff = *(const vfloat *)(student + i) - *(const vfloat *)(teacher + i);
            total += keep_where(inside_row(i, num_classes), diff * diff);
        }
        divergence_value = lane_sum(total) / (float)num_classes;
    }
    float soft_value = divergence_value;
    if (kl_like) {
        soft_value = divergence_value < 0.0f ? 0.0f : divergence_value;   /* >= 0 up to rounding */
        soft_value *= temperature * temperature;
    }
    float hard_value = hard ? log_sum_hard - (student[target] - max_s) : 0.0f;
    float loss = call->soft_weight * soft_value + call->hard_weight * hard_value;
    if (!want_grad) return loss;

    /* --- gradient: grad_scale * (soft_weight * dsoft + hard_weight * dhard) --- */
    const float soft_scale = call->grad_scale * call->soft_weight;
    const float hard_scale = call->grad_scale * call->hard_weight;
    const vfloat hard_coef = splat(hard ? hard_scale / sum_hard : 0.0f);
    vfloat coef_s = zero, coef_t = zero, shift = zero;
    if (soft && divergence == DIV_FORWARD_KL) {          /* T (p_s - p_t) */
        coef_s = splat(soft_scale * temperature / sum_s);
        coef_t = splat(soft_scale * temperature / sum_t);
    } else if (soft && divergence == DIV_REVERSE_KL) {   /* T p_s (ln p_s - ln p_t - D) */
        /* in bits: ln 2 * ((w_s - w_t) + (log2 S_t - log2 S_s - D / ln 2)); a row whose terms
           cancel (V = 1) gets exactly 0 */
        coef_s = splat(soft_scale * temperature * LN2 / sum_s);
        shift = splat((log_sum_t - log_sum_s - divergence_value) * LOG2E);
    } else if (soft && divergence == DIV_JSD) {          /* T (1 - beta) p_s (ln(p_s/m) - KL) */
        coef_s = splat(soft_scale * temperature * (1.0f - call->beta) * LN2 / sum_s);
        shift = splat(-kl2_s_m);
    } else if (soft) {                                   /* 2 (z_s - z_t) / V */
        coef_s = splat(soft_scale * 2.0f / (float)num_classes);
    }
    float *grad_row = rows->grad_row;
    for (int64_t i = 0; i < padded; i += VEC) {
        vfloat g = zero;
        if (soft && divergence == DIV_FORWARD_KL) {
            g = *(vfloat *)(exp_s + i) * coef_s - *(vfloat *)(exp_t + i) * coef_t;
        } else if (soft && divergence == DIV_REVERSE_KL) {
            vfloat e = *(vfloat *)(exp_s + i);
            vfloat log_ratio = (*(vfloat *)(scaled_s + i) - *(vfloat *)(scaled_t + i)) + shift;
            g = keep_where(e > zero, e * coef_s * log_ratio);
        } else if (soft && divergence == DIV_JSD) {
            vfloat e = *(vfloat *)(exp_s + i);
            vfloat log_ratio = *(vfloat *)(scaled_s + i) + shift;
            g = keep_where(e > zero, e * coef_s * log_ratio);
        } else if (soft) {
            g = (*(const vfloat *)(student + i) - *(const vfloat *)(teacher + i)) * coef_s;
        }
        if (hard) g += *(vfloat *)(exp_hard + i) * hard_coef;
        *(vfloat *)(grad_row + i) = g;
    }
    if (hard) grad_row[target] -= hard_scale;
    return loss;
}

ROW_TARGETS
static void process_rows(Slice *slice) {
    const Call *call = slice->call;
    const KDArgs *args = call->args;
    const int64_t num_classes = call->num_classes, padded = call->padded;
    const int soft = call->soft, hard = call->hard;
    const int kl_like = soft && call->divergence != DIV_MSE;
    const int teacher_labels = hard && args->label_mode == LABELS_TEACHER;
    const int reads_teacher = soft || teacher_labels;
    Rows rows;
    rows.student = slice->work;
    rows.teacher = rows.student + padded;
    rows.scaled_s = rows.teacher + padded;
    rows.exp_s = rows.scaled_s + padded;
    rows.scaled_t = rows.exp_s + padded;
    rows.exp_t = rows.scaled_t + padded;
    rows.exp_hard = kl_like ? (call->temperature == 1.0f ? rows.exp_s : rows.teacher) : rows.exp_t;
    rows.grad_row = rows.scaled_s;

    /* row r sits at (r / rows_per_batch, r % rows_per_batch): counted, not divided per row */
    int64_t batch = slice->first_row / call->rows_per_batch;
    int64_t position = slice->first_row % call->rows_per_batch;
    for (int64_t row = slice->first_row; row < slice->end_row; row++) {
        const char *student_in = row_at(args->student, args->student_strides, batch, position);
        const char *teacher_in = row_at(args->teacher, args->teacher_strides, batch, position);
        char *grad_out = row_at(args->grad, args->grad_strides, batch, position);
        if (++position == call->rows_per_batch) {
            position = 0;
            batch++;
        }
        int64_t target = 0;
        float loss = 0.0f;   /* no term computed, or an ignored row: loss 0, gradient 0 */
        int computed = 0;
        if (args->label_mode == LABELS_TENSOR) {
            target = args->labels[row];
            if (target == args->ignore_index) goto fill;   /* whatever the row holds */
            if (target < 0 || target >= num_classes) {   /* never read out of bounds */
                loss = NAN;
                goto fill;
            }
        }
        if (soft || hard) {
            int nan_s = 0, nan_t = 0;
            load_row(student_in, args->student_dtype, num_classes, padded, rows.student);
            float max_s = row_max(rows.student, padded, &nan_s), max_t = 0.0f;
            if (reads_teacher) {
                load_row(teacher_in, args->teacher_dtype, num_classes, padded, rows.teacher);
                max_t = row_max(rows.teacher, padded, &nan_t);
            }
            if (teacher_labels) {   /* the first index of the teacher's maximum */
                while (target < num_classes - 1 && !(rows.teacher[target] == max_t)) target++;
            }
            if (nan_s || nan_t) {   /* a NaN (or +inf) the loss reads makes the row NaN */
                loss = NAN;
                goto fill;
            }
            loss = row_terms(call, &rows, target, max_s, max_t, kl_like, grad_out != NULL);
            computed = 1;
        }
    fill:
        args->row_loss[row] = loss;
        if (!grad_out) continue;
        if (computed) store_row(rows.grad_row, args->grad_dtype, num_classes, grad_out);
        else fill_row(args->grad_dtype, num_classes, grad_out, loss);   /* 0, or NaN */
    }
}

/* Row losses (N,) float32 into row_loss and, when grad is not NULL, the gradient rows.
 *
 * The gradient is grad_scale * d(loss)/dz_s for the row losses (reduction none / sum), or for
 * their mean over kept rows (batchmean: grad_scale / max(kept, 1)). label_counts receives
 * (kept rows, kept labels outside [0, V)), counted before any row; with refuse_bad_labels a bad
 * label returns 1 before anything is written. When total is not NULL it receives the sum of
 * the row losses (batchmean: divided by max(kept, 1)), summed in double.
 * Returns 0, 1 (bad labels refused) or -1 (no memory for the row buffers; nothing written). */
int fastkd_kd_rows(KDArgs *args) {
    const int64_t num_rows = args->num_rows, num_classes = args->num_classes;
    const int64_t *labels = args->labels;
    int64_t kept = num_rows, bad = 0;
    if (args->label_mode == LABELS_TENSOR)
        count_labels(labels, num_rows, args->ignore_index, num_classes, &kept, &bad);
    args->label_counts[0] = kept;
    args->label_counts[1] = bad;
    args->work_bytes = 0;
    if (bad && args->refuse_bad_labels) return 1;
    const int reduction = args->reduction;
    double mean_scale = reduction == REDUCE_BATCHMEAN ? 1.0 / (double)(kept > 0 ? kept : 1) : 1.0;
    float *total = args->total;
    if (total) *total = 0.0f;
    if (num_rows <= 0) return 0;
    Call call;
    memset(&call, 0, sizeof call);
    call.args = args;
    call.rows_per_batch = args->rows_per_batch > 0 ? args->rows_per_batch : num_rows;
    call.num_classes = num_classes;
    call.padded = (num_classes + VEC - 1) / VEC * VEC;
    call.divergence = args->divergence;
    call.soft = args->soft_weight > 0.0;
    call.hard = args->label_mode != LABELS_NONE && args->hard_weight > 0.0;
    const double temperature = args->temperature;
    call.hard_power = temperature == 2.0 ? 2 : temperature == 3.0 ? 3 : temperature == 4.0 ? 4 : 0;
    call.temperature = (float)temperature;
    call.soft_weight = (float)args->soft_weight;
    call.hard_weight = (float)args->hard_weight;
    call.beta = (float)args->beta;
    call.grad_scale = (float)(args->grad_scale * mean_scale);

    const int num_threads = thread_count(args->num_threads, num_rows);
    size_t slice_floats = (size_t)call.padded * 6;   /* a multiple of 48 floats: 64-byte aligned */
    size_t work_bytes = slice_floats * sizeof(float) * (size_t)num_threads;
    float *work = aligned_alloc(64, work_bytes);
    if (!work) return -1;
    args->work_bytes = (int64_t)work_bytes;
    Slice slices[MAX_THREADS];
    int64_t per_thread = (num_rows + num_threads - 1) / num_threads;
    for (int t = 0; t < num_threads; t++) {
        int64_t first = t * per_thread, end = first + per_thread;
        slices[t].call = &call;
        slices[t].first_row = first < num_rows ? first : num_rows;
        slices[t].end_row = end < num_rows ? end : num_rows;
        slices[t].work = work + slice_floats * (size_t)t;
    }
    if (num_threads == 1) {
        process_rows(&slices[0]);
    } else {
#ifdef _OPENMP
        /* libgomp.so.1 resolves to the copy torch already loaded: these are torch's intra-op
           threads (a second pool would compete with torch's spinning workers for the cores) */
#pragma omp parallel for num_threads(num_threads) schedule(static, 1)
#endif
        for (int t = 0; t < num_threads; t++) process_rows(&slices[t]);
    }
    free(work);
    if (total && reduction != REDUCE_NONE) {
        double sum = 0.0;
        for (int64_t row = 0; row < num_rows; row++) sum += args->row_loss[row];
        *total = (float)(sum * mean_scale);
    }
    return 0;
}
