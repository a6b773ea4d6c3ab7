/* The fused KD loss against a sparse teacher on the CPU, compiled: loss and dense student
 * gradient of whole rows in one call.
 *
 * The CPU member of the sparse kernel family (Triton: kernels/kd_sparse.py, ATen twin:
 * fastkd/fallback_sparse.py), chosen by fastkd/dispatch.py for CPU rows when it is built. Same
 * contract (fastkd/sparse_loss.py, _SPARSE_BACKEND_CONTRACT) plus the label check, the kept-row
 * count and the sum of the row losses in the same call; tested against the float64 reference
 * (tests/reference_sparse.py) in tests/test_kernel_cpu_sparse.py. Loaded with ctypes by
 * kernels/kd_sparse_cpu.py: plain C, no Python headers; the call's parameters come as one
 * struct (SparseCall).
 *
 * Buckets (u = z / T, p_s = softmax(u) over all V classes, S = the real teacher ids of the row;
 * padding entries, a count of 0 or a value of -inf, are no bucket and their class stays in the
 * rest):
 *   bucket       each id of S, plus one bucket for every other class;
 *                P_k = exp(v_k / T - lse) or c_k / sum c, P_rest = 1 - sum_k P_k (0 for sampled
 *                targets and when S covers all V classes); Q_k = p_s(k), Q_rest = sum_{j not
 *                in S} p_s(j), summed over those classes (no 1 - sum cancellation)
 *   renormalize  P = softmax(v / T), Q = softmax(u[S]) over S; gradient 0 outside S
 *   ignore       forward KL over S only, P_k as for bucket, Q_k = p_s(k)
 *   row_loss = soft_weight T^2 D(P, Q) + hard_weight (-log softmax(z)[y])
 * With G_b = dD/dQ_b, dD/du_j = w(j) (G_b(j) - <Q, G>) (w = p_s, or Q_k for renormalize), and
 * d(T^2 D)/dz = T dD/du: the classes outside S get p_s(j) * coef_rest, the K kept columns their
 * own value (the formulas are fastkd/fallback_sparse.py's bucket_terms, here in double).
 * A row without real entries has P_rest = Q_rest = 1 (divergence 0) and, with
 * labels="teacher", no hard term.
 *
 * Per row: the K entries; the student row read once into a float32 buffer (converted from
 * fp32 / fp16 / bf16, its maximum on the way); the kept columns masked to -inf there (bucket
 * tail) so that one exp2 pass gives the exact rest sum; the K-sized math in double; one pass
 * writing the gradient in the student's dtype from the buffer; then the label column and the
 * K kept columns. Every student element is read before the row's gradient is written, so the
 * gradient may be the student's own storage. A NaN or +inf student logit makes its row NaN
 * (loss and gradient); an ignored row (label == ignore_index) has loss 0 and a zero gradient;
 * a kept label or a real id outside [0, V) makes its row NaN (never an out-of-bounds access).
 * Rows go over up to num_threads OpenMP threads (when built with OpenMP), one buffer each.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kd_loss_cpu_math.h"   /* vfloat, vexp2, fp16 / bf16 conversions */

enum { DIV_FORWARD_KL = 0, DIV_REVERSE_KL = 1, DIV_JSD = 2 };
enum { TAIL_BUCKET = 0, TAIL_RENORMALIZE = 1, TAIL_IGNORE = 2 };
enum { LABELS_NONE = 0, LABELS_TENSOR = 1, LABELS_TEACHER = 2 };
enum { IDS_INT64 = 0, IDS_INT32 = 1, IDS_INT16 = 2, IDS_UINT16 = 3 };
enum { REDUCE_NONE = 0, REDUCE_SUM = 1, REDUCE_BATCHMEAN = 2 };
#define CHUNK 1024   /* floats of a row chunk: 4 KB, in L1 between its load and its exponentials */

