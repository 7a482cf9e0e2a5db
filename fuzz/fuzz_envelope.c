/*
 * Envelope decoding as cohortd and libcohort do it: the in-place chunk reader
 * first, then protobuf-c. A chunk view must lie inside the frame; a decoded
 * message with a tensor table is checked the way the server checks uploads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

static int has_unknown(const Cohort__Envelope *e)
{
    if (e->base.n_unknown_fields)
        return 1;
    const ProtobufCMessageDescriptor *d = e->base.descriptor;
    for (unsigned i = 0; i < d->n_fields; i++) {
        if (d->fields[i].id != (uint32_t)e->body_case)
            continue;
        const ProtobufCMessage *inner =
            *(const ProtobufCMessage *const *)((const char *)e + d->fields[i].offset);
        return inner && inner->n_unknown_fields;
    }
    return 0;
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
