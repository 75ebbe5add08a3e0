/* Per-unit records of one site's activations (neuronmap.corpus.native).

   x is a right-padded batch [rows, T, n] of float32; row r holds lengths[r] valid tokens (0 for a
   filler row). The units are split between threads in whole cache lines, so threads never write
   the same memory.

   The work is one pass over the batch for a register's worth of units at a time (LANES,
   vector_blocks.h: sixteen on AVX-512, eight on AVX2). Within a row, everything a token updates
   lives in registers but the histograms, whose rows for those units stay in cache: the extremes
   and their first positions, the tokens > 0 and with |x| > threshold, the sums of the first four
   powers of each value's deviation from a shift. The row's peak and trough are put aside; at the
   end of the batch its central moments are merged into the running ones with Pebay's pairwise
   formulas, and each unit's rows are offered to its kept contexts in row order (the same offers
   as row by row, but a unit's heaps stay in L1 while its whole batch goes in). Measured on the
   default model (one thread, real activations, ns per value): separate passes per quantity and
   per-row merges 4.1, this layout 2.6, with the histogram's gather and scatter 1.9 (machine A).
   How the histograms are counted is the one choice that goes either way with the CPU: on machine
   C (AMD EPYC, AVX-512) the same gather and scatter took 2.1 ns per value and sixteen scalar
   increments 1.65, the rest of the pass 0.8. So an AVX-512 build has both, and native.py times
   them once per process and passes the faster (the counts are the same integers either way).
   Offering a unit's rows at the batch's end, a branch-free sift and an unrolled count for full
   blocks then took the kernel from 1.32-1.39 to 1.17-1.21 ns per value (machine C, 2 threads,
   the corpus's context lengths). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include "../model/vector_blocks.h"

#define SUB_BITS 3
#define MIN_EXPONENT (-8)
#define OCTAVES 20
#define HALF (OCTAVES << SUB_BITS)
#define BINS (2 * HALF + 1)
/* The histogram bin of each lane (layout in io/histogram.py, kept in step with the macros above).
   Branch-free: signs are a coin toss, and a mispredicted branch costs more than the rest. */
static inline vi bins_of(vf v) {
    const vi u = (vi)v;
    vi code = ((u & 0x7fffffff) >> (23 - SUB_BITS)) - ((127 + MIN_EXPONENT) << SUB_BITS);
    const vi top = code - code + (HALF - 1);
    code = select_i(code < top, code, top);
    const vi negative = u >> 31;  /* arithmetic: all ones for a negative value */
    const vi signed_bin = select_i(negative, (HALF - 1) - code, (HALF + 1) + code);
    return select_i(code < 0, code - code + HALF, signed_bin);
}

/* Keys that order by value, then by lower context id: the float made monotone in the high 32
   bits, the complement of the context id in the low 32 (reductions.order_key does the same). */
static inline int64_t order_key(float v, int64_t context) {
    int32_t bits;
    memcpy(&bits, &v, sizeof bits);
    const int64_t monotone = bits < 0 ? (int64_t)(bits ^ 0x7fffffff) : (int64_t)bits;
    return (int64_t)((uint64_t)monotone << 32) | (int64_t)(0xffffffffLL - context);
}

/* A unit's best `cap` keys as a min-heap in its own row of [n, cap] arrays (a sift stays within
   a few neighbouring cache lines), with the root, the weakest kept, copied to roots[j]: units
   side by side, so the common case, a row that does not beat it, reads one contiguous array. */
static void heap_offer(int64_t *restrict keys, int32_t *restrict pos, int64_t *restrict roots, int64_t j,
                       int64_t size, int64_t cap, int64_t key, int32_t position) {
    if (cap == 0 || (size >= cap && key <= roots[j])) return;
    keys += j * cap;
    pos += j * cap;
    int64_t i;
    if (size < cap) {
        i = size;
        while (i > 0) {
            const int64_t parent = (i - 1) / 2;
            if (keys[parent] <= key) break;
            keys[i] = keys[parent];
            pos[i] = pos[parent];
            i = parent;
        }
    } else {
        i = 0;
        for (;;) {  /* which child is smaller is a coin toss: chosen without a branch */
            const int64_t left = 2 * i + 1, right = left + 1;
            if (left >= cap) break;
            const int64_t key_left = keys[left], key_right = right < cap ? keys[right] : INT64_MAX;
            const int take_right = key_right < key_left;
            const int64_t child = left + take_right, smaller = take_right ? key_right : key_left;
            if (smaller >= key) break;
            keys[i] = smaller;
            pos[i] = pos[child];
            i = child;
        }
    }
    keys[i] = key;
    pos[i] = position;
    roots[j] = keys[0];
}

