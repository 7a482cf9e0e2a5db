/* Envelope packing/unpacking and the chunk fast path; see wire.h. */
#include "wire.h"

#include <stdlib.h>
#include <string.h>

#include "cohort_err.h"
#include "frame.h"

int coh_wire_decode(const uint8_t *frame, size_t len, Cohort__Envelope **out)
{
    Cohort__Envelope *e = cohort__envelope__unpack(NULL, len, frame);
    if (!e)
        return COHORT_EFRAME;
    if (e->body_case == COHORT__ENVELOPE__BODY__NOT_SET) {
        cohort__envelope__free_unpacked(e, NULL);
        return COHORT_EFRAME;
    }
    *out = e;
    return 0;
}

void coh_wire_free(Cohort__Envelope *e)
{
    if (e)
        cohort__envelope__free_unpacked(e, NULL);
}

size_t coh_wire_frame_size(const Cohort__Envelope *e)
{
    return COH_FRAME_HDR + cohort__envelope__get_packed_size(e);
}

size_t coh_wire_pack_into(const Cohort__Envelope *e, uint8_t *out)
{
    size_t n = cohort__envelope__pack(e, out + COH_FRAME_HDR);
    coh_frame_put_len(out, (uint32_t)n);
    return COH_FRAME_HDR + n;
}

int coh_wire_encode(const Cohort__Envelope *e, uint8_t **frame, size_t *len)
{
    size_t n = coh_wire_frame_size(e);
    if (n - COH_FRAME_HDR > UINT32_MAX)
        return COHORT_ETOOBIG;
    uint8_t *b = malloc(n);
    if (!b)
        return COHORT_ENOMEM;
    *len = coh_wire_pack_into(e, b);
    *frame = b;
    return 0;
}

/* Varint reader: returns bytes consumed, 0 on truncation or overlong input. */
static size_t get_varint(const uint8_t *p, const uint8_t *end, uint64_t *v)
{
    uint64_t x = 0;
    for (size_t i = 0; i < 10 && p + i < end; i++) {
        x |= (uint64_t)(p[i] & 0x7f) << (7 * i);
        if (!(p[i] & 0x80)) {
            *v = x;
            return i + 1;
        }
    }
    return 0;
}

