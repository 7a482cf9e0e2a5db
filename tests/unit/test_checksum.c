/*
 * coh_xxh128 and the streaming checksum against Debian's libxxhash (a separate
 * build of the same algorithm, linked as a shared library), for every length
 * class XXH3 treats differently and for pieces of odd sizes; and each of
 * cohort's x86 variants (AVX2, AVX-512), one-shot and streaming, directly when
 * the CPU has it, so a variant the dispatcher does not pick on this machine is
 * still checked.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <xxhash.h>

#include "checksum.h"
#include "rng.h"

#if defined(COH_XXH_X86)
void coh_xxh128_avx2(const void *data, size_t len, uint64_t out[2]);
void coh_xxh128_avx512(const void *data, size_t len, uint64_t out[2]);
void coh_xxh_update_avx2(void *st, const void *data, size_t len);
void coh_xxh_update_avx512(void *st, const void *data, size_t len);
#endif

static uint8_t *data;
#define DATA_LEN (3u << 20)

static void ref128(const void *p, size_t len, uint8_t out[COH_XXH_LEN])
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(p, len));
    memcpy(out, c.digest, COH_XXH_LEN);
}

static const size_t lens[] = {0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 255, 256, 1023,
                              1024, 1025, 4096, 16384, 16389, 65536, 100003, 1u << 20,
                              DATA_LEN - 7, DATA_LEN};

static void test_one_shot_matches_library(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        uint8_t a[COH_XXH_LEN], b[COH_XXH_LEN];
        /* An unaligned start as well: chunk payloads sit at any offset. */
        for (size_t off = 0; off < 2; off++) {
            size_t len = lens[i] - (lens[i] && off ? 1 : 0);
            coh_xxh128(data + off, len, a);
            ref128(data + off, len, b);
            if (memcmp(a, b, sizeof a) != 0)
                fail_msg("one-shot differs at len %zu offset %zu", len, off);
        }
    }
}

static void test_streaming_matches_library(void **state)
{
    (void)state;
    static const size_t pieces[] = {1, 7, 64, 255, 16384, 16389, 65536, 1u << 20};
    struct coh_xxh *h = coh_xxh_new();
    assert_non_null(h);
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        for (size_t k = 0; k < sizeof pieces / sizeof pieces[0]; k++) {
            if (pieces[k] < 64 && lens[i] > 100000)
                continue; /* byte-sized pieces over megabytes only cost time */
            uint8_t a[COH_XXH_LEN], b[COH_XXH_LEN];
            coh_xxh_reset(h);
            for (size_t o = 0; o < lens[i]; o += pieces[k]) {
                size_t n = lens[i] - o < pieces[k] ? lens[i] - o : pieces[k];
                coh_xxh_update(h, data + o, n);
            }
            coh_xxh_final(h, a);
            ref128(data, lens[i], b);
            if (memcmp(a, b, sizeof a) != 0)
                fail_msg("streaming differs at len %zu, pieces of %zu", lens[i], pieces[k]);
        }
    }
    coh_xxh_free(h);
}

static void test_variants_match_library(void **state)
{
    (void)state;
#if defined(COH_XXH_X86)
    __builtin_cpu_init();
    int tried = 0;
    for (int v = 0; v < 2; v++) {
        if (!(v ? __builtin_cpu_supports("avx512f") : __builtin_cpu_supports("avx2")))
            continue;
        tried++;
        const char *name = v ? "AVX-512" : "AVX2";
        for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
            for (size_t off = 0; off < 2; off++) {
                size_t len = lens[i] - (lens[i] && off ? 1 : 0);
                uint64_t got[2];
                (v ? coh_xxh128_avx512 : coh_xxh128_avx2)(data + off, len, got);
                XXH128_hash_t want = XXH3_128bits(data + off, len);
                if (got[0] != want.low64 || got[1] != want.high64)
                    fail_msg("%s one-shot differs at len %zu offset %zu", name, len, off);
            }
        }
        /* Streaming: a state made and finished by libxxhash, fed by the variant. */
        static const size_t pieces[] = {1, 7, 64, 255, 256, 257, 1024, 16389, 1u << 20};
        XXH3_state_t *st = XXH3_createState();
        assert_non_null(st);
        for (size_t k = 0; k < sizeof pieces / sizeof pieces[0]; k++) {
            size_t len = pieces[k] < 64 ? 100003 : DATA_LEN;
            XXH3_128bits_reset(st);
            for (size_t o = 0; o < len; o += pieces[k])
                (v ? coh_xxh_update_avx512 : coh_xxh_update_avx2)(
                    st, data + o, len - o < pieces[k] ? len - o : pieces[k]);
            XXH128_hash_t got = XXH3_128bits_digest(st), want = XXH3_128bits(data, len);
            if (got.low64 != want.low64 || got.high64 != want.high64)
                fail_msg("%s streaming differs in pieces of %zu", name, pieces[k]);
        }
        XXH3_freeState(st);
    }
    print_message("x86 variants checked: %d of 2 (the others are not on this CPU)\n", tried);
#else
    skip();
#endif
}

int main(void)
{
    data = malloc(DATA_LEN);
    if (!data)
        return 1;
    struct coh_rng r;
    coh_rng_seed(&r, 11);
    for (size_t i = 0; i < DATA_LEN; i++)
        data[i] = (uint8_t)(coh_rng_next(&r) >> 56);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_one_shot_matches_library),
        cmocka_unit_test(test_streaming_matches_library),
        cmocka_unit_test(test_variants_match_library),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    free(data);
    return rc;
}