/* The batch and where its records go: every unit's running records, each row's context. */
typedef struct {
    const float *x;
    const int64_t *lengths, *contexts;
    int64_t rows, T, n, count, seen, top_cap, bottom_cap;
    float threshold;
    double *mean, *m2, *m3, *m4;
    int64_t *n_positive, *n_active;
    float *vmin, *vmax;
    int32_t *hist;
    int64_t *top_keys, *bottom_keys, *top_roots, *bottom_roots;
    int32_t *top_pos, *bottom_pos;
    double *row_mean_out;   /* [rows, n], or NULL without labels */
    int32_t *row_positive_out;
    int scatter_histogram;  /* count bins with AVX-512's gather and scatter (records_can_scatter) */
} Batch;

static inline void store_pair(double *out, vd lo, vd hi) {
    memcpy(out, &lo, sizeof lo);
    memcpy(out + HALF_LANES, &hi, sizeof hi);
}

static inline vd load_half(const double *in) {
    vd v;
    memcpy(&v, in, sizeof v);
    return v;
}

/* A thread's running sums over the batch so far, padded to whole cache lines, one slot per unit
   of its range: the sums of powers of each value's deviation from a shift (the unit's running mean, or its
   first value in a shard's first batch, so the central moments that follow lose little to
   cancellation), counts of tokens > 0 and with |x| > threshold, the extremes; and each row's
   extremes and their positions, [rows, slots], offered to the kept contexts at the batch's end. */
typedef struct {
    double *shift, *s, *c2, *c3, *c4;
    int32_t *positive, *active;
    float *high, *low;
    float *row_high, *row_low;
    int32_t *row_at_high, *row_at_low;
    int64_t slots;
} Sums;

/* Units [j, j + width) of one row of L tokens, j0 being the thread's first unit (width <= LANES;
   below LANES only at the end of a thread's range, where lanes past width read zeros and are
   dropped). All a token updates lives in registers for the row but the histograms, whose
   LANES rows stay in L1. Rows go outer and blocks inner so that the few pages a row spans
   stay in the TLB (one block down a whole batch would touch a new page at every token). */
static void block_of_row(const Batch *b, const Sums *sums, int64_t row, int64_t L, int64_t j, int64_t j0,
                         int64_t width) {
    const int64_t n = b->n, o = j - j0;
    const int full = width == LANES;
    const vf zero = {0}, threshold = zero + b->threshold;
    vi lane;
    for (int k = 0; k < LANES; k++) lane[k] = k * BINS;
    const vd shift_lo = load_half(sums->shift + o), shift_hi = load_half(sums->shift + o + HALF_LANES);
    vd s_lo = {0}, s_hi = {0};
    vd c2_lo = load_half(sums->c2 + o), c2_hi = load_half(sums->c2 + o + HALF_LANES);
    vd c3_lo = load_half(sums->c3 + o), c3_hi = load_half(sums->c3 + o + HALF_LANES);
    vd c4_lo = load_half(sums->c4 + o), c4_hi = load_half(sums->c4 + o + HALF_LANES);
    vi positive = {0}, active;
    memcpy(&active, sums->active + o, sizeof active);
    const float *base = b->x + row * b->T * n + j;
    const vf first = full ? load_block(base, LANES) : load_block(base, width);
    vf high = first, low = first;
    vi at_high = {0}, at_low = {0};
    int32_t *h = b->hist + j * BINS;
    for (int64_t t = 0; t < L; t++) {
        const float *p = base + t * n;
        const vf v = full ? load_block(p, LANES) : load_block(p, width);
        __builtin_prefetch(p + 2 * LINE);  /* a block steps down the row a page apart: no hardware prefetch */
        const vi position = lane - lane + (int32_t)t;
        const vi up = v > high, down = v < low;
        high = select_f(up, v, high);
        at_high = select_i(up, position, at_high);
        low = select_f(down, v, low);
        at_low = select_i(down, position, at_low);
        positive -= v > zero;  /* a true comparison is all ones: -1 */
        active -= (vf)((vi)v & 0x7fffffff) > threshold;
        const vi index = bins_of(v) + lane;
#if defined(__AVX512F__) && LANES == 16
        if (b->scatter_histogram) {
            /* The sixteen lanes are sixteen units, so their bins never collide: one gather and
               one scatter instead of sixteen lane extractions and increments. */
            const __mmask16 live = full ? (__mmask16)0xffff : (__mmask16)((1u << width) - 1);
            const __m512i at = (__m512i)index;
            const __m512i counts = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, at, h, 4);
            _mm512_mask_i32scatter_epi32(h, live, at, _mm512_add_epi32(counts, _mm512_set1_epi32(1)), 4);
        } else
#endif
        if (full) {  /* a constant count: unrolled, without a test per lane */
            for (int k = 0; k < LANES; k++) h[index[k]] += 1;
        } else {
            for (int k = 0; k < width; k++) h[index[k]] += 1;
        }
        const float *lanes = (const float *)&v;
        const vd d_lo = widen(lanes) - shift_lo, d_hi = widen(lanes + HALF_LANES) - shift_hi;
        const vd e_lo = d_lo * d_lo, e_hi = d_hi * d_hi;
        s_lo += d_lo; s_hi += d_hi;
        c2_lo += e_lo; c2_hi += e_hi;
        c3_lo += e_lo * d_lo; c3_hi += e_hi * d_hi;
        c4_lo += e_lo * e_lo; c4_hi += e_hi * e_hi;
    }
    if (b->row_mean_out != NULL) {  /* per-context results for the labels stage */
        double row_sum[LANES];
        store_pair(row_sum, s_lo, s_hi);
        for (int k = 0; k < width; k++) {
            b->row_mean_out[row * n + j + k] = sums->shift[o + k] + row_sum[k] / (double)L;
            b->row_positive_out[row * n + j + k] = positive[k];
        }
    }
    store_pair(sums->s + o, s_lo + load_half(sums->s + o), s_hi + load_half(sums->s + o + HALF_LANES));
    store_pair(sums->c2 + o, c2_lo, c2_hi);
    store_pair(sums->c3 + o, c3_lo, c3_hi);
    store_pair(sums->c4 + o, c4_lo, c4_hi);
    vi total;
    memcpy(&total, sums->positive + o, sizeof total);
    total += positive;
    memcpy(sums->positive + o, &total, sizeof total);
    memcpy(sums->active + o, &active, sizeof active);
    vf batch_high, batch_low;
    memcpy(&batch_high, sums->high + o, sizeof batch_high);
    memcpy(&batch_low, sums->low + o, sizeof batch_low);
    batch_high = select_f(high > batch_high, high, batch_high);
    batch_low = select_f(low < batch_low, low, batch_low);
    memcpy(sums->high + o, &batch_high, sizeof batch_high);
    memcpy(sums->low + o, &batch_low, sizeof batch_low);
    const int64_t at = row * sums->slots + o;  /* lanes past width are never read */
    memcpy(sums->row_high + at, &high, sizeof high);
    memcpy(sums->row_low + at, &low, sizeof low);
    memcpy(sums->row_at_high + at, &at_high, sizeof at_high);
    memcpy(sums->row_at_low + at, &at_low, sizeof at_low);
}

