/*
 * safetensors parser: any file image either parses into a model whose tensors
 * lie inside its data, or is refused with a message; never a crash.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct coh_model m;
    char err[256];
    struct coh_st_limits lim = {.max_tensors = 1024, .max_bytes = 1u << 24};
    err[0] = '\0';
    if (coh_st_parse(data, size, &lim, &m, err, sizeof err) == 0) {
        size_t total = 0;
        for (size_t i = 0; i < m.ntensors; i++) {
            if (m.tensors[i].offset != total)
                abort();
            total += m.tensors[i].numel;
        }
        if (total != m.numel)
            abort();
        /* What we parse we can write back identically. */
        uint8_t *buf;
        size_t len;
        if (coh_st_serialize(&m, &buf, &len) == 0) {
            struct coh_model r;
            if (coh_st_parse(buf, len, &lim, &r, err, sizeof err) != 0 ||
                !coh_model_same_layout(&m, &r) ||
                (m.numel && memcmp(m.data, r.data, m.numel * 4) != 0))
                abort();
            coh_model_fini(&r);
            free(buf);
        }
        coh_model_fini(&m);
    } else if (err[0] == '\0') {
        abort(); /* every refusal says why */
    }
    return 0;
}
