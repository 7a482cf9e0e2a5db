/*
 * Length-prefixed framing as a pure function: bytes in, frames out. A frame is
 * a 4-byte big-endian length followed by that many bytes. The length is checked
 * against max_frame before any memory is reserved for the body (redis
 * processMultibulkBuffer), so a hostile peer cannot make us allocate.
 * The receive buffer grows only as far as the frame in flight needs and is
 * released when empty, so an idle connection holds no buffer.
 * Not thread-safe; one decoder per connection.
 */
#ifndef COH_FRAME_H
#define COH_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define COH_FRAME_HDR 4
#define COH_FRAME_DEFAULT_MAX (8u << 20)

struct coh_frame_rx {
    uint8_t *buf;
    size_t cap;      /* allocated bytes */
    size_t start;    /* first unconsumed byte */
    size_t end;      /* one past the last received byte */
    size_t max_frame;
};

void coh_frame_rx_init(struct coh_frame_rx *rx, size_t max_frame);
void coh_frame_rx_fini(struct coh_frame_rx *rx);

/* Returns a writable region of at least min(want, room) bytes in *p / *avail
 * where received bytes can be placed, then coh_frame_rx_commit(n). The region
 * never grows past what the current frame needs plus `want`. Returns 0 or
 * COHORT_ENOMEM. */
int coh_frame_rx_space(struct coh_frame_rx *rx, size_t want, uint8_t **p, size_t *avail);
/* Like coh_frame_rx_space, but reserves only `want` bytes, not the whole frame
 * now arriving: for a reader that may take the rest of the frame elsewhere. */
int coh_frame_rx_reserve(struct coh_frame_rx *rx, size_t want, uint8_t **p, size_t *avail);
void coh_frame_rx_commit(struct coh_frame_rx *rx, size_t n);

/* Copies len bytes in (convenience over space/commit). Returns 0 or ENOMEM. */
int coh_frame_rx_feed(struct coh_frame_rx *rx, const uint8_t *data, size_t len);

/* Next complete frame body: returns 1 and sets *frame and *len (valid until the next
 * call on rx), 0 when more bytes are needed, COHORT_ETOOBIG when the announced
 * length exceeds max_frame (the stream cannot be resynchronised: close it). */
int coh_frame_next(struct coh_frame_rx *rx, const uint8_t **frame, size_t *len);

/* Frees the buffer when no bytes are pending and it is larger than keep, so
 * an idle connection does not hold the memory of its last big frame.
 * Invalidates any frame pointer returned earlier. */
void coh_frame_rx_trim(struct coh_frame_rx *rx, size_t keep);

/* Shrinks the buffer to the bytes pending (none: frees it), for a connection that
 * stops reading for a while with part of a frame held. Invalidates frame pointers. */
void coh_frame_rx_shrink(struct coh_frame_rx *rx);

/* Bytes received but not yet returned as frames. */
size_t coh_frame_rx_pending(const struct coh_frame_rx *rx);

static inline void coh_frame_put_len(uint8_t *out, uint32_t len)
{
    out[0] = (uint8_t)(len >> 24);
    out[1] = (uint8_t)(len >> 16);
    out[2] = (uint8_t)(len >> 8);
    out[3] = (uint8_t)len;
}

static inline uint32_t coh_frame_get_len(const uint8_t *in)
{
    return ((uint32_t)in[0] << 24) | ((uint32_t)in[1] << 16) | ((uint32_t)in[2] << 8) | in[3];
}

#endif
