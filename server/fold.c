/* Streaming folds on OpenBLAS; see fold.h. Runs on thread-pool workers. */
#include "fold.h"

#include "model.h"

#include <cblas.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

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

/* Two BLAS passes per block of 16 Ki floats (64 KiB): the second finds the
 * block in L1/L2, so this costs one pass over memory, not two. */
#define FOLD_BLOCK ((size_t)16384)

void fold_set(float *acc, const float *delta, size_t n, float w)
{
    for (size_t i = 0; i < n; i += FOLD_BLOCK) {
        int k = (int)(n - i < FOLD_BLOCK ? n - i : FOLD_BLOCK);
        cblas_scopy(k, delta + i, 1, acc + i, 1);
        cblas_sscal(k, w, acc + i, 1);
    }
}

void fold_apply_into(float *acc, const float *x, size_t n, float scale)
{
    for (size_t i = 0; i < n; i += FOLD_BLOCK) {
        int k = (int)(n - i < FOLD_BLOCK ? n - i : FOLD_BLOCK);
        cblas_sscal(k, scale, acc + i, 1);
        cblas_saxpy(k, 1.0f, x + i, 1, acc + i, 1);
    }
}

uint32_t fold_weights_to_delta(float *u, const float *x, size_t n)
{
    uint32_t mx = 0;
    for (size_t i = 0; i < n; i += FOLD_BLOCK) {
        int k = (int)(n - i < FOLD_BLOCK ? n - i : FOLD_BLOCK);
        cblas_saxpy(k, -1.0f, x + i, 1, u + i, 1);
        uint32_t b = coh_abs_bound_bits(u + i, (size_t)k); /* the block is in cache */
        mx = b > mx ? b : mx;
    }
    return mx;
}

/* Blocks of 64 are tested with integer compares on the exponent bits and an
 * OR (vectorized at -O2, like coh_first_nonfinite); a block with a bad value is
 * searched element by element. */
#define OVF_BLOCK 64

static int block_bad(const float *v)
{
    uint32_t bits[OVF_BLOCK], bad = 0;
    memcpy(bits, v, sizeof bits);
    for (int k = 0; k < OVF_BLOCK; k++)
        bad |= (uint32_t)((bits[k] & 0x7f800000u) == 0x7f800000u);
    return bad != 0;
}

size_t fold_first_overflow(const float *acc, const float *delta, size_t n, float w, int first)
{
    float v[OVF_BLOCK];
    size_t i = 0;
    for (; i + OVF_BLOCK <= n; i += OVF_BLOCK) {
        if (first)
            for (int k = 0; k < OVF_BLOCK; k++)
                v[k] = w * delta[i + k];
        else
            for (int k = 0; k < OVF_BLOCK; k++)
                v[k] = acc[i + k] + w * delta[i + k];
        if (block_bad(v))
            break;
    }
    for (; i < n; i++) {
        float x = first ? w * delta[i] : acc[i] + w * delta[i];
        if (!isfinite(x))
            return i;
    }
    return n;
}

/* Half of FLT_MAX: far from where rounding could matter. */
#define FOLD_SAFE ((double)FLT_MAX / 2)

size_t fold_checked(float *acc, const float *delta, size_t n, float w, int first,
                    uint32_t dmax_bits, double *bound)
{
    double b = INFINITY;
    if (dmax_bits < COH_NONFINITE_BITS) {
        float dmax;
        memcpy(&dmax, &dmax_bits, sizeof dmax);
        /* Each element is within (A + |w| D)(1 + u)^2, u = 2^-24: one rounding
         * of the product, one of the sum (none more with an FMA). */
        b = ((first ? 0.0 : *bound) + fabs((double)w) * (double)dmax) * (1.0 + 1e-6);
        if (!(b <= FOLD_SAFE))
            b = INFINITY;
    }
    if (isinf(b)) {
        size_t bad = fold_first_overflow(acc, delta, n, w, first);
        if (bad < n)
            return bad;
    }
    if (first)
        fold_set(acc, delta, n, w);
    else
        fold_accumulate(acc, delta, n, w);
    *bound = b;
    return n;
}
