/*
 * The same-run memory-speed references for bench_fold: plain C loops, built
 * with -O3 (bench/meson.build) so the compiler vectorizes them as well as it
 * can without -march. Nothing here is used by cohortd.
 */
#include "ref_loops.h"

void ref_axpy(float *restrict y, const float *restrict x, size_t n, float a)
{
    for (size_t i = 0; i < n; i++)
        y[i] += a * x[i];
}

void ref_triad(float *restrict a, const float *restrict b, const float *restrict c, size_t n,
               float s)
{
    for (size_t i = 0; i < n; i++)
        a[i] = b[i] + s * c[i];
}
