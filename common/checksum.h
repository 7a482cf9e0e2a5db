/*
 * Data checksums for model and update transfers: XXH3-128 (xxHash, inlined
 * from the Debian package's header, so no library to link on devices).
 *
 * TLS already authenticates every byte on the wire; these checksums catch a
 * model or update damaged before it was sent or after it was received (a
 * buggy trainer, a bad memory copy). That needs a strong hash, not a
 * cryptographic one, and XXH3 runs at memory speed where SHA-256 ran at
 * 1.8 GB/s and cost more CPU than the TLS decryption of the same bytes.
 * SHA-256 stays accepted for peers that send it.
 */
#ifndef COH_CHECKSUM_H
#define COH_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

#define COH_XXH_LEN 16

struct coh_xxh;
/* Streaming: NULL on out of memory. */
struct coh_xxh *coh_xxh_new(void);
void coh_xxh_free(struct coh_xxh *h);
void coh_xxh_reset(struct coh_xxh *h);
void coh_xxh_update(struct coh_xxh *h, const void *data, size_t len);
/* Writes the canonical (big-endian) 16-byte digest. */
void coh_xxh_final(struct coh_xxh *h, uint8_t out[COH_XXH_LEN]);
/* One shot. */
void coh_xxh128(const void *data, size_t len, uint8_t out[COH_XXH_LEN]);

#endif
