/* The fused KD loss against a sparse teacher on the CPU, compiled: loss and dense student
 * gradient of whole rows in one call.
 *
 * The CPU member of the sparse kernel family (Triton: kernels/kd_sparse.py, PyTorch reference:
 * fastkd/reference_sparse.py), chosen by fastkd/dispatch.py for CPU rows when it is built. Same
 * contract (fastkd.dispatch.SparseBackend) plus the data checks, the kept-row count and the
 * reduction in the same call; tested against the float64 reference (tests/reference_sparse.py)
 * in tests/loss/test_kernel_cpu_sparse.py. Loaded with ctypes by kernels/kd_sparse_cpu.py: plain
 * C, no Python headers; the call's parameters come as one struct (SparseCall, in
 * kernels/kd_sparse_cpu_parts.h with the K-sized math and the checks).
 *
 * The buckets (tails bucket, renormalize, ignore), the loss and its gradient are those of
 * kernels/kd_sparse.py's docstring: the classes outside S (the real teacher ids) get
 * p_s(j) * coef_rest, the K kept columns their own value (the formulas are
 * fastkd/reference_sparse.py's bucket_terms, here in double). The rest mass Q_rest is summed
 * over the classes outside S (no 1 - sum cancellation).
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
#include "kd_sparse_cpu_parts.h"   /* SparseCall, loads / stores, K-sized math, checks */

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
    const void *ids = row_ids(call, row);
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
    const int64_t student_bytes = call->student_dtype == DTYPE_FLOAT32 ? 4 : 2;
    float max_z = 0.0f;
    double sum_e = 0.0, sum_ce = 0.0;
    if (reads_row) {
        int64_t num_masked = 0, next = 0;
        if (stats && tail == TAIL_BUCKET) {   /* the real ids in increasing order */
            for (int64_t k = 0; k < num_kept; k++)
                if (active[k]) insert_sorted(sorted_ids, num_masked++, kept_ids[k]);
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
            while (next < num_masked && sorted_ids[next] < end)
                buffer[sorted_ids[next++]] = -INFINITY;
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
            /* the next chunk's bytes are fetched while this one is exponentiated, so that the
             * memory reads overlap the arithmetic (one prefetch per vector, within the row) */
            for (int64_t j = first; j < end; j += VEC) {
                if (j + CHUNK < num_classes)
                    __builtin_prefetch(student_in + (j + CHUNK) * student_bytes);
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
        const char *student_in = row_at(call->student, call->student_strides, batch, position);
        char *grad_out = row_at(call->grad, call->grad_strides, batch, position);
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

/* Row losses into call->row_loss and, when call->grad is not NULL, the gradient rows
 * (grad_scale * d row_loss / dz; reduction batchmean: divided by max(kept rows, 1) too).
 * label_counts receives (kept rows, kept labels outside [0, V)), counted first; with
 * refuse_bad_labels a bad label returns 1 before anything is written. total (when not NULL)
 * receives the sum of the row losses (batchmean: divided by max(kept, 1)). With check_values
 * the data checks (check_rows) run first. Returns 0, 1 (a bad label, refused:
 * refuse_bad_labels or check_values), 2 (a row may fail a data check) or -1 (no memory);
 * nothing is written before 0. */
int fastkd_kd_sparse_rows(SparseCall *call_in) {
    SparseCall call = *call_in;
    call_in->work_bytes = 0;
    int64_t kept = call.num_rows, bad = 0;
    if (call.label_mode == LABELS_TENSOR)
        count_labels(call.labels, call.num_rows, call.ignore_index, call.num_classes, &kept, &bad);
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
    const int threads = thread_count(call.num_threads, call.num_rows);
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
    call_in->work_bytes = (int64_t)(slice_bytes * (size_t)threads);
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
