/* Framing and the chunk fast path: split, merged and oversized frames. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "cohort_err.h"
#include "frame.h"
#include "wire.h"

static size_t make_frame(uint8_t *out, const char *body)
{
    size_t n = strlen(body);
    coh_frame_put_len(out, (uint32_t)n);
    memcpy(out + 4, body, n);
    return n + 4;
}

static void test_split_byte_by_byte(void **state)
{
    struct coh_frame_rx rx;
    coh_frame_rx_init(&rx, 1024);
    uint8_t buf[64];
    size_t n = make_frame(buf, "hello, frame");
    const uint8_t *f;
    size_t len;
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(coh_frame_next(&rx, &f, &len), 0);
        assert_int_equal(coh_frame_rx_feed(&rx, buf + i, 1), 0);
    }
    assert_int_equal(coh_frame_next(&rx, &f, &len), 1);
    assert_int_equal(len, 12);
    assert_memory_equal(f, "hello, frame", 12);
    assert_int_equal(coh_frame_next(&rx, &f, &len), 0);
    assert_int_equal(coh_frame_rx_pending(&rx), 0);
    coh_frame_rx_fini(&rx);
}

static void test_merged_frames(void **state)
{
    struct coh_frame_rx rx;
    coh_frame_rx_init(&rx, 1024);
    uint8_t buf[128];
    size_t n = make_frame(buf, "one");
    n += make_frame(buf + n, "");
    n += make_frame(buf + n, "three");
    size_t partial = make_frame(buf + n, "four") - 2; /* the last frame arrives cut */
    assert_int_equal(coh_frame_rx_feed(&rx, buf, n + partial), 0);
    const uint8_t *f;
    size_t len;
    assert_int_equal(coh_frame_next(&rx, &f, &len), 1);
    assert_int_equal(len, 3);
    assert_memory_equal(f, "one", 3);
    assert_int_equal(coh_frame_next(&rx, &f, &len), 1);
    assert_int_equal(len, 0);
    assert_int_equal(coh_frame_next(&rx, &f, &len), 1);
    assert_int_equal(len, 5);
    assert_memory_equal(f, "three", 5);
    assert_int_equal(coh_frame_next(&rx, &f, &len), 0);
    assert_int_equal(coh_frame_rx_feed(&rx, buf + n + partial, 2), 0);
    assert_int_equal(coh_frame_next(&rx, &f, &len), 1);
    assert_memory_equal(f, "four", 4);
    coh_frame_rx_fini(&rx);
}

/* A paused connection keeps only its pending bytes; the stream goes on after. */
static void test_shrink_keeps_pending(void **state)
{
    struct coh_frame_rx rx;
    coh_frame_rx_init(&rx, 1 << 20);
    uint8_t buf[20000];
    size_t n = make_frame(buf, "begin");
    size_t big = 16000;
    coh_frame_put_len(buf + n, (uint32_t)big);
    for (size_t i = 0; i < big; i++)
        buf[n + 4 + i] = (uint8_t)(i * 7);
    size_t cut = n + 4 + 6000; /* "begin" whole, then 6000 bytes of the big frame */
    uint8_t *p;
    size_t avail;
    assert_int_equal(coh_frame_rx_space(&rx, 16384, &p, &avail), 0);
    assert_true(avail >= cut);
    memcpy(p, buf, cut);
    coh_frame_rx_commit(&rx, cut);
    const uint8_t *f;
    size_t len;
    assert_int_equal(coh_frame_next(&rx, &f, &len), 1);
    assert_memory_equal(f, "begin", 5);
    assert_true(rx.cap > cut);
    coh_frame_rx_shrink(&rx);
    assert_int_equal(rx.cap, cut - n);
    assert_int_equal(coh_frame_rx_pending(&rx), cut - n);
    assert_int_equal(coh_frame_rx_feed(&rx, buf + cut, n + 4 + big - cut), 0);
    assert_int_equal(coh_frame_next(&rx, &f, &len), 1);
    assert_int_equal(len, big);
    assert_memory_equal(f, buf + n + 4, big);
    coh_frame_rx_shrink(&rx); /* nothing pending: the buffer goes */
    assert_null(rx.buf);
    assert_int_equal(rx.cap, 0);
    coh_frame_rx_fini(&rx);
}

