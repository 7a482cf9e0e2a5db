/* XXH3-128 checksums; see checksum.h. */
#include "checksum.h"

#include <stdatomic.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#if defined(COH_XXH_X86)
/* checksum_simd.c, built with -mavx2 and -mavx512f. */
void coh_xxh_update_avx2(void *st, const void *data, size_t len);
void coh_xxh128_avx2(const void *data, size_t len, uint64_t out[2]);
void coh_xxh_update_avx512(void *st, const void *data, size_t len);
void coh_xxh128_avx512(const void *data, size_t len, uint64_t out[2]);

enum { VEC_UNKNOWN, VEC_BASE, VEC_AVX2, VEC_AVX512 };

/* Every thread computes the same answer, so a race here is harmless. */
static int vec_level(void)
{
    static _Atomic int level = VEC_UNKNOWN;
    int l = atomic_load_explicit(&level, memory_order_relaxed);
    if (l != VEC_UNKNOWN)
        return l;
    __builtin_cpu_init();
    /* GCC's checks include the OS saving the wider registers (XCR0). */
    if (__builtin_cpu_supports("avx512f"))
        l = VEC_AVX512;
    else if (__builtin_cpu_supports("avx2"))
        l = VEC_AVX2;
    else
        l = VEC_BASE;
    atomic_store_explicit(&level, l, memory_order_relaxed);
    return l;
}
#endif

struct coh_xxh {
    XXH3_state_t *st;
};

struct coh_xxh *coh_xxh_new(void)
{
    struct coh_xxh *h = malloc(sizeof *h);
    if (!h)
        return NULL;
    h->st = XXH3_createState();
    if (!h->st) {
        free(h);
        return NULL;
    }
    XXH3_128bits_reset(h->st);
    return h;
}

void coh_xxh_free(struct coh_xxh *h)
{
    if (!h)
        return;
    XXH3_freeState(h->st);
    free(h);
}

void coh_xxh_reset(struct coh_xxh *h)
{
    XXH3_128bits_reset(h->st);
}

void coh_xxh_update(struct coh_xxh *h, const void *data, size_t len)
{
#if defined(COH_XXH_X86)
    switch (vec_level()) {
    case VEC_AVX512:
        coh_xxh_update_avx512(h->st, data, len);
        return;
    case VEC_AVX2:
        coh_xxh_update_avx2(h->st, data, len);
        return;
    }
#endif
    XXH3_128bits_update(h->st, data, len);
}

void coh_xxh_final(struct coh_xxh *h, uint8_t out[COH_XXH_LEN])
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(h->st));
    memcpy(out, c.digest, COH_XXH_LEN);
}

static XXH128_hash_t hash128(const void *data, size_t len)
{
#if defined(COH_XXH_X86)
    uint64_t v[2];
    switch (vec_level()) {
    case VEC_AVX512:
        coh_xxh128_avx512(data, len, v);
        return (XXH128_hash_t){.low64 = v[0], .high64 = v[1]};
    case VEC_AVX2:
        coh_xxh128_avx2(data, len, v);
        return (XXH128_hash_t){.low64 = v[0], .high64 = v[1]};
    }
#endif
    return XXH3_128bits(data, len);
}

void coh_xxh128(const void *data, size_t len, uint8_t out[COH_XXH_LEN])
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, hash128(data, len));
    memcpy(out, c.digest, COH_XXH_LEN);
}
