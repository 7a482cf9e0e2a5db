/*
 * One XXH3-128 variant per x86 vector extension. This file is compiled once with
 * -mavx2 and once with -mavx512f (common/meson.build), each time with its own
 * COH_XXH_SUFFIX; checksum.c picks one at run time. xxHash's own run-time dispatch
 * (xxh_x86dispatch.c) is not in the Debian package, and built for baseline x86-64
 * the header picks SSE2, which hashed at 14-19 GB/s: a tenth of a client's CPU in a
 * round went to checking the model it had just decrypted (docs/performance.md).
 * The variants give the same digests; only the speed differs.
 */
#include <stddef.h>
#include <stdint.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define COH_CAT2(a, b) a##b
#define COH_CAT(a, b) COH_CAT2(a, b)

void COH_CAT(coh_xxh_update_, COH_XXH_SUFFIX)(void *st, const void *data, size_t len);
void COH_CAT(coh_xxh128_, COH_XXH_SUFFIX)(const void *data, size_t len, uint64_t out[2]);

void COH_CAT(coh_xxh_update_, COH_XXH_SUFFIX)(void *st, const void *data, size_t len)
{
    XXH3_128bits_update((XXH3_state_t *)st, data, len);
}

void COH_CAT(coh_xxh128_, COH_XXH_SUFFIX)(const void *data, size_t len, uint64_t out[2])
{
    XXH128_hash_t h = XXH3_128bits(data, len);
    out[0] = h.low64;
    out[1] = h.high64;
}