/* Everything one call needs (kernels/kd_sparse_cpu.py fills the same layout with ctypes). */
typedef struct {
    const void *student;                /* (rows, V): row r at (r / rows_per_batch,
                                           r % rows_per_batch) of the two byte strides */
    void *grad;                         /* NULL: no gradient; same layout rules as student */
    const void *ids;                    /* (rows, K) ids, row stride ids_stride elements */
    const void *values;                 /* (rows, K) top-k values or NULL */
    const float *lse;                   /* (rows,) float32 or NULL */
    const float *counts;                /* (rows, K) float32 sampled counts or NULL */
    const int64_t *labels;              /* (rows,) or NULL */
    float *row_loss;                    /* (rows,) float32 out */
    double *total;                      /* NULL, or the sum of the row losses (double) out */
    int64_t *label_counts;              /* NULL, or (kept rows, kept labels outside [0, V)) */
    int64_t student_strides[2], grad_strides[2];   /* bytes */
    int64_t ids_stride, values_stride, counts_stride;   /* elements */
    int64_t num_rows, rows_per_batch, num_classes, num_kept, ignore_index;
    double temperature, soft_weight, hard_weight, beta, grad_scale;
    int32_t student_dtype, grad_dtype, ids_dtype, values_dtype;
    int32_t label_mode, divergence, tail, num_threads, refuse_bad_labels, reduction;
    int32_t check_values;               /* run the data checks first (check_rows) */
    double mass_temperature;            /* > 0: the kept-mass check at this temperature */
    double values_unit;                 /* one rounding step of the values' dtype, relative */
} SparseCall;

typedef struct {
    const SparseCall *call;
    int64_t first_row, end_row;
    float *row, *exp_ce;                /* padded float32 buffers */
    float *shifts;                      /* one per CHUNK of the row */
    double *scratch;                    /* 6 * K doubles, then K flags */
    int64_t *kept_ids, *sorted_ids;     /* K each */
} Slice;

/* ----------------------------------------------------------------------------- loads, stores */
INLINE int64_t load_id(const void *ids, int dtype, int64_t i) {
    switch (dtype) {
        case IDS_INT64: return ((const int64_t *)ids)[i];
        case IDS_INT32: return ((const int32_t *)ids)[i];
        case IDS_INT16: return ((const int16_t *)ids)[i];
        default: return ((const uint16_t *)ids)[i];
    }
}

INLINE float load_value(const void *values, int dtype, int64_t i) {
    if (dtype == DTYPE_FLOAT32) return ((const float *)values)[i];
    uint16_t bits = ((const uint16_t *)values)[i];
    return dtype == DTYPE_BFLOAT16 ? bfloat16_to_float(bits) : half_to_float(bits);
}

typedef uint16_t vu16 __attribute__((vector_size(VEC * 2)));
typedef uint32_t vu32 __attribute__((vector_size(VEC * 4)));

/* VEC elements of a row from element offset i, as float32 */
INLINE vfloat load_vec(const char *source, int dtype, int64_t i) {
    vfloat x;
    if (dtype == DTYPE_FLOAT32) {
        memcpy(&x, source + i * 4, sizeof x);
    } else if (dtype == DTYPE_BFLOAT16) {
        vu16 half_bits;
        memcpy(&half_bits, source + i * 2, sizeof half_bits);
        x = (vfloat)(__builtin_convertvector(half_bits, vu32) << 16);
    } else {
        const uint16_t *bits = (const uint16_t *)source + i;
        for (int lane = 0; lane < VEC; lane++) x[lane] = half_to_float(bits[lane]);
    }
    return x;
}

INLINE void store_value(void *target, int dtype, int64_t i, float value) {
    if (dtype == DTYPE_FLOAT32) ((float *)target)[i] = value;
    else if (dtype == DTYPE_BFLOAT16) ((uint16_t *)target)[i] = float_to_bfloat16(value);
    else ((uint16_t *)target)[i] = float_to_half(value);
}

/* VEC gradient values into `target` (element offset i) in the gradient's dtype */
INLINE void store_vec(char *target, int dtype, int64_t i, vfloat g) {
    if (dtype == DTYPE_FLOAT32) {
        memcpy(target + i * 4, &g, sizeof g);
    } else if (dtype == DTYPE_BFLOAT16) {   /* round to nearest even; NaN stays NaN */
        vu32 bits = (vu32)g;
        vu32 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
        vint nan = (vint)((bits & 0x7fffffffu) > 0x7f800000u);
        rounded = (vu32)pick(nan, (vfloat)((bits >> 16) | 0x40u), (vfloat)rounded);
        vu16 out = __builtin_convertvector(rounded, vu16);
        memcpy(target + i * 2, &out, sizeof out);
    } else {
        uint16_t *out = (uint16_t *)target + i;
        for (int lane = 0; lane < VEC; lane++) out[lane] = float_to_half(g[lane]);
    }
}

/* ----------------------------------------------------------------------------- K-sized math */
static double log_mixture(double log_q, double log_p, double log_beta, double log_rest) {
    double from_p = log_beta + log_p, from_q = log_rest + log_q;
    double larger = from_p > from_q ? from_p : from_q, smaller = from_p > from_q ? from_q : from_p;
    if (larger == -INFINITY) return -INFINITY;
    return larger + log1p(exp(smaller - larger));
}

