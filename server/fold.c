/* Streaming folds on OpenBLAS; see fold.h. Runs on thread-pool workers. */
#include "fold.h"

#include <cblas.h>
#include <limits.h>

/* cblas takes int lengths; models past 2^31 floats are folded in pieces. */
void fold_accumulate(float *acc, const float *delta, size_t n, float w)
{
    while (n > 0) {
        int k = n > (size_t)INT_MAX ? INT_MAX : (int)n;
        cblas_saxpy(k, w, delta, 1, acc, 1);
        acc += k;
        delta += k;
        n -= (size_t)k;
    }
}

void fold_apply(float *x, const float *acc, size_t n, float scale)
{
    fold_accumulate(x, acc, n, scale);
}
