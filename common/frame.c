/* Frame decoder; see frame.h. */
#include "frame.h"

#include <stdlib.h>
#include <string.h>

#include "cohort_err.h"

void coh_frame_rx_init(struct coh_frame_rx *rx, size_t max_frame)
{
    memset(rx, 0, sizeof *rx);
    rx->max_frame = max_frame ? max_frame : COH_FRAME_DEFAULT_MAX;
}

void coh_frame_rx_fini(struct coh_frame_rx *rx)
{
    free(rx->buf);
    memset(rx, 0, sizeof *rx);
}

size_t coh_frame_rx_pending(const struct coh_frame_rx *rx)
{
    return rx->end - rx->start;
}

/* Size the buffer must reach to hold the frame now arriving (or just a header). */
static size_t needed(const struct coh_frame_rx *rx)
{
    size_t have = rx->end - rx->start;
    if (have < COH_FRAME_HDR)
        return COH_FRAME_HDR;
    size_t len = coh_frame_get_len(rx->buf + rx->start);
    if (len > rx->max_frame)
        return COH_FRAME_HDR; /* reported by coh_frame_next; never reserve for it */
    return COH_FRAME_HDR + len;
}

static int space(struct coh_frame_rx *rx, size_t want, int whole_frame, uint8_t **p,
                 size_t *avail);

int coh_frame_rx_space(struct coh_frame_rx *rx, size_t want, uint8_t **p, size_t *avail)
{
    return space(rx, want, 1, p, avail);
}

int coh_frame_rx_reserve(struct coh_frame_rx *rx, size_t want, uint8_t **p, size_t *avail)
{
    return space(rx, want, 0, p, avail);
}

static int space(struct coh_frame_rx *rx, size_t want, int whole_frame, uint8_t **p,
                 size_t *avail)
{
    if (rx->start == rx->end) {
        rx->start = rx->end = 0;
    } else if (rx->start > 0 && (rx->start > rx->cap / 2 || rx->cap - rx->end < want)) {
        memmove(rx->buf, rx->buf + rx->start, rx->end - rx->start);
        rx->end -= rx->start;
        rx->start = 0;
    }
    size_t have = rx->end - rx->start;
    size_t need = whole_frame ? needed(rx) : have;
    /* Reading past the current frame is fine (the next header follows), but
     * only by `want`, so the buffer stays bounded by max_frame + want. */
    size_t target = (need > have ? need : have) + want;
    if (target > rx->cap) {
        size_t ncap = rx->cap ? rx->cap : 4096;
        while (ncap < target)
            ncap *= 2;
        uint8_t *nb = realloc(rx->buf, ncap);
        if (!nb)
            return COHORT_ENOMEM;
        rx->buf = nb;
        rx->cap = ncap;
    }
    *p = rx->buf + rx->end;
    *avail = rx->cap - rx->end;
    return 0;
}

void coh_frame_rx_commit(struct coh_frame_rx *rx, size_t n)
{
    rx->end += n;
}

int coh_frame_rx_feed(struct coh_frame_rx *rx, const uint8_t *data, size_t len)
{
    while (len > 0) {
        uint8_t *p;
        size_t avail;
        int rc = coh_frame_rx_space(rx, len, &p, &avail);
        if (rc < 0)
            return rc;
        size_t n = avail < len ? avail : len;
        memcpy(p, data, n);
        coh_frame_rx_commit(rx, n);
        data += n;
        len -= n;
    }
    return 0;
}

int coh_frame_next(struct coh_frame_rx *rx, const uint8_t **frame, size_t *len)
{
    size_t have = rx->end - rx->start;
    if (have < COH_FRAME_HDR)
        return 0;
    size_t flen = coh_frame_get_len(rx->buf + rx->start);
    if (flen > rx->max_frame)
        return COHORT_ETOOBIG;
    if (have < COH_FRAME_HDR + flen)
        return 0;
    *frame = rx->buf + rx->start + COH_FRAME_HDR;
    *len = flen;
    rx->start += COH_FRAME_HDR + flen;
    return 1;
}

void coh_frame_rx_shrink(struct coh_frame_rx *rx)
{
    size_t have = rx->end - rx->start;
    if (have == 0) {
        coh_frame_rx_trim(rx, 0);
        return;
    }
    if (rx->cap == have)
        return;
    if (rx->start > 0)
        memmove(rx->buf, rx->buf + rx->start, have);
    rx->start = 0;
    rx->end = have;
    uint8_t *nb = realloc(rx->buf, have);
    if (nb) { /* a failed shrink keeps the larger buffer, which still holds the bytes */
        rx->buf = nb;
        rx->cap = have;
    }
}

void coh_frame_rx_trim(struct coh_frame_rx *rx, size_t keep)
{
    if (rx->start == rx->end && rx->cap > keep) {
        free(rx->buf);
        rx->buf = NULL;
        rx->cap = rx->start = rx->end = 0;
    }
}