static size_t put_varint(uint8_t *p, uint64_t v)
{
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

static size_t varint_len(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

int coh_wire_peek_chunk(const uint8_t *frame, size_t len, struct coh_chunk_view *v)
{
    const uint8_t *p = frame, *end = frame + len;
    uint64_t tag, inner_len;
    size_t n = get_varint(p, end, &tag);
    if (n == 0)
        return 0;
    int kind = (int)(tag >> 3);
    if ((tag & 7) != 2 || (kind != COH_CHUNK_MODEL && kind != COH_CHUNK_UPDATE))
        return 0;
    p += n;
    n = get_varint(p, end, &inner_len);
    if (n == 0)
        return COHORT_EFRAME;
    p += n;
    /* Anything after the inner message (unknown envelope fields) is left to the
     * generic decoder. */
    if (inner_len != (uint64_t)(end - p))
        return inner_len > (uint64_t)(end - p) ? COHORT_EFRAME : 0;

    memset(v, 0, sizeof *v);
    v->kind = kind;
    int have_data = 0;
    while (p < end) {
        n = get_varint(p, end, &tag);
        if (n == 0)
            return COHORT_EFRAME;
        p += n;
        uint64_t field = tag >> 3, wt = tag & 7, val;
        if (wt == 0) {
            n = get_varint(p, end, &val);
            if (n == 0)
                return COHORT_EFRAME;
            p += n;
            if (field == 1)
                v->round = val;
            else if (kind == COH_CHUNK_MODEL && field == 2)
                v->index = (uint32_t)val;
            else if ((kind == COH_CHUNK_MODEL && field == 3) ||
                     (kind == COH_CHUNK_UPDATE && field == 2))
                v->offset = val;
            else
                return 0;
        } else if (wt == 2 && field == 15) {
            n = get_varint(p, end, &val);
            if (n == 0 || val > (uint64_t)(end - p - n))
                return COHORT_EFRAME;
            p += n;
            v->data = p;
            v->len = (size_t)val;
            p += val;
            have_data = 1;
        } else {
            return 0; /* a field this fast path does not know: use the generic decoder */
        }
    }
    if (!have_data)
        v->data = p;
    return 1;
}

int coh_wire_peek_chunk_head(const uint8_t *body, size_t have, size_t len, int kind,
                             struct coh_chunk_view *v, size_t *data_pos)
{
    /* Only the head is parsed, never more than COH_CHUNK_HEAD_MAX bytes: a
     * receiver calls this after every read, and a hostile frame padded with
     * fields must not make that quadratic. */
    if (have > len)
        have = len;
    if (have > COH_CHUNK_HEAD_MAX)
        have = COH_CHUNK_HEAD_MAX;
    const uint8_t *p = body, *end = body + have;
    uint64_t tag, inner_len, val;
    size_t n;
#define NEED(expr) do { n = (expr); if (n == 0) return (size_t)(end - p) >= 10 ? -1 : 0; } while (0)
    NEED(get_varint(p, end, &tag));
    if ((kind != COH_CHUNK_UPDATE && kind != COH_CHUNK_MODEL) || tag != (uint64_t)((kind << 3) | 2))
        return -1;
    p += n;
    NEED(get_varint(p, end, &inner_len));
    p += n;
    if (inner_len != (uint64_t)(len - (size_t)(p - body)))
        return -1; /* other envelope fields follow: not the fast shape */
    memset(v, 0, sizeof *v);
    v->kind = kind;
    /* Field numbers: ModelChunk round 1, index 2, offset 3; UpdateChunk round 1,
     * offset 2 (wire.h). */
    uint64_t offset_field = kind == COH_CHUNK_MODEL ? 3 : 2;
    for (;;) {
        NEED(get_varint(p, end, &tag));
        p += n;
        if (tag == 0x7a) { /* field 15, bytes: the data, last */
            NEED(get_varint(p, end, &val));
            p += n;
            size_t pos = (size_t)(p - body);
            if (val != (uint64_t)(len - pos))
                return -1;
            v->len = (size_t)val;
            *data_pos = pos;
            return 1;
        }
        if ((tag & 7) != 0)
            return -1;
        NEED(get_varint(p, end, &val));
        p += n;
        if (tag >> 3 == 1)
            v->round = val;
        else if (tag >> 3 == offset_field)
            v->offset = val;
        else if (kind == COH_CHUNK_MODEL && tag >> 3 == 2)
            v->index = (uint32_t)val;
        else
            return -1;
    }
#undef NEED
}

size_t coh_wire_chunk_frame_max(size_t dlen)
{
    /* header + envelope tag/len + 3 varint fields + data tag/len + data */
    return COH_FRAME_HDR + 1 + 10 + 3 * 11 + 1 + 10 + dlen;
}

size_t coh_wire_write_chunk(uint8_t *out, int kind, uint64_t round, uint32_t index,
                            uint64_t offset, const void *data, size_t dlen, size_t *data_pos)
{
    size_t inner = 0;
    if (round)
        inner += 1 + varint_len(round);
    if (kind == COH_CHUNK_MODEL && index)
        inner += 1 + varint_len(index);
    if (offset)
        inner += 1 + varint_len(offset);
    inner += 1 + varint_len(dlen) + dlen;

    uint8_t *p = out + COH_FRAME_HDR;
    *p++ = (uint8_t)((kind << 3) | 2);
    p += put_varint(p, inner);
    if (round) {
        *p++ = 0x08;
        p += put_varint(p, round);
    }
    if (kind == COH_CHUNK_MODEL) {
        if (index) {
            *p++ = 0x10;
            p += put_varint(p, index);
        }
        if (offset) {
            *p++ = 0x18;
            p += put_varint(p, offset);
        }
    } else if (offset) {
        *p++ = 0x10;
        p += put_varint(p, offset);
    }
    *p++ = 0x7a;
    p += put_varint(p, dlen);
    if (data_pos)
        *data_pos = (size_t)(p - out);
    if (dlen && data)
        memcpy(p, data, dlen);
    p += dlen;
    size_t total = (size_t)(p - out);
    coh_frame_put_len(out, (uint32_t)(total - COH_FRAME_HDR));
    return total;
}