/* Each unit's rows of the batch, in order, to its kept contexts: a row is offered as the
   `seen`-th context of the shard, as it would be row by row. */
static void offer_rows(const Batch *b, const Sums *sums, int64_t j0, int64_t j1, int64_t first_row) {
    for (int64_t u = j0; u < j1; u++) {
        const int64_t o = u - j0;
        for (int64_t row = first_row; row < b->rows; row++) {
            if (b->lengths[row] <= 0) continue;
            const int64_t at = row * sums->slots + o, context = b->contexts[row], seen = b->seen + row;
            heap_offer(b->top_keys, b->top_pos, b->top_roots, u, seen, b->top_cap,
                       order_key(sums->row_high[at], context), sums->row_at_high[at]);
            heap_offer(b->bottom_keys, b->bottom_pos, b->bottom_roots, u, seen, b->bottom_cap,
                       order_key(-sums->row_low[at], context), sums->row_at_low[at]);
        }
    }
}

/* The batch's sums to its mean and central sums, then Pebay's pairwise update of the running
   records (merge_moments in reductions.py spells out the formulas). */
static void merge_batch(const Batch *b, const Sums *sums, int64_t j0, int64_t j1, int64_t tokens) {
    const double na = (double)b->count, nb = (double)tokens, nn = na + nb, inv = 1.0 / nb;
    for (int64_t u = j0; u < j1; u++) {
        const int64_t o = u - j0;
        const double m1 = sums->s[o] * inv, r2 = sums->c2[o] * inv, r3 = sums->c3[o] * inv, r4 = sums->c4[o] * inv;
        const double m1s = m1 * m1;
        const double b4 = (r4 - 4.0 * m1 * r3 + 6.0 * m1s * r2 - 3.0 * m1s * m1s) * nb;
        const double b3 = (r3 - 3.0 * m1 * r2 + 2.0 * m1s * m1) * nb;
        const double b2 = (r2 - m1s) * nb;
        const double delta = sums->shift[o] + m1 - b->mean[u], d2 = delta * delta;
        const double a2 = b->m2[u], a3 = b->m3[u];
        b->m4[u] += b4 + d2 * d2 * na * nb * (na * na - na * nb + nb * nb) / (nn * nn * nn)
                    + 6.0 * d2 * (na * na * b2 + nb * nb * a2) / (nn * nn) + 4.0 * delta * (na * b3 - nb * a3) / nn;
        b->m3[u] += b3 + d2 * delta * na * nb * (na - nb) / (nn * nn) + 3.0 * delta * (na * b2 - nb * a2) / nn;
        b->m2[u] += b2 + d2 * na * nb / nn;
        b->mean[u] += delta * nb / nn;
        b->n_positive[u] += sums->positive[o];
        b->n_active[u] += sums->active[o];
        if (sums->high[o] > b->vmax[u]) b->vmax[u] = sums->high[o];
        if (sums->low[o] < b->vmin[u]) b->vmin[u] = sums->low[o];
    }
}

