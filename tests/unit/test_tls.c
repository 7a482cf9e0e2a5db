/*
 * TLS handshake failures: the server context cohortd uses (tls_server_ctx)
 * against client contexts with a good certificate, none, one from another CA,
 * an expired one and a server certificate posing as a client. Both ends run
 * over memory BIOs in one thread, like conn.c does with the network.
 */
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "certs.h"
#include "log.h"
#include "tls.h"

static char dir[64], other[80], exp_dir[80];

static int run_certs(int argc, char **argv)
{
    return certs_main(argc, argv);
}

static int group_setup(void **state)
{
    snprintf(dir, sizeof dir, "/tmp/cohort-tls-XXXXXX");
    if (!mkdtemp(dir))
        return -1;
    snprintf(other, sizeof other, "%s/other", dir);
    snprintf(exp_dir, sizeof exp_dir, "%s/expired", dir);
    char ca[128], cakey[128];
    snprintf(ca, sizeof ca, "%s/ca.pem", dir);
    snprintf(cakey, sizeof cakey, "%s/ca.key", dir);
    char *a1[] = {"certs", "--out", dir, "--clients", "1", NULL};
    char *a2[] = {"certs", "--out", other, "--clients", "1", NULL};
    char *a3[] = {"certs", "--out", exp_dir, "--ca-cert", ca, "--ca-key", cakey,
                  "--clients", "1", "--expired", NULL};
    coh_log_set_level(-1); /* the refusals below are expected; keep test output quiet */
    return run_certs(5, a1) || run_certs(5, a2) || run_certs(10, a3);
}

static int group_teardown(void **state)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* Drives both handshakes until both finish or one fails; returns 1 on success. */
static int handshake(SSL_CTX *sctx, SSL_CTX *cctx, long *verify_result)
{
    SSL *s = SSL_new(sctx), *c = SSL_new(cctx);
    BIO *s_in = BIO_new(BIO_s_mem()), *s_out = BIO_new(BIO_s_mem());
    BIO *c_in = BIO_new(BIO_s_mem()), *c_out = BIO_new(BIO_s_mem());
    BIO_set_mem_eof_return(s_in, -1);
    BIO_set_mem_eof_return(c_in, -1);
    SSL_set_bio(s, s_in, s_out);
    SSL_set_bio(c, c_in, c_out);
    SSL_set_accept_state(s);
    SSL_set_connect_state(c);
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c), "127.0.0.1");
    int s_done = 0, c_done = 0, failed = 0;
    uint8_t buf[16384];
    for (int i = 0; i < 50 && !failed && !(s_done && c_done); i++) {
        if (!c_done) {
            int r = SSL_do_handshake(c);
            if (r == 1)
                c_done = 1;
            else if (SSL_get_error(c, r) != SSL_ERROR_WANT_READ)
                failed = 1;
        }
        int n;
        while ((n = BIO_read(c_out, buf, sizeof buf)) > 0)
            BIO_write(s_in, buf, n);
        if (!s_done && !failed) {
            int r = SSL_do_handshake(s);
            if (r == 1)
                s_done = 1;
            else if (SSL_get_error(s, r) != SSL_ERROR_WANT_READ)
                failed = 1;
        }
        while ((n = BIO_read(s_out, buf, sizeof buf)) > 0)
            BIO_write(c_in, buf, n);
        /* TLS 1.3 clients finish before the server has checked their certificate:
         * one more read by the client surfaces the server's alert. */
        if (c_done && s_done) {
            SSL_read(c, buf, 1);
        }
    }
    *verify_result = SSL_get_verify_result(s);
    int ok = s_done && c_done && !failed;
    SSL_free(s);
    SSL_free(c);
    ERR_clear_error();
    return ok;
}

