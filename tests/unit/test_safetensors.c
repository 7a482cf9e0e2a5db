/* safetensors: round trip, and strict refusal of bad files. */
#include <float.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "cohort_err.h"
#include "safetensors.h"

static void make_model(struct coh_model *m)
{
    coh_model_init(m);
    uint64_t s1[2] = {3, 4}, s2[1] = {3}, s3[3] = {2, 1, 2};
    assert_int_equal(coh_model_add(m, "fc1.weight", 2, s1), 0);
    assert_int_equal(coh_model_add(m, "fc1.bias", 1, s2), 0);
    assert_int_equal(coh_model_add(m, "conv \"odd\" name", 3, s3), 0);
    assert_int_equal(coh_model_alloc(m), 0);
    for (size_t i = 0; i < m->numel; i++)
        m->data[i] = (float)i - 7.25f;
}

static void test_round_trip(void **state)
{
    struct coh_model m, r;
    make_model(&m);
    char path[] = "/tmp/cohort-st-XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    uint8_t sha[32], sha2[32];
    assert_int_equal(coh_st_save(path, &m, 1, sha), 0);
    assert_int_equal(coh_sha256_file(path, sha2), 0);
    assert_memory_equal(sha, sha2, 32);
    char err[256];
    assert_int_equal(coh_st_load(path, NULL, &r, err, sizeof err), 0);
    assert_true(coh_model_same_layout(&m, &r));
    assert_memory_equal(m.data, r.data, m.numel * 4);
    coh_model_fini(&r);
    /* The in-memory serializer and parser agree with the file path. */
    uint8_t *buf;
    size_t len;
    assert_int_equal(coh_st_serialize(&m, &buf, &len), 0);
    assert_int_equal(coh_st_parse(buf, len, NULL, &r, err, sizeof err), 0);
    assert_true(coh_model_same_layout(&m, &r));
    assert_memory_equal(m.data, r.data, m.numel * 4);
    coh_model_fini(&r);
    free(buf);
    unlink(path);
    coh_model_fini(&m);
}

struct blocks_seen {
    int calls, fail_at;
    size_t first[8], n[8];
};

/* Computes each block as the save reaches it (as finalize does) and records it. */
static int fill_block(void *arg, float *block, size_t first, size_t n)
{
    struct blocks_seen *b = arg;
    if (b->calls < 8) {
        b->first[b->calls] = first;
        b->n[b->calls] = n;
    }
    if (++b->calls == b->fail_at)
        return COHORT_ENONFINITE;
    for (size_t i = 0; i < n; i++)
        block[i] = (float)(first + i) * 0.5f;
    return 0;
}

static void test_save_blocks(void **state)
{
    struct coh_model m, r;
    coh_model_init(&m);
    uint64_t shape[1] = {2 * COH_ST_BLOCK_FLOATS + 5};
    assert_int_equal(coh_model_add(&m, "w", 1, shape), 0);
    assert_int_equal(coh_model_alloc(&m), 0);
    char dir[] = "/tmp/cohort-stb-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[300], tmp[310];
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);

    struct blocks_seen b = {0};
    uint8_t sha[32], sha2[32];
    assert_int_equal(coh_st_save_blocks(path, &m, 1, fill_block, &b, sha), 0);
    assert_int_equal(b.calls, 3);
    assert_int_equal(b.first[1], COH_ST_BLOCK_FLOATS);
    assert_int_equal(b.first[2], 2 * COH_ST_BLOCK_FLOATS);
    assert_int_equal(b.n[0], COH_ST_BLOCK_FLOATS);
    assert_int_equal(b.n[2], 5);
    /* The file holds what the block function computed, and the digest is the file's. */
    assert_int_equal(coh_sha256_file(path, sha2), 0);
    assert_memory_equal(sha, sha2, 32);
    char err[256];
    assert_int_equal(coh_st_load(path, NULL, &r, err, sizeof err), 0);
    for (size_t i = 0; i < r.numel; i += 9973)
        assert_true(r.data[i] == (float)i * 0.5f);
    assert_true(r.data[r.numel - 1] == (float)(r.numel - 1) * 0.5f);
    coh_model_fini(&r);
    unlink(path);

    /* A block function that fails stops the save: no file, no temporary left. */
    struct blocks_seen bad = {.fail_at = 2};
    assert_int_equal(coh_st_save_blocks(path, &m, 0, fill_block, &bad, sha), COHORT_ENONFINITE);
    assert_int_equal(bad.calls, 2);
    assert_int_equal(access(path, F_OK), -1);
    assert_int_equal(access(tmp, F_OK), -1);

    /* A model under two blocks is hashed inline, not on the hashing thread:
     * the digest is the file's all the same. */
    struct coh_model s1;
    coh_model_init(&s1);
    uint64_t small[1] = {COH_ST_BLOCK_FLOATS + 3};
    assert_int_equal(coh_model_add(&s1, "b", 1, small), 0);
    assert_int_equal(coh_model_alloc(&s1), 0);
    struct blocks_seen b1 = {0};
    assert_int_equal(coh_st_save_blocks(path, &s1, 1, fill_block, &b1, sha), 0);
    assert_int_equal(b1.calls, 2);
    assert_int_equal(coh_sha256_file(path, sha2), 0);
    assert_memory_equal(sha, sha2, 32);
    unlink(path);
    coh_model_fini(&s1);
    rmdir(dir);
    coh_model_fini(&m);
}

