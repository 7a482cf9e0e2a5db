/*
 * Frame decoder: arbitrary bytes fed in arbitrary splits (the first byte picks
 * the split size) must never crash, never return a frame larger than the limit,
 * and never reserve memory for an announced length above it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "frame.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t step = (size_t)data[0] % 64 + 1;
    data++;
    size--;
    struct coh_frame_rx rx;
    coh_frame_rx_init(&rx, 4096);
    for (size_t off = 0; off < size; off += step) {
        size_t n = size - off < step ? size - off : step;
        if (coh_frame_rx_feed(&rx, data + off, n) < 0)
            break;
        const uint8_t *f;
        size_t len;
        int r;
        while ((r = coh_frame_next(&rx, &f, &len)) == 1) {
            if (len > 4096)
                abort();
            volatile uint8_t sink = 0;
            for (size_t i = 0; i < len; i++)
                sink ^= f[i]; /* the frame must be readable in full */
            (void)sink;
        }
        if (r < 0)
            break; /* oversized: a connection would be closed here */
        if (rx.cap > 2 * 4096 + 64 + step)
            abort(); /* buffer grew past what one frame needs */
    }
    coh_frame_rx_fini(&rx);
    return 0;
}
