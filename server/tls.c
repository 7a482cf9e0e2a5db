/*
 * The server's TLS context: TLS 1.3 only, the server identity, the federation
 * CA for client certificates (mutual TLS unless told otherwise). Start-up only.
 */
#include "tls.h"

#include <openssl/err.h>
#include <openssl/pem.h>

#include "log.h"

/* Adds every CRL in a PEM file to the verification store and turns checking on. */
static int load_crl(SSL_CTX *ctx, const char *path)
{
    BIO *in = BIO_new_file(path, "r");
    if (!in) {
        coh_err("tls", "cannot open --crl %s", path);
        return -1;
    }
    X509_STORE *store = SSL_CTX_get_cert_store(ctx);
    int n = 0;
    X509_CRL *crl;
    while ((crl = PEM_read_bio_X509_CRL(in, NULL, NULL, NULL)) != NULL) {
        X509_STORE_add_crl(store, crl);
        X509_CRL_free(crl);
        n++;
    }
    BIO_free(in);
    ERR_clear_error();
    if (n == 0) {
        coh_err("tls", "--crl %s holds no PEM certificate revocation list", path);
        return -1;
    }
    /* Leaf certificates only: the federation CA itself is not revoked by a CRL. */
    X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK);
    coh_notice("tls", "revocation list %s: %d CRL(s) loaded", path, n);
    return 0;
}

SSL_CTX *tls_server_ctx(const char *ca, const char *cert, const char *key, const char *crl,
                        int require_client_cert)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    char err[256];
    if (!ctx)
        goto fail;
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        ERR_error_string_n(ERR_get_error(), err, sizeof err);
        coh_err("tls", "cannot load --cert %s: %s", cert, err);
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        ERR_error_string_n(ERR_get_error(), err, sizeof err);
        coh_err("tls", "cannot use --key %s with --cert %s: %s", key, cert, err);
        goto fail;
    }
    if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1) {
        ERR_error_string_n(ERR_get_error(), err, sizeof err);
        coh_err("tls", "cannot load --ca %s: %s", ca, err);
        goto fail;
    }
    if (crl && load_crl(ctx, crl) < 0)
        goto fail;
    STACK_OF(X509_NAME) *names = SSL_load_client_CA_file(ca);
    if (names)
        SSL_CTX_set_client_CA_list(ctx, names);
    SSL_CTX_set_verify(ctx,
                       SSL_VERIFY_PEER |
                           (require_client_cert ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
                       NULL);
    /* Clients reconnect rarely and resumption would skip the certificate check
     * we bind identities to, so no session tickets. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    /* AES-128-GCM first, chosen by the server: as strong as TLS 1.3 needs and
     * about 7 % cheaper per byte than OpenSSL's default AES-256-GCM here
     * (docs/performance.md); every model and update byte crosses it twice. */
    SSL_CTX_set_ciphersuites(ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:"
                                  "TLS_CHACHA20_POLY1305_SHA256");
    SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
    return ctx;
fail:
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return NULL;
}

