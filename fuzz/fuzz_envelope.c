/*
 * Envelope decoding as cohortd and libcohort do it: the in-place chunk reader
 * first, then protobuf-c. A chunk view must lie inside the frame; a decoded
 * message with a tensor table is checked the way the server checks uploads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

/* Any unknown field anywhere in the message tree (protobuf-c reflection). */
static int has_unknown_msg(const ProtobufCMessage *m)
{
    if (!m)
        return 0;
    if (m->n_unknown_fields)
        return 1;
    const ProtobufCMessageDescriptor *d = m->descriptor;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        const char *base = (const char *)m;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)(base + f->quantifier_offset);
            const ProtobufCMessage *const *arr =
                *(const ProtobufCMessage *const *const *)(base + f->offset);
            for (size_t k = 0; k < n; k++)
                if (has_unknown_msg(arr[k]))
                    return 1;
        } else {
            if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
                uint32_t which = *(const uint32_t *)(base + f->quantifier_offset);
                if (which != f->id)
                    continue;
            }
            if (has_unknown_msg(*(const ProtobufCMessage *const *)(base + f->offset)))
                return 1;
        }
    }
    return 0;
}

static int has_unknown(const Cohort__Envelope *e)
{
    return has_unknown_msg(&e->base);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct coh_chunk_view v;
    int r = coh_wire_peek_chunk(data, size, &v);
    if (r == 1) {
        if (v.data < data || v.data + v.len > data + size)
            abort();
        volatile uint8_t sink = 0;
        for (size_t i = 0; i < v.len; i++)
            sink ^= v.data[i];
        (void)sink;
    }
    Cohort__Envelope *e = NULL;
    if (coh_wire_decode(data, size, &e) == 0) {
        if (e->body_case == COHORT__ENVELOPE__BODY_UPDATE_BEGIN) {
            const Cohort__UpdateBegin *b = e->update_begin;
            uint64_t total = 0;
            for (size_t i = 0; i < b->n_tensors; i++) {
                const Cohort__TensorInfo *t = b->tensors[i];
                if (!t->name)
                    abort();
                uint64_t n = 1;
                for (size_t d = 0; d < t->n_shape && d < 8; d++)
                    n = t->shape[d] && n > UINT64_MAX / t->shape[d] ? 0 : n * t->shape[d];
                total += n;
            }
            (void)total;
        }
        /* Re-encoding a decoded message must round-trip through the decoder,
         * unless it carried unknown fields: protobuf-c 1.4 keeps those verbatim,
         * even an (invalid) field number 0, and re-emits them undecodably. */
        uint8_t *f;
        size_t n;
        if (!has_unknown(e) && coh_wire_encode(e, &f, &n) == 0) {
            Cohort__Envelope *e2 = NULL;
            if (coh_wire_decode(f + 4, n - 4, &e2) != 0 || e2->body_case != e->body_case)
                abort();
            coh_wire_free(e2);
            free(f);
        }
        coh_wire_free(e);
    }
    return 0;
}