INLINE double xlogy(double weight, double log_weight, double log_other) {
    return weight == 0.0 ? 0.0 : weight * (log_weight - log_other);
}

/* log-softmax over the real entries of x (n entries, active flags), into out (-inf elsewhere) */
static void log_softmax_active(const double *x, const unsigned char *active, int64_t n,
                               double *out) {
    double top = -INFINITY;
    for (int64_t k = 0; k < n; k++)
        if (active[k] && x[k] > top) top = x[k];
    if (top == -INFINITY) top = 0.0;
    double sum = 0.0;
    for (int64_t k = 0; k < n; k++)
        if (active[k]) sum += exp(x[k] - top);
    double log_sum = log(sum);
    for (int64_t k = 0; k < n; k++) out[k] = active[k] ? x[k] - top - log_sum : -INFINITY;
}

/* The divergence over the buckets; kept_du[k] = dD/du at kept entry k, *coef_rest with
 * dD/du_j = w(j) coef_rest outside S. log_q / log_p are -inf at padding entries. */
static double bucket_terms(const SparseCall *call, int64_t n, const unsigned char *active,
                           const double *log_q, const double *log_p, int has_rest,
                           double log_q_rest, double p_rest, double *kept_du,
                           double *coef_rest) {
    const int divergence = call->divergence;
    double div = 0.0, rest_coef = 0.0;
    double log_p_rest = p_rest > 0.0 ? log(p_rest) : -INFINITY;
    double q_rest = has_rest ? exp(log_q_rest) : 0.0;
    if (divergence == DIV_FORWARD_KL) {
        double p_total = 0.0;
        for (int64_t k = 0; k < n; k++) {
            if (!active[k]) continue;
            double p = exp(log_p[k]);
            div += xlogy(p, log_p[k], log_q[k]);
            p_total += p;
        }
        if (has_rest) {
            div += xlogy(p_rest, log_p_rest, log_q_rest);
            p_total += p_rest;
            rest_coef = p_total - (p_rest == 0.0 ? 0.0 : exp(log_p_rest - log_q_rest));
        }
        if (call->tail == TAIL_IGNORE) rest_coef = p_total;
        for (int64_t k = 0; k < n; k++)
            kept_du[k] = active[k] ? exp(log_q[k]) * p_total - exp(log_p[k]) : 0.0;
    } else if (divergence == DIV_REVERSE_KL) {
        for (int64_t k = 0; k < n; k++)
            if (active[k]) div += xlogy(exp(log_q[k]), log_q[k], log_p[k]);
        if (has_rest) {
            div += xlogy(q_rest, log_q_rest, log_p_rest);
            rest_coef = log_q_rest - log_p_rest - div;
        }
        for (int64_t k = 0; k < n; k++) {
            double q = active[k] ? exp(log_q[k]) : 0.0;
            kept_du[k] = q == 0.0 ? 0.0 : q * (log_q[k] - log_p[k] - div);
        }
    } else {   /* jsd, 0 < beta < 1 */
        const double beta = call->beta, log_beta = log(beta), log_rest = log1p(-beta);
        double student_dot_g = 0.0, teacher_term = 0.0;
        for (int64_t k = 0; k < n; k++) {
            if (!active[k]) continue;
            double log_m = log_mixture(log_q[k], log_p[k], log_beta, log_rest);
            double q = exp(log_q[k]);
            kept_du[k] = q == 0.0 ? 0.0 : (1.0 - beta) * (log_q[k] - log_m);   /* g_k for now */
            student_dot_g += q == 0.0 ? 0.0 : q * kept_du[k];
            teacher_term += xlogy(exp(log_p[k]), log_p[k], log_m);
        }
        double g_rest = 0.0;
        if (has_rest) {
            double log_m_rest = log_mixture(log_q_rest, log_p_rest, log_beta, log_rest);
            g_rest = q_rest == 0.0 ? 0.0 : (1.0 - beta) * (log_q_rest - log_m_rest);
            student_dot_g += q_rest == 0.0 ? 0.0 : q_rest * g_rest;
            teacher_term += xlogy(p_rest, log_p_rest, log_m_rest);
            rest_coef = g_rest - student_dot_g;
        }
        div = beta * teacher_term + student_dot_g;
        for (int64_t k = 0; k < n; k++) {
            double q = active[k] ? exp(log_q[k]) : 0.0;
            kept_du[k] = q == 0.0 ? 0.0 : q * (kept_du[k] - student_dot_g);
        }
    }
    if (has_rest && q_rest == 0.0) rest_coef = 0.0;   /* every p_s(j) outside S is 0 too */
    *coef_rest = rest_coef;
    return div;
}