static void test_first_nonfinite(void **state)
{
    float v[200];
    for (int i = 0; i < 200; i++)
        v[i] = (i % 2 ? -1.0f : 1.0f) * (float)i * 1e30f;
    v[7] = FLT_MAX;
    v[8] = -FLT_MAX;
    v[9] = FLT_MIN / 4; /* subnormal: finite */
    assert_int_equal(coh_first_nonfinite(v, 200), 200);
    assert_int_equal(coh_first_nonfinite(v, 0), 0);
    /* In the first block, at block edges, in the tail after the last whole block. */
    const size_t at[] = {0, 63, 64, 127, 128, 130, 199};
    const float bad[] = {NAN, INFINITY, -INFINITY};
    for (size_t k = 0; k < sizeof at / sizeof at[0]; k++) {
        for (size_t j = 0; j < 3; j++) {
            float keep = v[at[k]];
            v[at[k]] = bad[j];
            assert_int_equal(coh_first_nonfinite(v, 200), at[k]);
            assert_int_equal(coh_first_nonfinite(v, at[k]), at[k]); /* not within n */
            v[at[k]] = keep;
        }
    }
    v[150] = NAN;
    v[70] = INFINITY;
    assert_int_equal(coh_first_nonfinite(v, 200), 70); /* the first of two */
    /* Past the blocks of 1024 it tests whole: at their edges and in the tail. */
    enum { L = 3000 };
    float *w = malloc(L * sizeof *w);
    assert_non_null(w);
    for (int i = 0; i < L; i++)
        w[i] = (float)(i % 100) - 50.0f;
    assert_int_equal(coh_first_nonfinite(w, L), L);
    const size_t big[] = {0, 1023, 1024, 2047, 2048, 2999};
    for (size_t k = 0; k < sizeof big / sizeof big[0]; k++) {
        for (size_t j = 0; j < 3; j++) {
            float keep = w[big[k]];
            w[big[k]] = bad[j];
            assert_int_equal(coh_first_nonfinite(w, L), big[k]);
            w[big[k]] = keep;
        }
    }
    free(w);
}

