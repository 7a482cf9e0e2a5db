/* TLS context for cohortd's listener; see tls.c. */
#ifndef TLS_H
#define TLS_H

#include <openssl/ssl.h>

/* Returns a server SSL_CTX or NULL after logging what was wrong with which file.
 * Client certificates are verified against ca and must carry clientAuth. */
SSL_CTX *tls_server_ctx(const char *ca, const char *cert, const char *key, const char *crl,
                        int require_client_cert);

#endif
