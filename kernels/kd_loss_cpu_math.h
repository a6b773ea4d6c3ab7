/* Vector math, element types and call plumbing for the CPU kernels (kernels/kd_loss_cpu.c,
 * kernels/kd_sparse_cpu.c): GCC/Clang vector extensions of VEC float32 lanes, exp2 / log2
 * polynomials that vectorize (libm's do not), and exact fp16 / bf16 <-> float32 conversions
 * (round to nearest even, as torch's .to()). Every INLINE function is inlined into the row code,
 * so it is compiled once per target_clones copy. */
#ifndef FASTKD_KD_LOSS_CPU_MATH_H
#define FASTKD_KD_LOSS_CPU_MATH_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VEC 8
typedef float vfloat __attribute__((vector_size(VEC * 4)));
typedef int32_t vint __attribute__((vector_size(VEC * 4)));

/* x86-64: one copy of the row code for AVX-512 machines (x86-64-v4: the same 8-lane code, with
 * AVX-512VL's instructions and registers), one for AVX2 + FMA (x86-64-v3), one for the baseline
 * (SSE2); the loader picks at run time (GCC's target_clones, an ifunc). Elsewhere: the
 * compiler's default. -DROW_TARGETS= builds one copy for the -march given (the tests build
 * each that this machine runs). */
#ifndef ROW_TARGETS
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define ROW_TARGETS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ROW_TARGETS
#endif
#endif
#define INLINE static inline __attribute__((always_inline))

enum { DTYPE_FLOAT32 = 0, DTYPE_FLOAT16 = 1, DTYPE_BFLOAT16 = 2 };
enum { LABELS_NONE = 0, LABELS_TENSOR = 1, LABELS_TEACHER = 2 };
enum { REDUCE_NONE = 0, REDUCE_SUM = 1, REDUCE_BATCHMEAN = 2 };
#define MAX_THREADS 64

#define LN2 0.693147180559945309f
#define LOG2E 1.442695040888963407f

/* ----------------------------------------------------------------------------- vector helpers */
INLINE vfloat splat(float value) { return (vfloat){0} + value; }

INLINE vfloat pick(vint mask, vfloat if_true, vfloat if_false) {
    return (vfloat)(((vint)if_true & mask) | ((vint)if_false & ~mask));
}

INLINE vfloat zero_where(vint mask, vfloat x) { return (vfloat)((vint)x & ~mask); }

INLINE vfloat keep_where(vint mask, vfloat x) { return (vfloat)((vint)x & mask); }

INLINE float lane_sum(vfloat v) {
    float total = 0.0f;
    for (int lane = 0; lane < VEC; lane++) total += v[lane];
    return total;
}

INLINE float lane_max(vfloat v) {
    float best = v[0];
    for (int lane = 1; lane < VEC; lane++) best = v[lane] > best ? v[lane] : best;
    return best;
}

/* 2^x for x <= 0 or -inf, the only arguments the kernel forms (a row holding NaN or +inf is
 * made NaN before any exponential): x = n + f with n = round(x), |f| <= 1/2, 2^f by its Taylor
 * series to f^7 (relative error < 6e-9, below float32's half ulp), 2^n by the exponent bits.
 * x < -126 gives 0 (float32's normal range ends there: the subnormal tail below 1.2e-38 is
 * dropped), so -inf gives exactly 0. */
INLINE vfloat vexp2(vfloat x) {
    const vfloat round_magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vint underflow = x < splat(-126.0f);
    vfloat clamped = zero_where(underflow, x);
    vfloat whole = (clamped + round_magic) - round_magic;
    vfloat f = clamped - whole;
    /* Taylor coefficients ln2^n / n!, summed in Estrin's order (a short dependency chain) */
    vfloat f2 = f * f, f4 = f2 * f2;
    vfloat low = (splat(1.0f) + splat(6.9314718055994531e-01f) * f)
                 + (splat(2.4022650695910071e-01f) + splat(5.5504108664821580e-02f) * f) * f2;
    vfloat high = (splat(9.6181291076284772e-03f) + splat(1.3333558146428443e-03f) * f)
                  + (splat(1.5403530393381606e-04f) + splat(1.5252733804059841e-05f) * f) * f2;
    vfloat poly = low + high * f4;
    vint exponent = __builtin_convertvector(whole, vint);
    return zero_where(underflow, poly * (vfloat)((exponent + 127) << 23));
}

/* log2(x) for positive normal x: x = 2^n m with m in [sqrt(1/2), sqrt(2)), so that m - 1 is exact
 * (Sterbenz) and log2(1) is exactly 0; with s = (m - 1) / (m + 1), |s| <= 0.172,
 * ln m = 2 atanh(s) = 2 (s + s^3/3 + ... + s^9/9) (relative error < 3e-9). */
INLINE vfloat vlog2(vfloat x) {
    vint bits = (vint)x;
    vint exponent = ((bits >> 23) & 0xff) - 127;
    vfloat mantissa = (vfloat)((bits & 0x007fffff) | 0x3f800000);   /* [1, 2) */
    vint above = mantissa > splat(1.41421356237f);
    mantissa = pick(above, mantissa * splat(0.5f), mantissa);
    exponent -= above;   /* a true lane is -1 */
    vfloat s = (mantissa - splat(1.0f)) / (mantissa + splat(1.0f));
    vfloat s2 = s * s;
    vfloat series = splat(1.0f) + s2 * (splat(1.0f / 3.0f) + s2 * (splat(1.0f / 5.0f)
                    + s2 * (splat(1.0f / 7.0f) + s2 * splat(1.0f / 9.0f))));
    return __builtin_convertvector(exponent, vfloat) + series * s * splat(2.0f * LOG2E);
}

