/* XXH3-128 checksums; see checksum.h. */
#include "checksum.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

struct coh_xxh {
    XXH3_state_t *st;
};

struct coh_xxh *coh_xxh_new(void)
{
    struct coh_xxh *h = malloc(sizeof *h);
    if (!h)
        return NULL;
    h->st = XXH3_createState();
    if (!h->st) {
        free(h);
        return NULL;
    }
    XXH3_128bits_reset(h->st);
    return h;
}

void coh_xxh_free(struct coh_xxh *h)
{
    if (!h)
        return;
    XXH3_freeState(h->st);
    free(h);
}

void coh_xxh_reset(struct coh_xxh *h)
{
    XXH3_128bits_reset(h->st);
}

void coh_xxh_update(struct coh_xxh *h, const void *data, size_t len)
{
    XXH3_128bits_update(h->st, data, len);
}

void coh_xxh_final(struct coh_xxh *h, uint8_t out[COH_XXH_LEN])
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(h->st));
    memcpy(out, c.digest, COH_XXH_LEN);
}

void coh_xxh128(const void *data, size_t len, uint8_t out[COH_XXH_LEN])
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(data, len));
    memcpy(out, c.digest, COH_XXH_LEN);
}