/* Units [j0, j1) over the whole batch; 0, or -1 where the sums' memory was refused. */
static int range_of_batch(const Batch *b, int64_t j0, int64_t j1) {
    int64_t first_row = 0, tokens = 0;
    while (first_row < b->rows && b->lengths[first_row] <= 0) first_row++;
    if (j0 >= j1 || first_row == b->rows) return 0;
    const int64_t slots = (j1 - j0 + LINE - 1) / LINE * LINE;
    /* One zeroed block: five doubles, two int32 and two floats per slot, doubles first; and the
       rows' extremes, two floats and two int32 per row and slot, each written before it is read. */
    double *doubles = calloc((size_t)slots, 5 * sizeof(double) + 2 * sizeof(int32_t) + 2 * sizeof(float));
    float *per_row = malloc((size_t)(b->rows * slots) * (2 * sizeof(float) + 2 * sizeof(int32_t)));
    if (doubles == NULL || per_row == NULL) {
        free(doubles);
        free(per_row);
        return -1;
    }
    int32_t *ints = (int32_t *)(doubles + 5 * slots);
    float *floats = (float *)(ints + 2 * slots);
    int32_t *per_row_at = (int32_t *)(per_row + 2 * b->rows * slots);
    const Sums sums = {doubles, doubles + slots, doubles + 2 * slots, doubles + 3 * slots, doubles + 4 * slots,
                       ints, ints + slots, floats, floats + slots, per_row, per_row + b->rows * slots,
                       per_row_at, per_row_at + b->rows * slots, slots};
    for (int64_t o = 0; o < slots; o++) {
        const int64_t u = j0 + o < j1 ? j0 + o : j1 - 1;
        sums.shift[o] = b->count > 0 ? b->mean[u] : (double)b->x[first_row * b->T * b->n + u];
        sums.high[o] = -INFINITY;
        sums.low[o] = INFINITY;
    }
    for (int64_t row = first_row; row < b->rows; row++) {
        const int64_t L = b->lengths[row];
        if (L <= 0) continue;
        for (int64_t j = j0; j < j1; j += LANES) block_of_row(b, &sums, row, L, j, j0, j1 - j < LANES ? j1 - j : LANES);
        tokens += L;
    }
    merge_batch(b, &sums, j0, j1, tokens);
    offer_rows(b, &sums, j0, j1, first_row);
    free(doubles);
    free(per_row);
    return 0;
}

/* The whole batch, every unit: on OpenMP's threads where the kernel was built with it (the
   runtime torch has loaded, so the work goes to the threads its matrix products just used,
   instead of competing with them while they spin), each taking whole cache lines of units.
   Returns how many threads were refused memory for their sums (tens of kB, and 16 bytes per row
   and unit of their range for the rows' extremes): 0, normally. */
int records_reduce(const float *x, int64_t rows, int64_t T, int64_t n, const int64_t *lengths,
                    int64_t count_before, float threshold,
                    double *mean, double *m2, double *m3, double *m4,
                    int64_t *n_positive, int64_t *n_active, float *vmin, float *vmax, int32_t *hist,
                    const int64_t *contexts, int64_t rows_before,
                    int64_t *top_keys, int32_t *top_pos, int64_t *top_roots, int64_t top_cap,
                    int64_t *bottom_keys, int32_t *bottom_pos, int64_t *bottom_roots, int64_t bottom_cap,
                    double *row_mean_out, int32_t *row_positive_out, int scatter_histogram) {
    const Batch batch = {x, lengths, contexts, rows, T, n, count_before, rows_before, top_cap, bottom_cap,
                         threshold, mean, m2, m3, m4, n_positive, n_active, vmin, vmax, hist,
                         top_keys, bottom_keys, top_roots, bottom_roots, top_pos, bottom_pos,
                         row_mean_out, row_positive_out, scatter_histogram};
    int failed = 0;
#pragma omp parallel
    {
        int64_t j0, j1;
        units_of_thread(n, &j0, &j1);
        if (range_of_batch(&batch, j0, j1) != 0) {
#pragma omp atomic
            failed++;
        }
    }
    return failed;
}

/* Whether this build can count the histograms by gather and scatter (an AVX-512 build). */
int records_can_scatter(void) {
#if defined(__AVX512F__) && LANES == 16
    return 1;
#else
    return 0;
#endif
}