/* ----------------------------------------------------------------------------- one row */
INLINE void zero_row(const SparseCall *call, char *grad_out, float value) {
    fill_row(call->grad_dtype, call->num_classes, grad_out, value);
}

/* Loss of one row that is not ignored; with grad_out, its gradient. */
INLINE float sparse_row(const SparseCall *call, const Slice *slice, int64_t row,
                        const char *student_in, char *grad_out, int64_t label) {
    const int64_t num_classes = call->num_classes, num_kept = call->num_kept;
    const int64_t padded = (num_classes + VEC - 1) / VEC * VEC;
    const int tail = call->tail;
    const int sampled = call->counts != NULL;
    const double temp = call->temperature, inv_temp = 1.0 / temp;
    const int soft = call->soft_weight > 0.0;
    const int stats = soft && tail != TAIL_RENORMALIZE;
    int hard = call->hard_weight > 0.0 && call->label_mode != LABELS_NONE;
    double *kept_z = slice->scratch, *log_q = kept_z + num_kept, *log_p = log_q + num_kept;
    double *kept_du = log_p + num_kept, *kept_e = kept_du + num_kept;
    double *teacher_x = kept_e + num_kept;
    unsigned char *active = (unsigned char *)(teacher_x + num_kept);
    int64_t *kept_ids = slice->kept_ids, *sorted_ids = slice->sorted_ids;

    /* --- the K entries: real ones, ids in range, the teacher label --- */
    const void *ids = (const char *)call->ids
                      + row * call->ids_stride * (call->ids_dtype == IDS_INT64   ? 8
                                                  : call->ids_dtype == IDS_INT32 ? 4 : 2);
    int64_t num_active = 0, best = -1;
    double best_score = -INFINITY;
    for (int64_t k = 0; k < num_kept; k++) {
        double x;
        if (sampled) {
            x = call->counts[row * call->counts_stride + k];
            active[k] = x > 0.0;
        } else {
            x = load_value(call->values, call->values_dtype, row * call->values_stride + k);
            active[k] = x != -INFINITY;
        }
        teacher_x[k] = x;
        kept_ids[k] = load_id(ids, call->ids_dtype, k);
        if (!active[k]) continue;
        if (kept_ids[k] < 0 || kept_ids[k] >= num_classes) return NAN;
        num_active++;
        if (x > best_score) {
            best_score = x;
            best = k;
        }
    }
    if (call->label_mode == LABELS_TEACHER) {
        if (best < 0) hard = 0;   /* no real entry: no teacher label */
        else label = kept_ids[best];
    }
    if (!soft && !hard) {
        if (grad_out) zero_row(call, grad_out, 0.0f);
        return 0.0f;
    }

    /* --- the kept logits and the label logit, read before anything is written --- */
    for (int64_t k = 0; k < num_kept; k++) {
        kept_z[k] = active[k] ? load_value(student_in, call->student_dtype, kept_ids[k])
                              : -INFINITY;
        if (kept_z[k] != kept_z[k] || kept_z[k] == INFINITY) return NAN;
    }
    const double label_z = hard ? load_value(student_in, call->student_dtype, label) : 0.0;

    /* --- the student row in one read, a chunk at a time: converted into the buffer, its kept
     *     columns masked (bucket tail: the sum is then the exact rest sum), the chunk's max
     *     folded into the running max (the sums rescaled when it grows), then
     *     e = 2^((z - running max) k) in place; the hard CE's exp(z - max) beside it where it
     *     is not e. shifts[c]: the running max chunk c was exponentiated with. --- */
    float *buffer = slice->row, *exp_ce = slice->exp_ce, *shifts = slice->shifts;
    const int reads_row = stats || hard;
    const int shares = hard && stats && temp == 1.0;
    const int power = temp == 2.0 ? 2 : temp == 3.0 ? 3 : temp == 4.0 ? 4 : 0;
    const int separate_ce = hard && stats && !shares;
    const float scale = stats ? (float)(LOG2E * inv_temp) : LOG2E;
    const int64_t num_chunks = (padded + CHUNK - 1) / CHUNK;
    float max_z = 0.0f;
    double sum_e = 0.0, sum_ce = 0.0;
    if (reads_row) {
        int64_t num_masked = 0, next = 0;
        if (stats && tail == TAIL_BUCKET) {   /* the real ids in increasing order */
            for (int64_t k = 0; k < num_kept; k++) {
                if (!active[k]) continue;
                int64_t id = kept_ids[k], at = num_masked++;
                while (at > 0 && sorted_ids[at - 1] > id) {
                    sorted_ids[at] = sorted_ids[at - 1];
                    at--;
                }
                sorted_ids[at] = id;
            }
        }
        const int64_t whole = num_classes / VEC * VEC;
        const vfloat vscale = splat(scale), log2e = splat(LOG2E);
        vfloat total = splat(0.0f), total_ce = splat(0.0f);
        vint bad_lanes = {0};
        int bad = 0;
        float running = -INFINITY;
        for (int64_t c = 0; c < num_chunks; c++) {
            const int64_t first = c * CHUNK, end = first + CHUNK < padded ? first + CHUNK : padded;
            vfloat best = splat(-INFINITY);
            int64_t i = first;
            for (; i < end && i < whole; i += VEC) {
                vfloat x = load_vec(student_in, call->student_dtype, i);
                *(vfloat *)(buffer + i) = x;
                bad_lanes |= (x != x) | (x == splat(INFINITY));
                best = pick(x > best, x, best);
            }
            float chunk_max = lane_max(best);
            for (; i < end; i++) {   /* the row's last partial vector, then -inf padding */
                float x = i < num_classes ? load_value(student_in, call->student_dtype, i)
                                          : -INFINITY;
                buffer[i] = x;
                bad |= (x != x) | (x == INFINITY);
                chunk_max = x > chunk_max ? x : chunk_max;
            }
            while (next < num_masked && sorted_ids[next] < end) buffer[sorted_ids[next++]] = -INFINITY;
            if (chunk_max > running) {
                if (running != -INFINITY) {   /* rescale the sums to the new maximum */
                    total *= splat(exp2f((running - chunk_max) * scale));
                    if (separate_ce) total_ce *= splat(exp2f((running - chunk_max) * LOG2E));
                }
                running = chunk_max;
            }
            const float shift = running == -INFINITY ? 0.0f : running;
            shifts[c] = running;   /* -inf: the chunk's values are all 0 */
            const vfloat vshift = splat(shift);
            for (int64_t j = first; j < end; j += VEC) {
                vfloat z = *(vfloat *)(buffer + j);
                vfloat e = vexp2((z - vshift) * vscale);
                *(vfloat *)(buffer + j) = e;
                total += e;
                if (separate_ce) {
                    vfloat h;
                    if (power) {
                        vfloat e2 = e * e;
                        h = power == 2 ? e2 : power == 3 ? e2 * e : e2 * e2;
                    } else {
                        h = vexp2((z - vshift) * log2e);
                    }
                    *(vfloat *)(exp_ce + j) = h;
                    total_ce += h;
                }
            }
        }
        for (int lane = 0; lane < VEC; lane++) bad |= bad_lanes[lane] != 0;
        if (bad) return NAN;
        max_z = running == -INFINITY ? 0.0f : running;
        sum_e = lane_sum(total);
        sum_ce = separate_ce ? lane_sum(total_ce) : sum_e;
    }

    /* --- the K-sized math (double) --- */
    double row_loss = 0.0, coef_rest = 0.0, log_sum_s = 0.0;
    for (int64_t k = 0; k < num_kept; k++) {
        kept_du[k] = 0.0;
        kept_e[k] = active[k] ? exp((kept_z[k] - max_z) * inv_temp) : 0.0;
    }
    if (soft) {
        int has_rest = 0;
        double log_q_rest = -INFINITY, p_rest = 0.0;
        if (tail == TAIL_RENORMALIZE) {
            for (int64_t k = 0; k < num_kept; k++) log_p[k] = kept_z[k] * inv_temp;
            log_softmax_active(log_p, active, num_kept, log_q);
        } else {
            double kept_sum = 0.0;
            for (int64_t k = 0; k < num_kept; k++) kept_sum += kept_e[k];
            if (tail == TAIL_BUCKET) {
                log_sum_s = log(sum_e + kept_sum);
                log_q_rest = log(sum_e) - log_sum_s;
                has_rest = 1;
            } else {
                log_sum_s = log(sum_e);
            }
            for (int64_t k = 0; k < num_kept; k++)
                log_q[k] = active[k] ? (kept_z[k] - max_z) * inv_temp - log_sum_s : -INFINITY;
        }
        if (sampled) {
            double total = 0.0;
            for (int64_t k = 0; k < num_kept; k++) total += active[k] ? teacher_x[k] : 0.0;
            double log_total = log(total);
            for (int64_t k = 0; k < num_kept; k++)
                log_p[k] = active[k] ? log(teacher_x[k]) - log_total : -INFINITY;
        } else if (tail == TAIL_RENORMALIZE) {
            for (int64_t k = 0; k < num_kept; k++) teacher_x[k] *= inv_temp;
            log_softmax_active(teacher_x, active, num_kept, log_p);
        } else {
            const double lse = call->lse[row];
            double p_sum = 0.0;
            for (int64_t k = 0; k < num_kept; k++) {
                log_p[k] = active[k] ? teacher_x[k] * inv_temp - lse : -INFINITY;
                p_sum += active[k] ? exp(log_p[k]) : 0.0;
            }
            /* real ids covering every class (unique): the rest bucket is empty */
            p_rest = num_active >= num_classes ? 0.0 : (p_sum < 1.0 ? 1.0 - p_sum : 0.0);
        }
        double div = bucket_terms(call, num_kept, active, log_q, log_p, has_rest, log_q_rest,
                                  p_rest, kept_du, &coef_rest);
        row_loss += call->soft_weight * temp * temp * div;
    }
    double log_sum_ce = 0.0;
    if (hard) {
        if (shares) {
            log_sum_ce = log_sum_s;
        } else {
            double total = sum_ce;
            if (stats && tail == TAIL_BUCKET)   /* the masked kept columns */
                for (int64_t k = 0; k < num_kept; k++)
                    total += active[k] ? exp((double)kept_z[k] - max_z) : 0.0;
            log_sum_ce = log(total);
        }
        row_loss += call->hard_weight * (log_sum_ce - (label_z - max_z));
    }
    if (!grad_out) return (float)row_loss;

    /* --- gradient: the whole row from the buffer(s), chunk by chunk (each chunk's values
     *     brought to the final maximum by one factor), then the label and kept columns --- */
    const double soft_scale = call->grad_scale * call->soft_weight * temp;
    const double hard_scale = hard ? call->grad_scale * call->hard_weight : 0.0;
    double coef_e = stats ? soft_scale * coef_rest * exp(-log_sum_s) : 0.0;  /* times e */
    double coef_h = hard ? hard_scale * exp(-log_sum_ce) : 0.0;   /* times exp(z - max) */
    const int dtype = call->grad_dtype;
    if (!reads_row) {
        zero_row(call, grad_out, 0.0f);
    } else {
        const float *hard_source = separate_ce ? exp_ce : buffer;
        if (!stats) {   /* the buffer holds exp(z - max): the hard term alone */
            coef_e = coef_h;
            coef_h = 0.0;
        } else if (!separate_ce) {   /* T = 1: e is exp(z - max) */
            coef_e += coef_h;
            coef_h = 0.0;
        }
        const int64_t whole = num_classes / VEC * VEC;
        for (int64_t c = 0; c < num_chunks; c++) {
            const int64_t first = c * CHUNK;
            const int64_t end = first + CHUNK < num_classes ? first + CHUNK : num_classes;
            const float drop = shifts[c] - max_z;   /* <= 0, -inf for a chunk of zeros */
            const float factor_e = (float)coef_e * exp2f(drop * scale);
            const float factor_h = (float)coef_h * exp2f(drop * LOG2E);
            const vfloat ce = splat(factor_e), ch = splat(factor_h);
            int64_t i = first;
            for (; i < end && i < whole; i += VEC) {
                vfloat g = *(vfloat *)(buffer + i) * ce;
                if (coef_h != 0.0) g += *(const vfloat *)(hard_source + i) * ch;
                store_vec(grad_out, dtype, i, g);
            }
            for (; i < end; i++)
                store_value(grad_out, dtype, i, buffer[i] * factor_e + hard_source[i] * factor_h);
        }
        if (hard) {   /* the label column, rounded once (a kept label is rewritten below) */
            const float drop = shifts[label / CHUNK] - max_z;
            double at_label = buffer[label] * coef_e * exp2(drop * scale)
                              + hard_source[label] * coef_h * exp2(drop * LOG2E);
            store_value(grad_out, dtype, label, (float)(at_label - hard_scale));
        }
    }
    for (int64_t k = 0; k < num_kept; k++) {
        if (!active[k]) continue;
        double g = soft ? soft_scale * kept_du[k] : 0.0;
        if (hard) {
            double q_ce = exp((double)kept_z[k] - max_z - log_sum_ce);
            g += hard_scale * (kept_ids[k] == label ? q_ce - 1.0 : q_ce);
        }
        store_value(grad_out, dtype, kept_ids[k], (float)g);
    }
    return (float)row_loss;
}

