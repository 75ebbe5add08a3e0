/* Sixteen units at a time: one cache line of float32, one AVX-512 register. GCC's and Clang's
   vector types lower these to whatever the CPU has (AVX2, NEON). Shared by neuronmap's C
   kernels (model/native.py builds them; a change here reruns what uses them). */
#ifndef NEURONMAP_VECTOR_BLOCKS_H
#define NEURONMAP_VECTOR_BLOCKS_H
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 16

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef double vd __attribute__((vector_size(64)));

static inline vi select_i(vi mask, vi a, vi b) { return (a & mask) | (b & ~mask); }
static inline vf select_f(vi mask, vf a, vf b) { return (vf)select_i(mask, (vi)a, (vi)b); }

/* The first width (<= BLOCK) floats at p; lanes past width are zero. */
static inline vf load_block(const float *p, int64_t width) {
    vf v = {0};
    memcpy(&v, p, (size_t)width * sizeof(float));
    return v;
}

/* Eight floats widened to doubles: moments are summed in float64. */
static inline vd widen(const float *half) {
    vf8 v;
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
    const int64_t step = ((n + threads - 1) / threads + BLOCK - 1) / BLOCK * BLOCK;
    *j0 = me * step < n ? me * step : n;
    *j1 = *j0 + step < n ? *j0 + step : n;
}
#endif
