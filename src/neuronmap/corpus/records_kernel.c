/* Per-unit records of one site's activations, one pass per row of a batch (neuronmap.corpus.native).

   x is a right-padded batch [rows, T, n] of float32; row r holds lengths[r] valid tokens (0 for a
   filler row). Each call handles the units [j0, j1), so threads split a batch by columns and never
   write the same memory. Per row: its maximum and minimum per unit with their positions; its
   central moments (two passes over the row, which stays in cache), merged into the running ones
   with Pebay's pairwise formulas; the tokens > 0 and with |x| > threshold; and one count per token
   in the unit's histogram bin (layout in histogram.py, kept in step with the macros below). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define SUB_BITS 3
#define MIN_EXPONENT (-8)
#define OCTAVES 20
#define HALF (OCTAVES << SUB_BITS)
#define BINS (2 * HALF + 1)
#define BLOCK 16

static inline int32_t bin_of(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    /* Branch-free: signs are a coin toss, and a mispredicted branch costs more than the rest. */
    int32_t code = (int32_t)((u & 0x7fffffffu) >> (23 - SUB_BITS)) - ((127 + MIN_EXPONENT) << SUB_BITS);
    code = code < HALF ? code : HALF - 1;
    const int32_t signed_bin = (u >> 31) ? HALF - 1 - code : HALF + 1 + code;
    return code < 0 ? HALF : signed_bin;
}

int records_bins(void) { return BINS; }

void records_bins_of(const float *x, int64_t count, int32_t *out) {
    for (int64_t i = 0; i < count; i++) out[i] = bin_of(x[i]);
}

/* Keys that order by value, then by lower context id: the float made monotone in the high 32
   bits, the complement of the context id in the low 32 (reductions.order_key does the same). */
static inline int64_t order_key(float v, int64_t context) {
    int32_t bits;
    memcpy(&bits, &v, sizeof bits);
    const int64_t monotone = bits < 0 ? (int64_t)(bits ^ 0x7fffffff) : (int64_t)bits;
    return (int64_t)((uint64_t)monotone << 32) | (int64_t)(0xffffffffLL - context);
}

/* A unit's best `cap` keys as a min-heap down column j of [cap, n] arrays: the root is the
   weakest kept, so a row that does not beat it costs one comparison. */
static void heap_offer(int64_t *keys, int32_t *pos, int64_t n, int64_t j, int64_t size, int64_t cap,
                       int64_t key, int32_t position) {
    int64_t i;
    if (size < cap) {
        i = size;
        while (i > 0) {
            const int64_t parent = (i - 1) / 2;
            if (keys[parent * n + j] <= key) break;
            keys[i * n + j] = keys[parent * n + j];
            pos[i * n + j] = pos[parent * n + j];
            i = parent;
        }
    } else {
        if (cap == 0 || key <= keys[j]) return;
        i = 0;
        for (;;) {
            const int64_t left = 2 * i + 1, right = left + 1;
            int64_t child = left;
            if (left >= cap) break;
            if (right < cap && keys[right * n + j] < keys[left * n + j]) child = right;
            if (keys[child * n + j] >= key) break;
            keys[i * n + j] = keys[child * n + j];
            pos[i * n + j] = pos[child * n + j];
            i = child;
        }
    }
    keys[i * n + j] = key;
    pos[i * n + j] = position;
}

/* One pass over a row for the units of one thread: extremes and their first positions, firing
   counts, and the sums of the first four powers of each value's deviation from the row's first
   value (a shift inside the data, so the central moments that follow lose little to cancellation).
   restrict lets the compiler vectorize across units. */
static void row_moments(const float *restrict row, int64_t L, int64_t n, int64_t w, float threshold,
                        double *restrict s, double *restrict c2, double *restrict c3, double *restrict c4,
                        double *restrict shift,
                        int32_t *restrict pos, int32_t *restrict act,
                        float *restrict mx, int32_t *restrict ax, float *restrict mn, int32_t *restrict an) {
    for (int64_t j = 0; j < w; j++) {
        s[j] = 0.0; c2[j] = 0.0; c3[j] = 0.0; c4[j] = 0.0; pos[j] = 0; act[j] = 0;
        mx[j] = row[j]; mn[j] = row[j]; ax[j] = 0; an[j] = 0; shift[j] = (double)row[j];
    }
    /* Two loops over the row (it stays in cache): float and int32 lanes, then float64 lanes;
       one loop mixing them does not vectorize. */
    for (int64_t t = 0; t < L; t++) {
        const float *p = row + t * n;
        const int32_t position = (int32_t)t;
        for (int64_t j = 0; j < w; j++) {
            const float v = p[j];
            const float high = mx[j], low = mn[j];
            const int32_t at_high = ax[j], at_low = an[j];
            mx[j] = v > high ? v : high;
            ax[j] = v > high ? position : at_high;
            mn[j] = v < low ? v : low;
            an[j] = v < low ? position : at_low;
        }
    }
    for (int64_t t = 0; t < L; t++) {
        const float *p = row + t * n;
        for (int64_t j = 0; j < w; j++) {
            const int32_t above = p[j] > 0.0f, outside = fabsf(p[j]) > threshold;
            pos[j] += above;
            act[j] += outside;
        }
    }
    for (int64_t t = 1; t < L; t++) {
        const float *p = row + t * n;
        for (int64_t j = 0; j < w; j++) {
            const double d = (double)p[j] - shift[j], d2 = d * d;
            s[j] += d;
            c2[j] += d2;
            c3[j] += d2 * d;
            c4[j] += d2 * d2;
        }
    }
    /* Raw sums about the shift to central sums about the row's mean (s becomes the mean). */
    const double inv = 1.0 / (double)L;
    for (int64_t j = 0; j < w; j++) {
        const double m1 = s[j] * inv, r2 = c2[j] * inv, r3 = c3[j] * inv, r4 = c4[j] * inv;
        const double m1s = m1 * m1;
        c4[j] = (r4 - 4.0 * m1 * r3 + 6.0 * m1s * r2 - 3.0 * m1s * m1s) * (double)L;
        c3[j] = (r3 - 3.0 * m1 * r2 + 2.0 * m1s * m1) * (double)L;
        c2[j] = (r2 - m1s) * (double)L;
        s[j] = shift[j] + m1;
    }
}

