/*
 * Small deterministic PRNG (xoshiro256** seeded with splitmix64). Header-only so
 * the simulator, the trainer and the participation samplers draw identical
 * streams from identical seeds on every platform. Not for cryptography.
 */
#ifndef COH_RNG_H
#define COH_RNG_H

#include <math.h>
#include <stdint.h>

struct coh_rng {
    uint64_t s[4];
};

static inline uint64_t coh_splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline void coh_rng_seed(struct coh_rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = coh_splitmix64(&x);
}

static inline uint64_t coh_rng_rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static inline uint64_t coh_rng_next(struct coh_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = coh_rng_rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = coh_rng_rotl(s[3], 45);
    return result;
}

/* Uniform double in [0, 1). */
static inline double coh_rng_uniform(struct coh_rng *r)
{
    return (double)(coh_rng_next(r) >> 11) * 0x1.0p-53;
}

/* Uniform integer in [0, n); n > 0. Lemire's multiply-shift, bias < 2^-32 for n < 2^32. */
static inline uint64_t coh_rng_below(struct coh_rng *r, uint64_t n)
{
#ifdef __SIZEOF_INT128__
    __extension__ typedef unsigned __int128 u128;
    return (uint64_t)(((u128)coh_rng_next(r) * n) >> 64);
#else
    /* 32-bit targets (armhf) have no 128-bit integer: the same high 64 bits of
     * the product, from four 32x32-bit partial products. */
    uint64_t x = coh_rng_next(r);
    uint64_t xl = (uint32_t)x, xh = x >> 32, nl = (uint32_t)n, nh = n >> 32;
    uint64_t lh = xl * nh, hl = xh * nl;
    uint64_t mid = ((xl * nl) >> 32) + (uint32_t)lh + (uint32_t)hl;
    return xh * nh + (lh >> 32) + (hl >> 32) + (mid >> 32);
#endif
}

/* Standard normal (Box-Muller; one value per call, the pair's second is dropped). */
static inline double coh_rng_normal(struct coh_rng *r)
{
    double u1 = coh_rng_uniform(r);
    double u2 = coh_rng_uniform(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* Gamma(shape, 1) by Marsaglia-Tsang; shape > 0. */
static inline double coh_rng_gamma(struct coh_rng *r, double shape)
{
    if (shape < 1.0) {
        double u = coh_rng_uniform(r);
        if (u < 1e-300)
            u = 1e-300;
        return coh_rng_gamma(r, shape + 1.0) * pow(u, 1.0 / shape);
    }
    double d = shape - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x, v;
        do {
            x = coh_rng_normal(r);
            v = 1.0 + c * x;
        } while (v <= 0.0);
        v = v * v * v;
        double u = coh_rng_uniform(r);
        if (u < 1.0 - 0.0331 * x * x * x * x)
            return d * v;
        if (log(u) < 0.5 * x * x + d * (1.0 - v + log(v)))
            return d * v;
    }
}

/* Fills out[0..k) with a Dirichlet(alpha, ..., alpha) draw. */
static inline void coh_rng_dirichlet(struct coh_rng *r, double alpha, double *out, int k)
{
    double sum = 0.0;
    for (int i = 0; i < k; i++) {
        out[i] = coh_rng_gamma(r, alpha);
        sum += out[i];
    }
    if (sum <= 0.0) {
        for (int i = 0; i < k; i++)
            out[i] = 1.0 / k;
        return;
    }
    for (int i = 0; i < k; i++)
        out[i] /= sum;
}

#endif
