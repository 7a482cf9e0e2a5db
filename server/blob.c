/*
 * Model blobs: the global model serialized once per round as ModelChunk frames,
 * reference-counted and shared read-only by every connection that streams it.
 * blob_build runs on the thread pool; refs are touched on the loop thread only.
 */
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

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
    free(b->frames);
    free(b->off);
    free(b);
}

int blob_build(const struct coh_model *m, uint64_t round, uint32_t chunk_bytes,
               struct model_blob **out)
{
    if (chunk_bytes < 1024)
        chunk_bytes = 1024;
    uint64_t total = (uint64_t)m->numel * 4;
    size_t nchunks = total ? (size_t)((total + chunk_bytes - 1) / chunk_bytes) : 1;
    struct model_blob *b = calloc(1, sizeof *b);
    if (!b)
        return COHORT_ENOMEM;
    b->refs = 1;
    b->round = round;
    b->nchunks = nchunks;
    b->total_bytes = total;
    b->off = malloc((nchunks + 1) * sizeof *b->off);
    b->frames = malloc(nchunks * coh_wire_chunk_frame_max(chunk_bytes));
    EVP_MD_CTX *sha = EVP_MD_CTX_new();
    if (!b->off || !b->frames || !sha || !EVP_DigestInit_ex(sha, EVP_sha256(), NULL)) {
        EVP_MD_CTX_free(sha);
        blob_unref(b);
        return COHORT_ENOMEM;
    }
    const uint8_t *data = (const uint8_t *)m->data;
    size_t pos = 0;
    for (size_t i = 0; i < nchunks; i++) {
        uint64_t off = (uint64_t)i * chunk_bytes;
        size_t len = (size_t)(total - off < chunk_bytes ? total - off : chunk_bytes);
        b->off[i] = pos;
        pos += coh_wire_write_chunk(b->frames + pos, COH_CHUNK_MODEL, round, (uint32_t)i, off,
                                    data + off, len, NULL);
        EVP_DigestUpdate(sha, data + off, len);
    }
    b->off[nchunks] = pos;
    unsigned int dl;
    EVP_DigestFinal_ex(sha, b->sha256, &dl);
    EVP_MD_CTX_free(sha);
    *out = b;
    return 0;
}