void records_reduce(const float *x, int64_t rows, int64_t T, int64_t n, const int64_t *lengths,
                    int64_t j0, int64_t j1, int64_t count_before, float threshold,
                    double *mean, double *m2, double *m3, double *m4,
                    int64_t *n_positive, int64_t *n_active, float *vmin, float *vmax, int32_t *hist,
                    float *row_max, int32_t *row_argmax, float *row_min, int32_t *row_argmin,
                    double *scratch, const int64_t *contexts, int64_t rows_before,
                    int64_t *top_keys, int32_t *top_pos, int64_t top_cap,
                    int64_t *bottom_keys, int32_t *bottom_pos, int64_t bottom_cap,
                    double *row_mean_out, int32_t *row_positive_out) {
    const int64_t w = j1 - j0;
    int64_t seen = rows_before;
    double *s = scratch, *c2 = scratch + w, *c3 = scratch + 2 * w, *c4 = scratch + 3 * w;
    double *shift = scratch + 4 * w;
    int32_t *pos = (int32_t *)(scratch + 5 * w), *act = pos + w;
    double count = (double)count_before;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t L = lengths[r];
        if (L <= 0) continue;
        const float *row = x + r * T * n + j0;
        float *mx = row_max + r * n + j0, *mn = row_min + r * n + j0;
        int32_t *ax = row_argmax + r * n + j0, *an = row_argmin + r * n + j0;
        row_moments(row, L, n, w, threshold, s, c2, c3, c4, shift, pos, act, mx, ax, mn, an);
        /* Sixteen units at a time (one cache line of x): their histograms stay in L1. */
        for (int64_t jb = 0; jb < w; jb += BLOCK) {
            const int64_t width = w - jb < BLOCK ? w - jb : BLOCK;
            int32_t *h = hist + (j0 + jb) * BINS;
            int32_t index[BLOCK];
            for (int64_t t = 0; t < L; t++) {
                const float *restrict p = row + t * n + jb;
                for (int64_t k = 0; k < BLOCK; k++) index[k] = (int32_t)k * BINS + bin_of(k < width ? p[k] : 0.0f);
                for (int64_t k = 0; k < width; k++) h[index[k]] += 1;
            }
        }
        const double na = count, nb = (double)L, nn = na + nb;
        for (int64_t j = 0; j < w; j++) {
            const int64_t u = j0 + j;
            const double delta = s[j] - mean[u], d2 = delta * delta;
            const double a2 = m2[u], a3 = m3[u];
            m4[u] += c4[j] + d2 * d2 * na * nb * (na * na - na * nb + nb * nb) / (nn * nn * nn)
                     + 6.0 * d2 * (na * na * c2[j] + nb * nb * a2) / (nn * nn)
                     + 4.0 * delta * (na * c3[j] - nb * a3) / nn;
            m3[u] += c3[j] + d2 * delta * na * nb * (na - nb) / (nn * nn) + 3.0 * delta * (na * c2[j] - nb * a2) / nn;
            m2[u] += c2[j] + d2 * na * nb / nn;
            mean[u] += delta * nb / nn;
            n_positive[u] += pos[j];
            n_active[u] += act[j];
            if (mx[j] > vmax[u]) vmax[u] = mx[j];
            if (mn[j] < vmin[u]) vmin[u] = mn[j];
            heap_offer(top_keys, top_pos, n, u, seen, top_cap, order_key(mx[j], contexts[r]), ax[j]);
            heap_offer(bottom_keys, bottom_pos, n, u, seen, bottom_cap, order_key(-mn[j], contexts[r]), an[j]);
        }
        /* Per-context results for the labels stage (NULL without labels): each context's mean
           response and its tokens > 0. */
        if (row_mean_out != NULL) {
            for (int64_t j = 0; j < w; j++) {
                row_mean_out[r * n + j0 + j] = s[j];
                row_positive_out[r * n + j0 + j] = pos[j];
            }
        }
        count = nn;
        seen++;
    }
}
