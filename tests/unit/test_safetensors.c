/* safetensors: round trip, and strict refusal of bad files. */
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
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
