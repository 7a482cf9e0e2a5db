/*
 * safetensors read/write for float32 models: an 8-byte little-endian header
 * length, a JSON header {"name": {"dtype","shape","data_offsets"}, ...}, then
 * raw little-endian data. Parsing is strict: every offset, shape and size is
 * checked before use and any mismatch is an error with a message, never a crash.
 * Tensors are ordered by their data offsets. Any thread.
 */
#ifndef COH_SAFETENSORS_H
#define COH_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"

struct coh_st_limits {
    size_t max_tensors;     /* 0: 65536 */
    uint64_t max_bytes;     /* data bytes; 0: 16 GiB */
};

/* Parses a whole file image. On error returns COHORT_EFORMAT (or ETOOBIG,
 * ENOMEM) and writes a sentence into err. */
int coh_st_parse(const uint8_t *buf, size_t len, const struct coh_st_limits *lim,
                 struct coh_model *m, char *err, size_t errlen);
/* Reads a file, checking sizes before allocating. */
int coh_st_load(const char *path, const struct coh_st_limits *lim, struct coh_model *m,
                char *err, size_t errlen);
/* Serializes into a new malloc'ed buffer. */
int coh_st_serialize(const struct coh_model *m, uint8_t **buf, size_t *len);
/* Writes path via path.tmp; durable: fsync file and directory around the
 * rename, so after a crash the file is either absent or complete. sha256 (may be
 * NULL) receives the digest of the file's bytes. */
int coh_st_save(const char *path, const struct coh_model *m, int durable, uint8_t sha256[32]);
/* Called with each block of the data (n floats from element first) just before
 * it is hashed and written, so the caller can finish computing it, or check it,
 * while it is in cache. A negative return stops the save with that code (the
 * temporary file is removed). */
typedef int (*coh_st_block_fn)(void *arg, float *block, size_t first, size_t n);
/* coh_st_save, with fn (may be NULL) run over the data in blocks first. */
int coh_st_save_blocks(const char *path, struct coh_model *m, int durable, coh_st_block_fn fn,
                       void *arg, uint8_t sha256[32]);
/* Block size of coh_st_save_blocks, in floats: 256 KiB, so a block and the
 * data it is computed from fit in L2 together. */
#define COH_ST_BLOCK_FLOATS ((size_t)65536)

/* sha256 of a file's contents; 0 or negative error. */
int coh_sha256_file(const char *path, uint8_t out[32]);
void coh_hex(const uint8_t *in, size_t n, char *out /* 2n+1 */);

#endif