ROW_TARGETS
static void process_rows(Slice *slice) {
    const SparseCall *call = slice->call;
    int64_t batch = slice->first_row / call->rows_per_batch;
    int64_t position = slice->first_row % call->rows_per_batch;
    for (int64_t row = slice->first_row; row < slice->end_row; row++) {
        const char *student_in = (const char *)call->student + batch * call->student_strides[0]
                                 + position * call->student_strides[1];
        char *grad_out = call->grad ? (char *)call->grad + batch * call->grad_strides[0]
                                      + position * call->grad_strides[1]
                                    : NULL;
        if (++position == call->rows_per_batch) {
            position = 0;
            batch++;
        }
        int64_t label = 0;
        float loss;
        if (call->label_mode == LABELS_TENSOR) {
            label = call->labels[row];
            if (label == call->ignore_index) {   /* whatever the row holds */
                call->row_loss[row] = 0.0f;
                if (grad_out) zero_row(call, grad_out, 0.0f);
                continue;
            }
        }
        if (label < 0 || label >= call->num_classes) loss = NAN;   /* never read out of bounds */
        else loss = sparse_row(call, slice, row, student_in, grad_out, label);
        call->row_loss[row] = loss;
        if (grad_out && loss != loss) zero_row(call, grad_out, NAN);
    }
}

