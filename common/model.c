/* Model tensor tables; see model.h. */
#include "model.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cohort_err.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

void coh_model_init(struct coh_model *m)
{
    memset(m, 0, sizeof *m);
}

void coh_model_fini(struct coh_model *m)
{
    for (size_t i = 0; i < m->ntensors; i++)
        free(m->tensors[i].name);
    free(m->tensors);
    if (!m->borrowed)
        free(m->data);
    memset(m, 0, sizeof *m);
}

int coh_model_add(struct coh_model *m, const char *name, int ndim, const uint64_t *shape)
{
    size_t nlen = strlen(name);
    if (nlen == 0 || nlen > COH_MAX_NAME || ndim < 0 || ndim > COH_MAX_DIMS)
        return COHORT_EINVAL;
    if (coh_model_find(m, name))
        return COHORT_EINVAL;
    uint64_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] != 0 && numel > (UINT64_MAX / 8) / shape[d])
            return COHORT_ETOOBIG;
        numel *= shape[d];
    }
    /* Keep byte counts representable in size_t and away from overflow. */
    if (numel > (SIZE_MAX / 8) || m->numel + numel > (SIZE_MAX / 8))
        return COHORT_ETOOBIG;
    struct coh_tensor *nt = realloc(m->tensors, (m->ntensors + 1) * sizeof *nt);
    if (!nt)
        return COHORT_ENOMEM;
    m->tensors = nt;
    struct coh_tensor *t = &m->tensors[m->ntensors];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    if (!t->name)
        return COHORT_ENOMEM;
    t->ndim = ndim;
    for (int d = 0; d < ndim; d++)
        t->shape[d] = shape[d];
    t->offset = m->numel;
    t->numel = (size_t)numel;
    m->numel += (size_t)numel;
    m->ntensors++;
    return 0;
}

int coh_model_alloc(struct coh_model *m)
{
    free(m->data);
    m->data = NULL;
    size_t bytes = m->numel * sizeof(float);
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded == 0)
        rounded = 64;
    m->data = aligned_alloc(64, rounded);
    if (!m->data)
        return COHORT_ENOMEM;
    memset(m->data, 0, rounded);
    return 0;
}

int coh_model_clone_table(struct coh_model *dst, const struct coh_model *src)
{
    coh_model_init(dst);
    for (size_t i = 0; i < src->ntensors; i++) {
        const struct coh_tensor *t = &src->tensors[i];
        int rc = coh_model_add(dst, t->name, t->ndim, t->shape);
        if (rc < 0) {
            coh_model_fini(dst);
            return rc;
        }
    }
    return 0;
}

int coh_model_clone(struct coh_model *dst, const struct coh_model *src, int copy_data)
{
    int rc = coh_model_clone_table(dst, src);
    if (rc < 0)
        return rc;
    rc = coh_model_alloc(dst);
    if (rc < 0) {
        coh_model_fini(dst);
        return rc;
    }
    if (copy_data && src->data)
        memcpy(dst->data, src->data, src->numel * sizeof(float));
    return 0;
}

int coh_model_same_layout(const struct coh_model *a, const struct coh_model *b)
{
    if (a->ntensors != b->ntensors || a->numel != b->numel)
        return 0;
    for (size_t i = 0; i < a->ntensors; i++) {
        const struct coh_tensor *x = &a->tensors[i], *y = &b->tensors[i];
        if (x->ndim != y->ndim || strcmp(x->name, y->name) != 0)
            return 0;
        for (int d = 0; d < x->ndim; d++)
            if (x->shape[d] != y->shape[d])
                return 0;
    }
    return 1;
}

const struct coh_tensor *coh_model_find(const struct coh_model *m, const char *name)
{
    for (size_t i = 0; i < m->ntensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0)
            return &m->tensors[i];
    return NULL;
}

size_t coh_first_nonfinite(const float *p, size_t n)
{
    /* Inf and NaN are the floats whose exponent bits are all ones; blocks of
     * 1024 go through coh_abs_bound_bits (75 GB/s in cache here, against 7 GB/s
     * for isfinite() per element and 26 for an OR of compares), and only a block
     * that holds one is searched element by element. */
    size_t i = 0;
    for (; i + 1024 <= n; i += 1024)
        if (coh_abs_bound_bits(p + i, 1024) >= COH_NONFINITE_BITS)
            break;
    for (; i < n; i++)
        if (!isfinite(p[i]))
            return i;
    return n;
}

uint32_t coh_abs_bound_bits(const float *p, size_t n)
{
    /* The high half of |x|'s bits (exponent and 7 bits of mantissa) orders the
     * magnitudes to within 2^-7, and is non-negative as an int16: SSE2's signed
     * 16-bit max takes it, two instructions per four floats. An exact 32-bit
     * unsigned max needs SSE4.1; built for baseline x86-64, gcc emulated it at
     * 10 GB/s, under half the speed of the NaN/Inf test it replaces. */
    uint32_t hi = 0;
    size_t i = 0;
#if defined(__SSE2__)
    const __m128i mask = _mm_set1_epi32(0x7fff0000);
    __m128i m0 = _mm_setzero_si128(), m1 = m0, m2 = m0, m3 = m0;
    for (; i + 16 <= n; i += 16) {
        const __m128i *q = (const __m128i *)(const void *)(p + i);
        m0 = _mm_max_epi16(m0, _mm_and_si128(_mm_loadu_si128(q), mask));
        m1 = _mm_max_epi16(m1, _mm_and_si128(_mm_loadu_si128(q + 1), mask));
        m2 = _mm_max_epi16(m2, _mm_and_si128(_mm_loadu_si128(q + 2), mask));
        m3 = _mm_max_epi16(m3, _mm_and_si128(_mm_loadu_si128(q + 3), mask));
    }
    m0 = _mm_max_epi16(_mm_max_epi16(m0, m1), _mm_max_epi16(m2, m3));
    uint16_t lanes[8];
    _mm_storeu_si128((__m128i *)(void *)lanes, m0);
    for (int k = 0; k < 8; k++)
        hi = lanes[k] > hi ? lanes[k] : hi; /* the low halves were masked to 0 */
#endif
    for (; i < n; i++) {
        uint32_t b;
        memcpy(&b, p + i, sizeof b);
        b = (b >> 16) & 0x7fffu;
        hi = b > hi ? b : hi;
    }
    return n ? hi << 16 | 0xffffu : 0;
}

int coh_model_all_finite(const struct coh_model *m)
{
    return coh_first_nonfinite(m->data, m->numel) == m->numel;
}

void coh_model_describe(const struct coh_model *m, char *buf, size_t len)
{
    size_t o = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < m->ntensors && o + 1 < len; i++) {
        const struct coh_tensor *t = &m->tensors[i];
        o += (size_t)snprintf(buf + o, len - o, "%s%s[", i ? " " : "", t->name);
        for (int d = 0; d < t->ndim && o + 1 < len; d++)
            o += (size_t)snprintf(buf + o, len - o, "%s%llu", d ? "x" : "",
                                  (unsigned long long)t->shape[d]);
        if (o + 1 < len)
            o += (size_t)snprintf(buf + o, len - o, "]");
    }
}
