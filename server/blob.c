/*
 * Model blobs: the global model of a round, reference-counted and shared
 * read-only by every connection that streams it. blob_build runs on the thread
 * pool; refs are touched on the loop thread only.
 *
 * The model is not serialized ahead of time: each ModelChunk frame is a small
 * header (made by blob_chunk_header) followed by a slice of the model data, so
 * a round costs no model-sized frame buffer and no copy of the model.
 */
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

#include "checksum.h"
#include "cohort_err.h"
#include "server.h"
#include "wire.h"

struct model_blob *blob_ref(struct model_blob *b)
{
    if (b)
        b->refs++;
    return b;
}

void blob_unref(struct model_blob *b)
{
    if (!b || --b->refs > 0)
        return;
    model_buf_put((float *)b->data, (size_t)(b->total_bytes / 4));
    free(b);
}

int blob_build(struct coh_model *m, uint64_t round, uint32_t chunk_bytes, const uint8_t *xxh3,
               const uint8_t *sha256, struct model_blob **out)
{
    if (chunk_bytes < 1024)
        chunk_bytes = 1024;
    if (m->borrowed)
        return COHORT_EINVAL; /* its data already belongs to a blob */
    uint64_t total = (uint64_t)m->numel * 4;
    struct model_blob *b = calloc(1, sizeof *b);
    if (!b)
        return COHORT_ENOMEM;
    b->refs = 1;
    b->round = round;
    b->chunk_bytes = chunk_bytes;
    b->nchunks = total ? (size_t)((total + chunk_bytes - 1) / chunk_bytes) : 1;
    b->total_bytes = total;
    if (xxh3)
        memcpy(b->xxh3, xxh3, sizeof b->xxh3);
    else
        coh_xxh128(m->data, (size_t)total, b->xxh3);
    if (sha256) {
        memcpy(b->sha256, sha256, 32);
        b->has_sha256 = 1;
    }
    b->data = m->data;
    m->borrowed = 1;
    *out = b;
    return 0;
}

const uint8_t *blob_sha256(struct model_blob *b)
{
    unsigned int dl;
    if (!b->has_sha256) {
        if (!EVP_Digest(b->data, (size_t)b->total_bytes, b->sha256, &dl, EVP_sha256(), NULL))
            return NULL;
        b->has_sha256 = 1;
    }
    return b->sha256;
}

static float *spare;
static size_t spare_numel;

float *model_buf_get(size_t numel)
{
    if (spare && spare_numel == numel) {
        float *b = spare;
        spare = NULL;
        return b;
    }
    size_t bytes = ((numel ? numel : 1) * sizeof(float) + 63) & ~(size_t)63;
    return aligned_alloc(64, bytes);
}

void model_buf_put(float *buf, size_t numel)
{
    if (!buf)
        return;
    if (spare) {
        if (spare_numel == numel) {
            free(buf);
            return;
        }
        free(spare); /* the layout changed: keep the newer size */
    }
    spare = buf;
    spare_numel = numel;
}

void model_buf_drain(void)
{
    free(spare);
    spare = NULL;
}

size_t blob_chunk_header(const struct model_blob *b, size_t i, uint8_t *hdr, size_t *data_off,
                         size_t *data_len)
{
    uint64_t off = (uint64_t)i * b->chunk_bytes;
    size_t len = (size_t)(b->total_bytes - off < b->chunk_bytes ? b->total_bytes - off
                                                                 : b->chunk_bytes);
    size_t pos;
    (void)coh_wire_write_chunk(hdr, COH_CHUNK_MODEL, b->round, (uint32_t)i, off, NULL, len, &pos);
    *data_off = (size_t)off;
    *data_len = len;
    return pos;
}