#define MAX_THREADS 64
#define MASS_LIMIT (1.0 + 1e-3 - 1e-5)   /* fastkd.checks' 1 + MASS_SLACK, less a margin */

/* The data checks of fastkd.checks.check_sparse_values on rows [first, end), without its
 * messages: 1 when a row may fail one of them (the caller then runs that check, which names
 * the problem; the mass test errs towards flagging), else 0. Every row: ids in [0, V). Rows
 * not ignored: no NaN value or lse, counts finite and >= 0 with a positive sum, real ids
 * unique, and (mass_temperature > 0) sum_k exp(lowered v_k / T - lse) within the limit, each
 * value first lowered by one rounding step of its dtype. */
static int check_rows(const SparseCall *call, int64_t first, int64_t end, int64_t *sorted) {
    const int64_t num_kept = call->num_kept;
    const int sampled = call->counts != NULL;
    const int id_bytes = call->ids_dtype == IDS_INT64 ? 8 : call->ids_dtype == IDS_INT32 ? 4 : 2;
    for (int64_t row = first; row < end; row++) {
        const void *ids = (const char *)call->ids + row * call->ids_stride * id_bytes;
        int kept_row = call->label_mode != LABELS_TENSOR
                       || call->labels[row] != call->ignore_index;
        double mass = 0.0, total = 0.0;
        const double lse = !sampled && kept_row ? call->lse[row] : 0.0;
        if (lse != lse) return 1;
        int64_t num_real = 0;
        for (int64_t k = 0; k < num_kept; k++) {
            int64_t id = load_id(ids, call->ids_dtype, k);
            if (id < 0 || id >= call->num_classes) return 1;
            if (!kept_row) continue;
            int real;
            if (sampled) {
                double count = call->counts[row * call->counts_stride + k];
                if (!(count >= 0.0) || count == INFINITY) return 1;   /* negative, NaN, inf */
                total += count;
                real = count > 0.0;
            } else {
                double value = load_value(call->values, call->values_dtype,
                                          row * call->values_stride + k);
                if (value != value) return 1;
                real = value != -INFINITY;
                if (real && call->mass_temperature > 0.0) {
                    double lowered = value == INFINITY ? value
                                                       : value - fabs(value) * call->values_unit;
                    mass += exp(lowered / call->mass_temperature - lse);
                }
            }
            if (!real) continue;
            int64_t at = num_real++;   /* insertion into the sorted real ids */
            while (at > 0 && sorted[at - 1] > id) {
                sorted[at] = sorted[at - 1];
                at--;
            }
            if (at > 0 && sorted[at - 1] == id) return 1;   /* an id twice */
            sorted[at] = id;
        }
        if (kept_row && sampled && !(total > 0.0)) return 1;
        if (!(mass <= MASS_LIMIT)) return 1;
    }
    return 0;
}

