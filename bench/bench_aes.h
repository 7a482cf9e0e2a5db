/*
 * The same-run TLS reference: single-core AES-GCM decryption with OpenSSL EVP,
 * the work the server's TLS layer must do for every received byte. Records of
 * rec_bytes (16 KiB = a full TLS record, 1 MiB = `openssl speed -bytes 1048576`)
 * are encrypted once into a ring, then decrypted (tag checked) until `total`
 * bytes were processed. Returns GB/s (1e9 bytes per second) of plaintext.
 * Header-only; needs libcrypto.
 */
#ifndef COH_BENCH_AES_H
#define COH_BENCH_AES_H

#include <openssl/evp.h>

#include "bench_util.h"

static inline double bench_gcm_decrypt_gbps(const EVP_CIPHER *cipher, size_t rec_bytes,
                                            uint64_t total)
{
    /* A ring larger than the L2 cache but inside L3, like a socket buffer
     * that was just filled. */
    size_t nrec = (8u << 20) / rec_bytes;
    if (nrec < 2)
        nrec = 2;
    uint8_t *pt = bench_alloc(rec_bytes);
    uint8_t *ct = bench_alloc(nrec * rec_bytes);
    uint8_t *out = bench_alloc(rec_bytes * 2);
    uint8_t(*tags)[16] = bench_alloc(nrec * 16);
    uint8_t key[32], iv[12];
    for (size_t i = 0; i < sizeof key; i++)
        key[i] = (uint8_t)(i * 7 + 1);
    for (size_t i = 0; i < rec_bytes; i++)
        pt[i] = (uint8_t)(i * 31);
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int len;
    for (size_t r = 0; r < nrec; r++) {
        memset(iv, 0, sizeof iv);
        memcpy(iv, &r, sizeof r);
        EVP_EncryptInit_ex(c, cipher, NULL, key, iv);
        EVP_EncryptUpdate(c, ct + r * rec_bytes, &len, pt, (int)rec_bytes);
        EVP_EncryptFinal_ex(c, out, &len);
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, tags[r]);
    }
    /* Key schedule once, IV per record, as a TLS connection does. */
    EVP_DecryptInit_ex(c, cipher, NULL, key, NULL);
    int bad = 0;
    uint64_t done = 0;
    size_t r = 0;
    /* Warm up. */
    for (size_t w = 0; w < nrec; w++) {
        memset(iv, 0, sizeof iv);
        memcpy(iv, &w, sizeof w);
        EVP_DecryptInit_ex(c, NULL, NULL, NULL, iv);
        EVP_DecryptUpdate(c, out, &len, ct + w * rec_bytes, (int)rec_bytes);
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, 16, tags[w]);
        bad |= EVP_DecryptFinal_ex(c, out + len, &len) != 1;
    }
    double t0 = bench_now();
    while (done < total) {
        memset(iv, 0, sizeof iv);
        memcpy(iv, &r, sizeof r);
        EVP_DecryptInit_ex(c, NULL, NULL, NULL, iv);
        EVP_DecryptUpdate(c, out, &len, ct + r * rec_bytes, (int)rec_bytes);
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, 16, tags[r]);
        bad |= EVP_DecryptFinal_ex(c, out + len, &len) != 1;
        done += rec_bytes;
        if (++r == nrec)
            r = 0;
    }
    double dt = bench_now() - t0;
    EVP_CIPHER_CTX_free(c);
    free(pt);
    free(ct);
    free(out);
    free(tags);
    if (bad) {
        fprintf(stderr, "bench: AES-GCM reference: a tag did not verify\n");
        return 0;
    }
    return (double)done / dt / 1e9;
}

#endif
