/* Reference loops for bench_fold (ref_loops.c). Any thread. */
#ifndef COH_BENCH_REF_LOOPS_H
#define COH_BENCH_REF_LOOPS_H

#include <stddef.h>

/* y += a * x */
void ref_axpy(float *restrict y, const float *restrict x, size_t n, float a);
/* a = b + s * c (STREAM triad) */
void ref_triad(float *restrict a, const float *restrict b, const float *restrict c, size_t n,
               float s);

#endif