/* Row losses into call->row_loss and, when call->grad is not NULL, the gradient rows
 * (grad_scale * d row_loss / dz; reduction batchmean: divided by max(kept rows, 1) too). label_counts
 * receives (kept rows, kept labels outside [0, V)), counted first; with refuse_bad_labels a bad
 * label returns 1 before anything is written. total (when not NULL) receives the sum of the
 * row losses (batchmean: divided by max(kept, 1)). With check_values the data checks
 * (check_rows) run first. Returns 0, 1 (a bad label, refused: refuse_bad_labels or
 * check_values), 2 (a row may fail a data check) or -1 (no memory); nothing is written
 * before 0. */
int fastkd_kd_sparse_rows(SparseCall *call_in) {
    SparseCall call = *call_in;
    int64_t kept = call.num_rows, bad = 0;
    if (call.label_mode == LABELS_TENSOR) {
        kept = 0;
        for (int64_t row = 0; row < call.num_rows; row++) {
            int64_t label = call.labels[row];
            int is_kept = label != call.ignore_index;
            kept += is_kept;
            bad += is_kept & (label < 0 || label >= call.num_classes);
        }
    }
    if (call.label_counts) {
        call.label_counts[0] = kept;
        call.label_counts[1] = bad;
    }
    if (bad && (call.refuse_bad_labels || call.check_values)) return 1;
    double mean_scale = call.reduction == REDUCE_BATCHMEAN ? 1.0 / (double)(kept > 0 ? kept : 1)
                                                           : 1.0;
    if (call.total) *call.total = 0.0;
    if (call.num_rows <= 0) return 0;
    if (call.rows_per_batch <= 0) call.rows_per_batch = call.num_rows;
    call.grad_scale *= mean_scale;
    int threads = call.num_threads;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > call.num_rows) threads = (int)call.num_rows;
    const int64_t padded = (call.num_classes + VEC - 1) / VEC * VEC;
    const int64_t num_kept = call.num_kept > 0 ? call.num_kept : 1;
    const int64_t num_chunks = (padded + CHUNK - 1) / CHUNK;
    /* per thread, each part a multiple of 64 bytes: two padded float rows, the chunk shifts,
       6 K doubles + K flags, 2 K ids */