static float from_bits(uint32_t b)
{
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

/* The bound is at least the largest magnitude and within 2^-7 of it. */
static int bounds(uint32_t bits, float largest)
{
    float b = from_bits(bits);
    return b >= largest && b <= largest * (1.0f + 1.0f / 128);
}

static void test_abs_bound_bits(void **state)
{
    (void)state;
    float v[200];
    for (int i = 0; i < 200; i++)
        v[i] = (i % 2 ? -1.0f : 1.0f) * (float)(i % 50) * 0.25f;
    assert_int_equal(coh_abs_bound_bits(v, 0), 0);
    assert_true(bounds(coh_abs_bound_bits(v, 200), 12.25f));
    assert_true(bounds(coh_abs_bound_bits(v + 3, 1), 0.75f));
    /* The largest magnitude in the first block, at block edges, in the tail,
     * negative or positive; NaN and Inf at or above COH_NONFINITE_BITS. */
    const size_t at[] = {0, 15, 16, 63, 64, 127, 128, 130, 199};
    for (size_t k = 0; k < sizeof at / sizeof at[0]; k++) {
        float keep = v[at[k]];
        v[at[k]] = -3e38f;
        assert_true(bounds(coh_abs_bound_bits(v, 200), 3e38f));
        assert_true(bounds(coh_abs_bound_bits(v, at[k] + 1), 3e38f));
        assert_true(from_bits(coh_abs_bound_bits(v, at[k])) < 13.0f); /* not within n */
        v[at[k]] = 1e30f;
        assert_true(bounds(coh_abs_bound_bits(v, 200), 1e30f));
        v[at[k]] = -FLT_MAX;
        assert_true(coh_abs_bound_bits(v, 200) < COH_NONFINITE_BITS);
        v[at[k]] = FLT_MIN / 4;
        assert_true(bounds(coh_abs_bound_bits(v, 200), 12.25f));
        const float bad[] = {NAN, -NAN, INFINITY, -INFINITY};
        for (size_t j = 0; j < 4; j++) {
            v[at[k]] = bad[j];
            assert_true(coh_abs_bound_bits(v, 200) >= COH_NONFINITE_BITS);
            assert_true(coh_abs_bound_bits(v, at[k]) < COH_NONFINITE_BITS);
        }
        v[at[k]] = keep;
    }
}

/* Builds a file image from a header string and data_len bytes of data. */
static uint8_t *image(const char *header, size_t data_len, size_t *len)
{
    size_t h = strlen(header);
    *len = 8 + h + data_len;
    uint8_t *b = calloc(1, *len);
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)((uint64_t)h >> (8 * i));
    memcpy(b + 8, header, h);
    return b;
}

static void expect_bad(const char *header, size_t data_len, const char *needle)
{
    size_t len;
    uint8_t *b = image(header, data_len, &len);
    struct coh_model m;
    char err[256] = "";
    int rc = coh_st_parse(b, len, NULL, &m, err, sizeof err);
    if (rc >= 0 || !strstr(err, needle))
        fail_msg("header %s: rc %d, err '%s', expected '%s'", header, rc, err, needle);
    assert_null(m.data);
    free(b);
}

static void test_bad_headers(void **state)
{
    expect_bad("{not json", 0, "not valid JSON");
    expect_bad("[1,2]", 0, "not a JSON object");
    expect_bad("{\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4, "F16");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "data_offsets");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "shape");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8,
               "float32 values");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 12, "cover");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", 8,
               "out of range");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "gap");
}

static void test_overlapping_offsets(void **state)
{
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
               12, "overlap");
}

static void test_truncated_file(void **state)
{
    struct coh_model m;
    make_model(&m);
    uint8_t *buf;
    size_t len;
    assert_int_equal(coh_st_serialize(&m, &buf, &len), 0);
    coh_model_fini(&m);
    char err[256];
    struct coh_model r;
    /* Every proper prefix is refused with a message and nothing allocated. */
    for (size_t cut = 0; cut < len; cut += (cut < 64 ? 1 : 7)) {
        err[0] = '\0';
        assert_true(coh_st_parse(buf, cut, NULL, &r, err, sizeof err) < 0);
        assert_true(err[0] != '\0');
        assert_null(r.data);
    }
    char path[] = "/tmp/cohort-st-XXXXXX";
    int fd = mkstemp(path);
    assert_int_equal(write(fd, buf, len - 5), (ssize_t)(len - 5));
    close(fd);
    assert_true(coh_st_load(path, NULL, &r, err, sizeof err) < 0);
    unlink(path);
    /* A header length pointing past the end of the file. */
    buf[0] = 0xff;
    buf[5] = 0x7f;
    assert_true(coh_st_parse(buf, len, NULL, &r, err, sizeof err) < 0);
    assert_non_null(strstr(err, "header length"));
    free(buf);
}

static void test_limits(void **state)
{
    struct coh_model m;
    make_model(&m);
    uint8_t *buf;
    size_t len;
    assert_int_equal(coh_st_serialize(&m, &buf, &len), 0);
    coh_model_fini(&m);
    struct coh_st_limits lim = {.max_bytes = 16};
    char err[256];
    struct coh_model r;
    assert_int_equal(coh_st_parse(buf, len, &lim, &r, err, sizeof err), COHORT_ETOOBIG);
    lim.max_bytes = 0;
    lim.max_tensors = 2;
    assert_int_equal(coh_st_parse(buf, len, &lim, &r, err, sizeof err), COHORT_ETOOBIG);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_bad_headers),
        cmocka_unit_test(test_overlapping_offsets),
        cmocka_unit_test(test_truncated_file),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_save_blocks),
        cmocka_unit_test(test_first_nonfinite),
        cmocka_unit_test(test_abs_bound_bits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