static SSL_CTX *client_ctx(const char *ca, const char *cert, const char *key)
{
    SSL_CTX *c = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(c, TLS1_3_VERSION);
    assert_int_equal(SSL_CTX_load_verify_locations(c, ca, NULL), 1);
    SSL_CTX_set_verify(c, SSL_VERIFY_PEER, NULL);
    if (cert) {
        assert_int_equal(SSL_CTX_use_certificate_file(c, cert, SSL_FILETYPE_PEM), 1);
        assert_int_equal(SSL_CTX_use_PrivateKey_file(c, key, SSL_FILETYPE_PEM), 1);
    }
    return c;
}

static SSL_CTX *server(int require)
{
    char ca[128], cert[128], key[128];
    snprintf(ca, sizeof ca, "%s/ca.pem", dir);
    snprintf(cert, sizeof cert, "%s/server.pem", dir);
    snprintf(key, sizeof key, "%s/server.key", dir);
    SSL_CTX *s = tls_server_ctx(ca, cert, key, NULL, require);
    assert_non_null(s);
    return s;
}

static void try_client(const char *cdir, const char *name, int expect_ok, long expect_verify)
{
    char ca[128], cert[128], key[128];
    snprintf(ca, sizeof ca, "%s/ca.pem", dir);
    if (name) {
        snprintf(cert, sizeof cert, "%s/%s.pem", cdir, name);
        snprintf(key, sizeof key, "%s/%s.key", cdir, name);
    }
    SSL_CTX *s = server(1), *c = client_ctx(ca, name ? cert : NULL, key);
    long vr;
    int ok = handshake(s, c, &vr);
    if (ok != expect_ok)
        fail_msg("%s/%s: handshake %s, expected %s (verify %ld: %s)", cdir, name ? name : "-",
                 ok ? "succeeded" : "failed", expect_ok ? "success" : "failure", vr,
                 X509_verify_cert_error_string(vr));
    if (expect_verify >= 0)
        assert_int_equal(vr, expect_verify);
    SSL_CTX_free(s);
    SSL_CTX_free(c);
}

static void test_good_client(void **state)
{
    try_client(dir, "client-1", 1, X509_V_OK);
}

static void test_no_client_certificate(void **state)
{
    try_client(dir, NULL, 0, -1);
}

static void test_other_ca(void **state)
{
    try_client(other, "client-1", 0, X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY);
}

static void test_expired(void **state)
{
    try_client(exp_dir, "client-1", 0, X509_V_ERR_CERT_HAS_EXPIRED);
}

static void test_server_cert_as_client(void **state)
{
    try_client(dir, "server", 0, X509_V_ERR_INVALID_PURPOSE);
}

static void test_client_refuses_wrong_server_ca(void **state)
{
    char oca[128], cert[128], key[128];
    snprintf(oca, sizeof oca, "%s/ca.pem", other);
    snprintf(cert, sizeof cert, "%s/client-1.pem", dir);
    snprintf(key, sizeof key, "%s/client-1.key", dir);
    SSL_CTX *s = server(1), *c = client_ctx(oca, cert, key);
    long vr;
    assert_false(handshake(s, c, &vr));
    SSL_CTX_free(s);
    SSL_CTX_free(c);
}

static void test_bad_server_files(void **state)
{
    char ca[128], key[128];
    snprintf(ca, sizeof ca, "%s/ca.pem", dir);
    snprintf(key, sizeof key, "%s/client-1.key", dir);
    char cert[128];
    snprintf(cert, sizeof cert, "%s/server.pem", dir);
    assert_null(tls_server_ctx(ca, cert, key, NULL, 1)); /* key does not match cert */
    assert_null(tls_server_ctx("/nonexistent/ca.pem", cert, key, NULL, 1));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_client),
        cmocka_unit_test(test_no_client_certificate),
        cmocka_unit_test(test_other_ca),
        cmocka_unit_test(test_expired),
        cmocka_unit_test(test_server_cert_as_client),
        cmocka_unit_test(test_client_refuses_wrong_server_ca),
        cmocka_unit_test(test_bad_server_files),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