#define ROUND64(bytes) (((size_t)(bytes) + 63) / 64 * 64)
    size_t row_bytes = ROUND64(padded * 4), shift_bytes = ROUND64(num_chunks * 4);
    size_t scratch_bytes = ROUND64(num_kept * (6 * 8 + 1)), id_bytes = ROUND64(num_kept * 8);
    size_t slice_bytes = 2 * row_bytes + shift_bytes + scratch_bytes + 2 * id_bytes;
    char *work = aligned_alloc(64, slice_bytes * (size_t)threads);
    if (!work) return -1;
    Slice slices[MAX_THREADS];
    int64_t per_thread = (call.num_rows + threads - 1) / threads;
    for (int t = 0; t < threads; t++) {
        int64_t first = t * per_thread, end = first + per_thread;
        char *base = work + slice_bytes * (size_t)t;
        slices[t].call = &call;
        slices[t].first_row = first < call.num_rows ? first : call.num_rows;
        slices[t].end_row = end < call.num_rows ? end : call.num_rows;
        slices[t].row = (float *)base;
        slices[t].exp_ce = (float *)(base + row_bytes);
        slices[t].shifts = (float *)(base + 2 * row_bytes);
        slices[t].scratch = (double *)(base + 2 * row_bytes + shift_bytes);
        slices[t].kept_ids = (int64_t *)(base + 2 * row_bytes + shift_bytes + scratch_bytes);
        slices[t].sorted_ids = slices[t].kept_ids + id_bytes / 8;
    }
    if (call.check_values) {   /* nothing is written before every row passes */
        int failed = 0;
        if (threads == 1) {
            failed = check_rows(&call, 0, call.num_rows, slices[0].sorted_ids);
        } else {
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : failed)
#endif
            for (int t = 0; t < threads; t++)
                failed |= check_rows(&call, slices[t].first_row, slices[t].end_row,
                                     slices[t].sorted_ids);
        }
        if (failed) {
            free(work);
            return 2;
        }
    }
    if (threads == 1) {
        process_rows(&slices[0]);
    } else {
#ifdef _OPENMP
        /* libgomp.so.1 resolves to the copy torch already loaded: torch's intra-op threads */
#pragma omp parallel for num_threads(threads) schedule(static, 1)
#endif
        for (int t = 0; t < threads; t++) process_rows(&slices[t]);
    }
    free(work);
    if (call.total) {
        double sum = 0.0;
        for (int64_t row = 0; row < call.num_rows; row++) sum += call.row_loss[row];
        *call.total = sum * mean_scale;
    }
    return 0;
}