/* ----------------------------------------------------------------------------- element types */
INLINE uint32_t bits_of(float value) {   /* the bit pattern of a float (no aliasing rules broken) */
    uint32_t bits;
    memcpy(&bits, &value, 4);
    return bits;
}

INLINE float float_of(uint32_t bits) {
    float value;
    memcpy(&value, &bits, 4);
    return value;
}

INLINE float half_to_float(uint16_t half) {
    /* IEEE binary16 -> binary32, exact (normals, subnormals, inf, NaN) */
    uint32_t sign = (uint32_t)(half & 0x8000u) << 16;
    uint32_t exponent = (half >> 10) & 0x1fu;
    uint32_t mantissa = half & 0x3ffu;
    if (exponent == 0x1fu) return float_of(sign | 0x7f800000u | (mantissa << 13));
    if (exponent != 0) return float_of(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    return float_of(sign | bits_of((float)mantissa * 5.9604644775390625e-08f)); /* m * 2^-24 */
}

INLINE uint16_t float_to_half(float value) {
    /* binary32 -> binary16, round to nearest even (as torch's .to(torch.float16)) */
    uint32_t bits = bits_of(value);
    uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);   /* NaN */
    if (magnitude >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  /* rounds to inf */
    if (magnitude < 0x38800000u) {                                   /* subnormal or zero */
        /* adding 0.5 (2^-1) puts the half subnormal's bits at the bottom, rounded to even */
        return (uint16_t)(sign | (bits_of(float_of(magnitude) + 0.5f) - 0x3f000000u));
    }
    uint32_t odd = (magnitude >> 13) & 1u;
    magnitude += 0xc8000fffu + odd;   /* rebias the exponent (-112 << 23) and round */
    return (uint16_t)(sign | (magnitude >> 13));
}

INLINE float bfloat16_to_float(uint16_t value) { return float_of((uint32_t)value << 16); }

INLINE uint16_t float_to_bfloat16(float value) {
    uint32_t bits = bits_of(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x0040u); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);   /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

/* Row of `count` elements of `dtype` at `source` -> float32 `out`, then -inf up to `padded`. */
INLINE void load_row(const void *source, int dtype, int64_t count, int64_t padded, float *out) {
    if (dtype == DTYPE_FLOAT32) {
        memcpy(out, source, (size_t)count * 4);
    } else if (dtype == DTYPE_BFLOAT16) {
        const uint16_t *values = (const uint16_t *)source;
        for (int64_t i = 0; i < count; i++) out[i] = bfloat16_to_float(values[i]);
    } else {
        const uint16_t *values = (const uint16_t *)source;
        for (int64_t i = 0; i < count; i++) out[i] = half_to_float(values[i]);
    }
    for (int64_t i = count; i < padded; i++) out[i] = -INFINITY;
}

INLINE void store_row(const float *values, int dtype, int64_t count, void *target) {
    if (dtype == DTYPE_FLOAT32) {
        memcpy(target, values, (size_t)count * 4);
    } else if (dtype == DTYPE_BFLOAT16) {
        uint16_t *out = (uint16_t *)target;
        for (int64_t i = 0; i < count; i++) out[i] = float_to_bfloat16(values[i]);
    } else {
        uint16_t *out = (uint16_t *)target;
        for (int64_t i = 0; i < count; i++) out[i] = float_to_half(values[i]);
    }
}

INLINE void fill_row(int dtype, int64_t count, void *target, float value) {
    if (dtype == DTYPE_FLOAT32) {
        float *out = (float *)target;
        for (int64_t i = 0; i < count; i++) out[i] = value;
    } else {
        uint16_t bits = dtype == DTYPE_BFLOAT16 ? float_to_bfloat16(value) : float_to_half(value);
        uint16_t *out = (uint16_t *)target;
        for (int64_t i = 0; i < count; i++) out[i] = bits;
    }
}

/* ----------------------------------------------------------------------------- call plumbing */
/* Row (batch, position) of a tensor: base + batch * strides[0] + position * strides[1] (byte
 * strides); NULL when base is NULL. */
INLINE char *row_at(const void *base, const int64_t strides[2], int64_t batch, int64_t position) {
    return base ? (char *)base + batch * strides[0] + position * strides[1] : NULL;
}

/* *kept = rows whose label is not ignore_index, *bad = those of them outside [0, V) */
static inline void count_labels(const int64_t *labels, int64_t num_rows, int64_t ignore_index,
                                int64_t num_classes, int64_t *kept, int64_t *bad) {
    *kept = *bad = 0;
    for (int64_t row = 0; row < num_rows; row++) {
        int is_kept = labels[row] != ignore_index;
        *kept += is_kept;
        *bad += is_kept & (labels[row] < 0 || labels[row] >= num_classes);
    }
}

/* The requested thread count within [1, MAX_THREADS] and at most one per row (num_rows > 0). */
static inline int thread_count(int requested, int64_t num_rows) {
    if (requested > MAX_THREADS) requested = MAX_THREADS;
    if (requested > num_rows) requested = (int)num_rows;
    return requested < 1 ? 1 : requested;
}

#endif /* FASTKD_KD_LOSS_CPU_MATH_H */
