/*
 * The only code that packs and unpacks protobuf Envelopes. Frames produced here
 * include the 4-byte length header. Chunk frames (ModelChunk, UpdateChunk) also
 * have a hand-written encoder and an in-place reader, because protobuf-c's
 * unpack copies every `bytes` field and chunks are the bulk of all traffic.
 * Pure functions; any thread.
 */
#ifndef COH_WIRE_H
#define COH_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "cohort.pb-c.h"

#define COH_PROTOCOL_VERSION 1
#define COH_CHUNK_DEFAULT (256u << 10)

/* Decodes one frame body. Returns 0 and a message to free with coh_wire_free,
 * or COHORT_EFRAME when it does not decode or has no body. */
int coh_wire_decode(const uint8_t *frame, size_t len, Cohort__Envelope **out);
void coh_wire_free(Cohort__Envelope *e);

/* Packs e into a new malloc'ed frame (header included). */
int coh_wire_encode(const Cohort__Envelope *e, uint8_t **frame, size_t *len);
/* Frame size (header included) and packing into caller memory of that size. */
size_t coh_wire_frame_size(const Cohort__Envelope *e);
size_t coh_wire_pack_into(const Cohort__Envelope *e, uint8_t *out);

enum coh_chunk_kind { COH_CHUNK_MODEL = 4, COH_CHUNK_UPDATE = 6 };

struct coh_chunk_view {
    int kind;                       /* enum coh_chunk_kind */
    uint64_t round;
    uint64_t offset;
    uint32_t index;                 /* ModelChunk only */
    const uint8_t *data;            /* points into the frame */
    size_t len;
};

/* Reads a ModelChunk/UpdateChunk frame in place. Returns 1 and fills v, 0 when
 * the frame is another message (decode it with coh_wire_decode), or
 * COHORT_EFRAME when it claims to be a chunk but is malformed. */
int coh_wire_peek_chunk(const uint8_t *frame, size_t len, struct coh_chunk_view *v);

/* The head of a chunk frame of the given kind whose data is its last field,
 * from the first `have` bytes of a frame body of `len` bytes: returns 1 with
 * v->round, v->index, v->offset, v->len set and *data_pos = where the data
 * starts in the body (so *data_pos + v->len == len), 0 when more bytes are
 * needed to tell, and -1 when the frame is not of that shape (then decode it
 * whole, as usual). Lets a receiver read the data straight to its destination;
 * the head is at most COH_CHUNK_HEAD_MAX bytes. */
#define COH_CHUNK_HEAD_MAX 64
int coh_wire_peek_chunk_head(const uint8_t *body, size_t have, size_t len, int kind,
                             struct coh_chunk_view *v, size_t *data_pos);
#define coh_wire_peek_update_head(b, h, l, v, p) \
    coh_wire_peek_chunk_head(b, h, l, COH_CHUNK_UPDATE, v, p)

/* Upper bound of a chunk frame's size for dlen data bytes (header included). */
size_t coh_wire_chunk_frame_max(size_t dlen);
/* Encodes a chunk frame into out (at least coh_wire_chunk_frame_max(dlen)
 * bytes). Returns the frame length; *data_pos gets the offset of the payload in
 * out, so callers can align it. */
size_t coh_wire_write_chunk(uint8_t *out, int kind, uint64_t round, uint32_t index,
                            uint64_t offset, const void *data, size_t dlen, size_t *data_pos);

#endif
