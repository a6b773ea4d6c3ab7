/* Parts of the sparse CPU kernel (kernels/kd_sparse_cpu.c, its only user): the call struct,
 * element loads and stores, the K-sized bucket math in double and the data checks. Every
 * function is static or inlined into the row code. */
#ifndef FASTKD_KD_SPARSE_CPU_PARTS_H
#define FASTKD_KD_SPARSE_CPU_PARTS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kd_loss_cpu_math.h"   /* vfloat, vexp2, fp16 / bf16 conversions, call plumbing */

enum { DIV_FORWARD_KL = 0, DIV_REVERSE_KL = 1, DIV_JSD = 2 };
enum { TAIL_BUCKET = 0, TAIL_RENORMALIZE = 1, TAIL_IGNORE = 2 };
enum { IDS_INT64 = 0, IDS_INT32 = 1, IDS_INT16 = 2, IDS_UINT16 = 3 };
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
    int64_t work_bytes;                 /* out: bytes of the row buffers the call allocated */
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

/* the K ids of `row` */
INLINE const void *row_ids(const SparseCall *call, int64_t row) {
    const int id_bytes = call->ids_dtype == IDS_INT64 ? 8 : call->ids_dtype == IDS_INT32 ? 4 : 2;
    return (const char *)call->ids + row * call->ids_stride * id_bytes;
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

/* Inserts id into the increasing sorted[0 .. count); returns 1 when it was there already. */
INLINE int insert_sorted(int64_t *sorted, int64_t count, int64_t id) {
    int64_t at = count;
    while (at > 0 && sorted[at - 1] > id) {
        sorted[at] = sorted[at - 1];
        at--;
    }
    sorted[at] = id;
    return at > 0 && sorted[at - 1] == id;
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

/* ----------------------------------------------------------------------------- data checks */
#define MASS_LIMIT (1.0 + 1e-3 - 1e-5)   /* fastkd.checks' 1 + MASS_SLACK, less a margin */

/* The data checks of fastkd.checks.check_sparse_values on rows [first, end), without its
 * messages: 1 when a row may fail one of them (the caller then runs that check, which names
 * the problem; the mass test errs towards flagging), else 0. Every row: ids in [0, V). Rows
 * not ignored: no NaN or +inf value, no NaN lse, counts finite and >= 0 with a positive sum,
 * real ids unique, and (mass_temperature > 0) sum_k exp(lowered v_k / T - lse) within the
 * limit, each value first lowered by one rounding step of its dtype. */
static int check_rows(const SparseCall *call, int64_t first, int64_t end, int64_t *sorted) {
    const int64_t num_kept = call->num_kept;
    const int sampled = call->counts != NULL;
    for (int64_t row = first; row < end; row++) {
        const void *ids = row_ids(call, row);
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
                if (value != value || value == INFINITY) return 1;
                real = value != -INFINITY;
                if (real && call->mass_temperature > 0.0) {
                    double lowered = value - fabs(value) * call->values_unit;
                    mass += exp(lowered / call->mass_temperature - lse);
                }
            }
            if (real && insert_sorted(sorted, num_real++, id)) return 1;   /* an id twice */
        }
        if (kept_row && sampled && !(total > 0.0)) return 1;
        if (!(mass <= MASS_LIMIT)) return 1;
    }
    return 0;
}

#endif /* FASTKD_KD_SPARSE_CPU_PARTS_H */