static void test_oversized_rejected_before_allocation(void **state)
{
    struct coh_frame_rx rx;
    coh_frame_rx_init(&rx, 1000);
    uint8_t hdr[4];
    coh_frame_put_len(hdr, 0x7fffffff);
    assert_int_equal(coh_frame_rx_feed(&rx, hdr, 4), 0);
    const uint8_t *f;
    size_t len;
    assert_int_equal(coh_frame_next(&rx, &f, &len), COHORT_ETOOBIG);
    /* The announced 2 GiB were never reserved. */
    uint8_t *p;
    size_t avail;
    assert_int_equal(coh_frame_rx_space(&rx, 16, &p, &avail), 0);
    assert_true(rx.cap < 65536);
    coh_frame_rx_fini(&rx);

    coh_frame_rx_init(&rx, 1000);
    uint8_t big[1005];
    memset(big, 'x', sizeof big);
    coh_frame_put_len(big, 1001);
    assert_int_equal(coh_frame_rx_feed(&rx, big, sizeof big), 0);
    assert_int_equal(coh_frame_next(&rx, &f, &len), COHORT_ETOOBIG);
    coh_frame_rx_fini(&rx);

    coh_frame_rx_init(&rx, 1000);
    coh_frame_put_len(big, 1000); /* exactly the limit is fine */
    assert_int_equal(coh_frame_rx_feed(&rx, big, 1004), 0);
    assert_int_equal(coh_frame_next(&rx, &f, &len), 1);
    assert_int_equal(len, 1000);
    coh_frame_rx_fini(&rx);
}

static void test_chunk_roundtrip_fast_and_generic(void **state)
{
    float data[300];
    for (int i = 0; i < 300; i++)
        data[i] = (float)i * 0.5f;
    uint8_t *buf = malloc(coh_wire_chunk_frame_max(sizeof data));
    size_t pos;
    size_t n = coh_wire_write_chunk(buf, COH_CHUNK_UPDATE, 7, 0, 4096, data, sizeof data, &pos);
    assert_int_equal(coh_frame_get_len(buf), n - 4);
    struct coh_chunk_view v;
    assert_int_equal(coh_wire_peek_chunk(buf + 4, n - 4, &v), 1);
    assert_int_equal(v.kind, COH_CHUNK_UPDATE);
    assert_int_equal(v.round, 7);
    assert_int_equal(v.offset, 4096);
    assert_int_equal(v.len, sizeof data);
    assert_ptr_equal(v.data, buf + pos);
    assert_memory_equal(v.data, data, sizeof data);
    /* protobuf-c decodes the hand-written encoding identically. */
    Cohort__Envelope *e;
    assert_int_equal(coh_wire_decode(buf + 4, n - 4, &e), 0);
    assert_int_equal(e->body_case, COHORT__ENVELOPE__BODY_UPDATE_CHUNK);
    assert_int_equal(e->update_chunk->round, 7);
    assert_int_equal(e->update_chunk->offset, 4096);
    assert_memory_equal(e->update_chunk->data.data, data, sizeof data);
    coh_wire_free(e);

    n = coh_wire_write_chunk(buf, COH_CHUNK_MODEL, 3, 5, 8, data, 40, NULL);
    assert_int_equal(coh_wire_peek_chunk(buf + 4, n - 4, &v), 1);
    assert_int_equal(v.kind, COH_CHUNK_MODEL);
    assert_int_equal(v.index, 5);
    assert_int_equal(v.offset, 8);
    /* Truncating the payload makes the fast path refuse, not read past the end. */
    assert_int_equal(coh_wire_peek_chunk(buf + 4, n - 4 - 3, &v), COHORT_EFRAME);
    free(buf);
}

static void test_non_chunk_and_garbage(void **state)
{
    Cohort__Heartbeat hb = COHORT__HEARTBEAT__INIT;
    hb.seq = 9;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_HEARTBEAT;
    e.heartbeat = &hb;
    uint8_t *f;
    size_t n;
    assert_int_equal(coh_wire_encode(&e, &f, &n), 0);
    struct coh_chunk_view v;
    assert_int_equal(coh_wire_peek_chunk(f + 4, n - 4, &v), 0);
    Cohort__Envelope *d;
    assert_int_equal(coh_wire_decode(f + 4, n - 4, &d), 0);
    assert_int_equal(d->heartbeat->seq, 9);
    coh_wire_free(d);
    free(f);
    const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0x0f, 0x01};
    assert_int_equal(coh_wire_decode(junk, sizeof junk, &d), COHORT_EFRAME);
    /* An empty envelope has no body: refused. */
    assert_int_equal(coh_wire_decode(junk, 0, &d), COHORT_EFRAME);
}

