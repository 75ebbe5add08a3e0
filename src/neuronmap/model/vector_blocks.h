/* Units a vector register at a time: LANES float32, sixteen on AVX-512, eight on AVX, four
   elsewhere (SSE, NEON). GCC's and Clang's vector types lower a wider vector than the CPU has to
   several registers, and a kernel's dozen live vectors then spill to the stack: with sixteen
   lanes on an AVX2 machine the statistics kernel ran 4.5 times and the records kernel 6 times
   slower than with eight. Threads still split the units in whole cache lines (LINE).
   Shared by neuronmap's C kernels (model/native.py builds them; a change here reruns what uses
   them). */
#ifndef NEURONMAP_VECTOR_BLOCKS_H
#define NEURONMAP_VECTOR_BLOCKS_H
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef LANES
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
#endif
#define HALF_LANES (LANES / 2)
#define LINE 16  /* float32 units per 64-byte cache line */

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef float vf_half __attribute__((vector_size(LANES * 2)));
typedef double vd __attribute__((vector_size(LANES * 4)));  /* HALF_LANES doubles: one register */

static inline vi select_i(vi mask, vi a, vi b) { return (a & mask) | (b & ~mask); }
static inline vf select_f(vi mask, vf a, vf b) { return (vf)select_i(mask, (vi)a, (vi)b); }

/* The first width (<= LANES) floats at p; lanes past width are zero. */
static inline vf load_block(const float *p, int64_t width) {
    vf v = {0};
    memcpy(&v, p, (size_t)width * sizeof(float));
    return v;
}

/* HALF_LANES floats widened to doubles: moments are summed in float64. */
static inline vd widen(const float *half) {
    vf_half v;
    memcpy(&v, half, sizeof v);
    return __builtin_convertvector(v, vd);
}

/* This thread's units [*j0, *j1) of n, inside a parallel region: whole cache lines per thread,
   so threads never write the same memory. */
static inline void units_of_thread(int64_t n, int64_t *j0, int64_t *j1) {
#ifdef _OPENMP
    const int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
#else
    const int64_t threads = 1, me = 0;
#endif
    const int64_t step = ((n + threads - 1) / threads + LINE - 1) / LINE * LINE;
    *j0 = me * step < n ? me * step : n;
    *j1 = *j0 + step < n ? *j0 + step : n;
}
#endif