/* The head of an UpdateChunk read from a growing prefix: "need more" until the
 * data length is in, then the exact round, offset, length and data position;
 * other shapes are left to the generic decoder. */
static void test_update_head_from_prefix(void **state)
{
    (void)state;
    uint8_t data[3000];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (uint8_t)(i * 7);
    uint8_t *f = malloc(coh_wire_chunk_frame_max(sizeof data));
    assert_non_null(f);
    size_t pos = 0;
    size_t flen = coh_wire_write_chunk(f, COH_CHUNK_UPDATE, 300, 0, 1u << 20, data, sizeof data,
                                       &pos);
    size_t body = flen - COH_FRAME_HDR, dpos_body = pos - COH_FRAME_HDR;
    for (size_t have = 0; have <= body; have++) {
        struct coh_chunk_view v;
        size_t dpos = 0;
        int r = coh_wire_peek_update_head(f + COH_FRAME_HDR, have, body, &v, &dpos);
        if (have < dpos_body) {
            assert_int_equal(r, 0);
        } else {
            assert_int_equal(r, 1);
            assert_int_equal(v.round, 300);
            assert_int_equal(v.offset, 1u << 20);
            assert_int_equal(v.len, sizeof data);
            assert_int_equal(dpos, dpos_body);
            assert_memory_equal(f + COH_FRAME_HDR + dpos, data, 16);
        }
    }
    /* A model chunk: not an update head, but a model head with its index. */
    struct coh_chunk_view v;
    size_t dpos;
    size_t mlen = coh_wire_write_chunk(f, COH_CHUNK_MODEL, 3, 7, 5000, data, 100, &pos);
    assert_int_equal(coh_wire_peek_update_head(f + COH_FRAME_HDR, mlen - COH_FRAME_HDR,
                                               mlen - COH_FRAME_HDR, &v, &dpos), -1);
    assert_int_equal(coh_wire_peek_chunk_head(f + COH_FRAME_HDR, mlen - COH_FRAME_HDR,
                                              mlen - COH_FRAME_HDR, COH_CHUNK_MODEL, &v, &dpos),
                     1);
    assert_int_equal(v.round, 3);
    assert_int_equal(v.index, 7);
    assert_int_equal(v.offset, 5000);
    assert_int_equal(v.len, 100);
    assert_int_equal(dpos, pos - COH_FRAME_HDR);
    /* An update chunk claiming a different frame length. */
    flen = coh_wire_write_chunk(f, COH_CHUNK_UPDATE, 3, 0, 0, data, 100, NULL);
    assert_int_equal(coh_wire_peek_update_head(f + COH_FRAME_HDR, flen - COH_FRAME_HDR,
                                               flen - COH_FRAME_HDR + 5, &v, &dpos), -1);
    /* A head padded past COH_CHUNK_HEAD_MAX with repeated fields is not parsed as a
     * head (a receiver re-parses after every read; this keeps that bounded). */
    {
        uint8_t pad[200];
        size_t k = 0, dl = 8;
        size_t inner = 80 + 1 + 1 + dl;
        pad[k++] = (COH_CHUNK_UPDATE << 3) | 2;
        pad[k++] = (uint8_t)inner;
        for (int i = 0; i < 40; i++) {
            pad[k++] = 0x08;
            pad[k++] = 0x01;
        }
        pad[k++] = 0x7a;
        pad[k++] = (uint8_t)dl;
        memset(pad + k, 0, dl);
        k += dl;
        assert_int_not_equal(coh_wire_peek_update_head(pad, k, k, &v, &dpos), 1);
    }
    /* Garbage: an overlong varint where the tag should be. */
    uint8_t junk[16];
    memset(junk, 0xff, sizeof junk);
    assert_int_equal(coh_wire_peek_update_head(junk, sizeof junk, 1000, &v, &dpos), -1);
    free(f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_split_byte_by_byte),
        cmocka_unit_test(test_merged_frames),
        cmocka_unit_test(test_shrink_keeps_pending),
        cmocka_unit_test(test_oversized_rejected_before_allocation),
        cmocka_unit_test(test_chunk_roundtrip_fast_and_generic),
        cmocka_unit_test(test_non_chunk_and_garbage),
        cmocka_unit_test(test_update_head_from_prefix),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
