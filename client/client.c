/*
 * libcohort: the client side of the cohort protocol (see cohort.h for the
 * contract and proto/cohort.proto for the messages).
 *
 * Everything runs on the thread that calls cohort_client_run(): one blocking
 * TLS connection over a non-blocking socket, every wait a poll() that also
 * watches a self-pipe, so cohort_client_stop() (any thread, or a signal
 * handler) interrupts a connect, a read, a write or a back-off sleep at once.
 * Timeouts are measured on the monotonic clock. The library keeps no global
 * state, never touches the process's signal dispositions (sends use
 * MSG_NOSIGNAL through a small custom BIO instead) and logs only through the
 * user's log callback.
 *
 * Memory: the received model, the params copy the callback trains in (which
 * becomes the update in place), the frame receive buffer (bounded by
 * max_frame_bytes and released between rounds) and one outgoing frame buffer
 * (about one update chunk).
 */
#include "client_int.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#include "cohort_err.h"
#include "wire.h"

#define DEFAULT_BACKOFF_INITIAL_MS 200u
#define DEFAULT_BACKOFF_MAX_MS 10000u
#define DEFAULT_MAX_MODEL (1ull << 30)
#define DEFAULT_CONNECT_MS 10000u
#define DEFAULT_IO_TIMEOUT_MS 60000u
#define MAX_TIMEOUT_MS (24u * 3600u * 1000u)
#define MIN_IO_TIMEOUT_MS 100u
#define MIN_FRAME 1024u
#define MIN_CHUNK 1024u
#define MAX_CHUNK (64u << 20)
/* How much to read past the frame in flight: one TLS record. */
#define READ_AHEAD 16384u
#define TX_PIECE 16384u         /* plaintext per write of an update chunk */
#define COH_CLIENT_TLS_RBUF (64u << 10) /* OpenSSL's ciphertext buffer (read-ahead) */
/* The receive buffer is released between rounds when it grew past this. */
#define RX_KEEP (64u << 10)
/* Room for the envelope and field headers around an update chunk's data. */
#define CHUNK_OVERHEAD 64u
/* Our socket BIO type: a source/sink on a descriptor, index outside OpenSSL's. */
#define COH_BIO_TYPE (0x7e | BIO_TYPE_SOURCE_SINK | BIO_TYPE_DESCRIPTOR)

/* Positive results of the session helpers, besides 0 = go on. */
#define SESSION_DONE 1          /* run is over: return 0 */
#define UNHANDLED 2             /* a message the common handler does not know */

/* ---- small helpers ---------------------------------------------------- */

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static int host_is_little_endian(void)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return 0;
#else
    return 1;
#endif
}

/* The wire carries little-endian float32; swap in place on big-endian hosts. */
static void swap_f32(void *p, size_t nbytes)
{
    if (host_is_little_endian())
        return;
    uint8_t *b = p;
    for (size_t i = 0; i + 4 <= nbytes; i += 4) {
        uint32_t v;
        memcpy(&v, b + i, 4);
        v = __builtin_bswap32(v);
        memcpy(b + i, &v, 4);
    }
}

static int is_ip_literal(const char *s)
{
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, s, buf) == 1 || inet_pton(AF_INET6, s, buf) == 1;
}

static char *dup_str(const char *s)
{
    return s ? strdup(s) : NULL;
}

static const char *verify_name(const struct cohort_client *c)
{
    return c->o.server_name ? c->o.server_name : c->o.host;
}

/* ---- logging, errors, events ------------------------------------------ */

static void vlog_opts(const struct cohort_opts *o, int level, const char *fmt, va_list ap)
    __attribute__((format(printf, 3, 0)));

static void vlog_opts(const struct cohort_opts *o, int level, const char *fmt, va_list ap)
{
    if (!o->log_fn || level > o->log_level)
        return;
    char line[COH_CLIENT_ERRLEN + 64];
    vsnprintf(line, sizeof line, fmt, ap);
    o->log_fn(level, line, o->log_user);
}

static void log_opts(const struct cohort_opts *o, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void log_opts(const struct cohort_opts *o, int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog_opts(o, level, fmt, ap);
    va_end(ap);
}

#define log_c(c, level, ...) log_opts(&(c)->o, (level), __VA_ARGS__)

/* Records the sentence as the handle's last error, logs it and returns rc. */
static int set_error(struct cohort_client *c, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int set_error(struct cohort_client *c, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->last_error, sizeof c->last_error, fmt, ap);
    va_end(ap);
    log_c(c, COHORT_LOG_WARN, "%s", c->last_error);
    return rc;
}

/* OpenSSL's reason for the most recent failure on this thread, or `fallback`. */
static const char *ssl_reason(char *buf, size_t len, const char *fallback)
{
    unsigned long e, last = 0;
    while ((e = ERR_get_error()) != 0)
        last = e;
    if (!last) {
        snprintf(buf, len, "%s", fallback);
        return buf;
    }
    /* The long form names library and function too; the reason string alone
     * ("certificate verify failed") is what a user can act on. */
    const char *r = ERR_reason_error_string(last);
    if (r)
        snprintf(buf, len, "%s", r);
    else
        ERR_error_string_n(last, buf, len);
    return buf;
}

static void emit(struct cohort_client *c, const struct cohort_event *ev)
{
    if (c->o.event_fn)
        c->o.event_fn(ev, c->o.event_user);
}

/* ---- options ---------------------------------------------------------- */

COHORT_API const char *cohort_version(void)
{
    return "0.1.0";
}

COHORT_API int cohort_opts_new(cohort_opts **out)
{
    if (!out)
        return COHORT_EINVAL;
    struct cohort_opts *o = calloc(1, sizeof *o);
    if (!o)
        return COHORT_ENOMEM;
    o->backoff_initial_ms = DEFAULT_BACKOFF_INITIAL_MS;
    o->backoff_max_ms = DEFAULT_BACKOFF_MAX_MS;
    o->max_frame_bytes = COH_FRAME_DEFAULT_MAX;
    o->max_model_bytes = DEFAULT_MAX_MODEL;
    o->chunk_bytes = COH_CHUNK_DEFAULT;
    o->connect_ms = DEFAULT_CONNECT_MS;
    o->io_timeout_ms = DEFAULT_IO_TIMEOUT_MS;
    o->log_level = COHORT_LOG_INFO;
    o->prefill = 1;
    *out = o;
    return 0;
}

static void opts_fini(struct cohort_opts *o)
{
    free(o->host);
    free(o->port);
    free(o->server_name);
    free(o->ca);
    free(o->cert);
    free(o->key);
}

COHORT_API void cohort_opts_free(cohort_opts *o)
{
    if (!o)
        return;
    opts_fini(o);
    free(o);
}

/* Splits "host:port" / "[v6]:port" into newly allocated host and port. */
static int parse_host_port(const char *s, char **host, char **port)
{
    const char *h, *he, *p;
    if (s[0] == '[') {
        h = s + 1;
        he = strchr(h, ']');
        if (!he || he[1] != ':')
            return COHORT_EINVAL;
        p = he + 2;
    } else {
        h = s;
        he = strrchr(s, ':');
        /* A bare IPv6 address is ambiguous ("::1:7000"): brackets are required. */
        if (!he || memchr(s, ':', (size_t)(he - s)))
            return COHORT_EINVAL;
        p = he + 1;
    }
    size_t hlen = (size_t)(he - h);
    if (hlen == 0 || hlen > 253)
        return COHORT_EINVAL;
    size_t plen = strlen(p);
    if (plen == 0 || plen > 5 || strspn(p, "0123456789") != plen)
        return COHORT_EINVAL;
    long pn = strtol(p, NULL, 10);
    if (pn < 1 || pn > 65535)
        return COHORT_EINVAL;
    char *hh = strndup(h, hlen), *pp = strdup(p);
    if (!hh || !pp) {
        free(hh);
        free(pp);
        return COHORT_ENOMEM;
    }
    *host = hh;
    *port = pp;
    return 0;
}

COHORT_API int cohort_opts_set_server(cohort_opts *o, const char *host_port)
{
    if (!o || !host_port)
        return COHORT_EINVAL;
    char *h, *p;
    int rc = parse_host_port(host_port, &h, &p);
    if (rc < 0)
        return rc;
    free(o->host);
    free(o->port);
    o->host = h;
    o->port = p;
    return 0;
}

COHORT_API int cohort_opts_set_tls(cohort_opts *o, const char *ca, const char *cert,
                                   const char *key)
{
    if (!o || !ca || !*ca || (!cert) != (!key) || (cert && (!*cert || !*key)))
        return COHORT_EINVAL;
    char *a = strdup(ca), *b = dup_str(cert), *k = dup_str(key);
    if (!a || (cert && (!b || !k))) {
        free(a);
        free(b);
        free(k);
        return COHORT_ENOMEM;
    }
    free(o->ca);
    free(o->cert);
    free(o->key);
    o->ca = a;
    o->cert = b;
    o->key = k;
    return 0;
}

COHORT_API int cohort_opts_set_server_name(cohort_opts *o, const char *name)
{
    if (!o || (name && (!*name || strlen(name) > 253)))
        return COHORT_EINVAL;
    char *n = NULL;
    if (name && !(n = strdup(name)))
        return COHORT_ENOMEM;
    free(o->server_name);
    o->server_name = n;
    return 0;
}

COHORT_API int cohort_opts_set_num_examples(cohort_opts *o, uint64_t n)
{
    if (!o)
        return COHORT_EINVAL;
    o->num_examples = n;
    return 0;
}

COHORT_API int cohort_opts_set_reconnect(cohort_opts *o, uint32_t initial_ms, uint32_t max_ms,
                                         uint32_t max_attempts)
{
    if (!o || initial_ms == 0 || max_ms < initial_ms || max_ms > MAX_TIMEOUT_MS)
        return COHORT_EINVAL;
    o->backoff_initial_ms = initial_ms;
    o->backoff_max_ms = max_ms;
    o->max_attempts = max_attempts;
    return 0;
}

static int set_flag(cohort_opts *o, int *field, int v)
{
    if (!o || (v != 0 && v != 1))
        return COHORT_EINVAL;
    *field = v;
    return 0;
}

COHORT_API int cohort_opts_set_once(cohort_opts *o, int once)
{
    return set_flag(o, o ? &o->once : NULL, once);
}

COHORT_API int cohort_opts_set_prefill(cohort_opts *o, int prefill)
{
    return set_flag(o, o ? &o->prefill : NULL, prefill);
}

COHORT_API int cohort_opts_set_single_buffer(cohort_opts *o, int single)
{
    return set_flag(o, o ? &o->single_buffer : NULL, single);
}

COHORT_API int cohort_opts_set_role(cohort_opts *o, int role)
{
    if (!o || (role != COHORT_ROLE_TRAINER && role != COHORT_ROLE_EVALUATOR))
        return COHORT_EINVAL;
    o->role = role;
    return 0;
}

COHORT_API int cohort_round_add_metric(struct cohort_round *r, const char *name, double value)
{
    size_t n = name ? strlen(name) : 0;
    if (!r || n == 0 || n >= sizeof r->metrics[0].name ||
        r->nmetrics >= sizeof r->metrics / sizeof r->metrics[0])
        return COHORT_EINVAL;
    for (size_t i = 0; i < n; i++) {
        char ch = name[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == '-'))
            return COHORT_EINVAL;
    }
    memcpy(r->metrics[r->nmetrics].name, name, n + 1);
    r->metrics[r->nmetrics].value = value;
    r->nmetrics++;
    return 0;
}

COHORT_API int cohort_opts_set_limits(cohort_opts *o, uint32_t max_frame_bytes,
                                      uint64_t max_model_bytes)
{
    /* Two model-sized buffers must be addressable. */
    if (!o || max_frame_bytes < MIN_FRAME || max_frame_bytes > (1u << 30) ||
        max_model_bytes < 4 || max_model_bytes > SIZE_MAX / 4)
        return COHORT_EINVAL;
    o->max_frame_bytes = max_frame_bytes;
    o->max_model_bytes = max_model_bytes;
    return 0;
}

COHORT_API int cohort_opts_set_chunk_bytes(cohort_opts *o, uint32_t bytes)
{
    if (!o || bytes < MIN_CHUNK || bytes > MAX_CHUNK)
        return COHORT_EINVAL;
    o->chunk_bytes = bytes;
    return 0;
}

COHORT_API int cohort_opts_set_timeouts(cohort_opts *o, uint32_t connect_ms,
                                        uint32_t io_timeout_ms)
{
    if (!o || connect_ms == 0 || connect_ms > MAX_TIMEOUT_MS ||
        io_timeout_ms < MIN_IO_TIMEOUT_MS || io_timeout_ms > MAX_TIMEOUT_MS)
        return COHORT_EINVAL;
    o->connect_ms = connect_ms;
    o->io_timeout_ms = io_timeout_ms;
    return 0;
}

COHORT_API int cohort_opts_set_log(cohort_opts *o, cohort_log_fn fn, void *user, int max_level)
{
    if (!o || max_level < COHORT_LOG_ERR || max_level > COHORT_LOG_DEBUG)
        return COHORT_EINVAL;
    o->log_fn = fn;
    o->log_user = user;
    o->log_level = max_level;
    return 0;
}

COHORT_API int cohort_opts_set_event_fn(cohort_opts *o, cohort_event_fn fn, void *user)
{
    if (!o)
        return COHORT_EINVAL;
    o->event_fn = fn;
    o->event_user = user;
    return 0;
}

static int opts_copy(struct cohort_opts *dst, const struct cohort_opts *src)
{
    *dst = *src;
    dst->host = dup_str(src->host);
    dst->port = dup_str(src->port);
    dst->server_name = dup_str(src->server_name);
    dst->ca = dup_str(src->ca);
    dst->cert = dup_str(src->cert);
    dst->key = dup_str(src->key);
    if ((src->host && !dst->host) || (src->port && !dst->port) ||
        (src->server_name && !dst->server_name) || (src->ca && !dst->ca) ||
        (src->cert && !dst->cert) || (src->key && !dst->key)) {
        opts_fini(dst);
        return COHORT_ENOMEM;
    }
    return 0;
}

/* ---- socket BIO --------------------------------------------------------- */

#define GATHER_BYTES ((size_t)65536)

/* OpenSSL's own socket BIO writes with write(), which raises SIGPIPE when the
 * server has gone; a library must neither die of that nor change the host's
 * signal dispositions, so this BIO sends with MSG_NOSIGNAL. It also counts the
 * bytes for the stats. */

/* Sends what is gathered without blocking: 0 when all of it went, -1 with errno
 * (EAGAIN: the socket is full) otherwise. */
static int gather_push(struct cohort_client *c)
{
    while (c->goff < c->glen) {
        ssize_t n = send(c->fd, c->gbuf + c->goff, c->glen - c->goff, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        c->goff += (size_t)n;
        c->stats.bytes_out += (uint64_t)n;
        if (n > 0)
            c->gather_sent_ms = mono_ms();
    }
    c->glen = c->goff = 0;
    return 0;
}

static int bio_sock_write(BIO *b, const char *buf, int len)
{
    struct cohort_client *c = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    ssize_t n;
    if (c->gather && len > 0 && (size_t)len > GATHER_BYTES && gather_push(c) < 0) {
        /* Never today (TLS records are smaller), but bytes must keep their order. */
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            BIO_set_retry_write(b);
        return -1;
    }
    if (c->gather && len >= 0 && (size_t)len <= GATHER_BYTES) {
        /* While an update goes out, records are sent GATHER_BYTES at a time:
         * a quarter of the send() calls of one per 16 KiB record. When the
         * buffer is full and the socket does not take it all, OpenSSL retries
         * this same record later, as with any non-blocking write. */
        if (c->glen + (size_t)len > GATHER_BYTES && gather_push(c) < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                BIO_set_retry_write(b);
            return -1;
        }
        memcpy(c->gbuf + c->glen, buf, (size_t)len);
        c->glen += (size_t)len;
        return len;
    }
    do
        n = send(c->fd, buf, (size_t)len, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            BIO_set_retry_write(b);
        return -1;
    }
    c->stats.bytes_out += (uint64_t)n;
    return (int)n;
}

static int bio_sock_read(BIO *b, char *buf, int len)
{
    struct cohort_client *c = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    ssize_t n;
    do
        n = recv(c->fd, buf, (size_t)len, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            BIO_set_retry_read(b);
        return -1;
    }
    c->stats.bytes_in += (uint64_t)n;
    return (int)n;
}

static int bio_sock_puts(BIO *b, const char *s)
{
    return bio_sock_write(b, s, (int)strlen(s));
}

static long bio_sock_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    struct cohort_client *c = BIO_get_data(b);
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        return 1;
    case BIO_C_GET_FD:
        if (ptr)
            *(int *)ptr = c ? c->fd : -1;
        return c ? c->fd : -1;
    default:
        return 0;
    }
}

static int bio_sock_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

static int bio_sock_destroy(BIO *b)
{
    /* The descriptor belongs to the client, which closes it. */
    BIO_set_data(b, NULL);
    return 1;
}

static BIO_METHOD *make_bio_method(void)
{
    BIO_METHOD *m = BIO_meth_new(COH_BIO_TYPE, "cohort socket");
    if (!m)
        return NULL;
    if (!BIO_meth_set_write(m, bio_sock_write) || !BIO_meth_set_read(m, bio_sock_read) ||
        !BIO_meth_set_puts(m, bio_sock_puts) || !BIO_meth_set_ctrl(m, bio_sock_ctrl) ||
        !BIO_meth_set_create(m, bio_sock_create) || !BIO_meth_set_destroy(m, bio_sock_destroy)) {
        BIO_meth_free(m);
        return NULL;
    }
    return m;
}

/* ---- client lifetime -------------------------------------------------- */

/* A library must never prompt on the terminal for a key passphrase. */
static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    return -1;
}

static int make_ssl_ctx(const struct cohort_opts *o, SSL_CTX **out)
{
    char why[256];
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) {
        log_opts(o, COHORT_LOG_ERR, "cannot create a TLS context: %s",
                 ssl_reason(why, sizeof why, "unknown OpenSSL error"));
        return COHORT_ETLS;
    }
    SSL_CTX_set_default_passwd_cb(ctx, no_passphrase);
    if (!SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION)) {
        log_opts(o, COHORT_LOG_ERR, "this OpenSSL cannot do TLS 1.3: %s",
                 ssl_reason(why, sizeof why, "unsupported"));
        goto fail;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* Without read-ahead OpenSSL makes two recv() calls per record (its 5-byte
     * header, then the body); with it, one recv() fills the buffer with as many
     * records as have arrived. Safe with this library's waits: it polls only
     * after SSL_read asked for more bytes than OpenSSL holds. */
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_default_read_buffer_len(ctx, COH_CLIENT_TLS_RBUF);
    /* OpenSSL reports a missing file as "system lib"; errno says more. */
    const char *files[3] = {o->ca, o->cert, o->key};
    for (int i = 0; i < 3; i++) {
        if (files[i] && access(files[i], R_OK) != 0) {
            log_opts(o, COHORT_LOG_ERR, "cannot read the TLS %s file '%s': %s",
                     i == 0 ? "CA" : i == 1 ? "certificate" : "key", files[i], strerror(errno));
            goto fail;
        }
    }
    if (!SSL_CTX_load_verify_locations(ctx, o->ca, NULL)) {
        log_opts(o, COHORT_LOG_ERR,
                 "cannot load the CA certificate(s) from '%s': %s (is it the federation's "
                 "ca.pem in PEM format?)", o->ca, ssl_reason(why, sizeof why, "unknown error"));
        goto fail;
    }
    if (o->cert) {
        if (!SSL_CTX_use_certificate_chain_file(ctx, o->cert)) {
            log_opts(o, COHORT_LOG_ERR,
                     "cannot load the client certificate from '%s': %s (expected a PEM "
                     "certificate issued by the federation CA)",
                     o->cert, ssl_reason(why, sizeof why, "unknown error"));
            goto fail;
        }
        /* Loading a key checks it against the certificate already loaded. */
        if (!SSL_CTX_use_PrivateKey_file(ctx, o->key, SSL_FILETYPE_PEM) ||
            !SSL_CTX_check_private_key(ctx)) {
            unsigned long e = ERR_peek_last_error();
            if (ERR_GET_LIB(e) == ERR_LIB_X509 && ERR_GET_REASON(e) == X509_R_KEY_VALUES_MISMATCH)
                log_opts(o, COHORT_LOG_ERR,
                         "the key '%s' does not belong to the certificate '%s' (pass the key "
                         "that was generated with this certificate)", o->key, o->cert);
            else
                log_opts(o, COHORT_LOG_ERR,
                         "cannot load the client key from '%s': %s (expected an unencrypted "
                         "PEM private key)", o->key, ssl_reason(why, sizeof why, "unknown error"));
            goto fail;
        }
    }
    *out = ctx;
    return 0;
fail:
    SSL_CTX_free(ctx);
    ERR_clear_error();
    return COHORT_ETLS;
}

COHORT_API int cohort_client_new(cohort_client **out, const cohort_opts *o)
{
    if (!out || !o)
        return COHORT_EINVAL;
    if (!o->host) {
        log_opts(o, COHORT_LOG_ERR, "no server address: call cohort_opts_set_server() first");
        return COHORT_EINVAL;
    }
    if (!o->ca) {
        log_opts(o, COHORT_LOG_ERR, "no CA certificate to verify the server with: call "
                                    "cohort_opts_set_tls() first");
        return COHORT_EINVAL;
    }
    struct cohort_client *c = calloc(1, sizeof *c);
    if (!c)
        return COHORT_ENOMEM;
    c->fd = -1;
    c->wake[0] = c->wake[1] = -1;
    atomic_init(&c->stop, 0);
    atomic_flag_clear(&c->running);
    int rc = opts_copy(&c->o, o);
    if (rc < 0) {
        free(c);
        return rc;
    }
    rc = COHORT_ENOMEM;
    if (pipe2(c->wake, O_NONBLOCK | O_CLOEXEC) < 0) {
        rc = -errno;
        log_opts(o, COHORT_LOG_ERR, "cannot create the client's wake-up pipe: %s",
                 strerror(errno));
        c->wake[0] = c->wake[1] = -1;
        goto fail;
    }
    if (!(c->bio_meth = make_bio_method()) || !(c->md = EVP_MD_CTX_new()) ||
        !(c->xxh = coh_xxh_new()))
        goto fail;
    rc = make_ssl_ctx(&c->o, &c->ctx);
    if (rc < 0)
        goto fail;
    coh_frame_rx_init(&c->rx, c->o.max_frame_bytes);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    coh_rng_seed(&c->rng, ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) ^
                              ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)c);
    *out = c;
    return 0;
fail:
    cohort_client_free(c);
    return rc;
}

static void layout_fini(struct coh_client_layout *l)
{
    free(l->info);
    free(l->shapes);
    free(l->names);
    memset(l, 0, sizeof *l);
}

static void conn_close(struct cohort_client *c);
static void free_model_buffers(struct cohort_client *c);

COHORT_API void cohort_client_free(cohort_client *c)
{
    if (!c)
        return;
    conn_close(c);
    coh_frame_rx_fini(&c->rx);
    free(c->tx);
    free(c->gbuf);
    layout_fini(&c->lay);
    free_model_buffers(c);
    SSL_CTX_free(c->ctx);
    BIO_meth_free(c->bio_meth);
    EVP_MD_CTX_free(c->md);
    coh_xxh_free(c->xxh);
    if (c->wake[0] >= 0)
        close(c->wake[0]);
    if (c->wake[1] >= 0)
        close(c->wake[1]);
    opts_fini(&c->o);
    free(c);
}

COHORT_API void cohort_client_stop(cohort_client *c)
{
    if (!c)
        return;
    /* Only async-signal-safe operations: an atomic store and write(). */
    int saved = errno;
    atomic_store(&c->stop, 1);
    ssize_t n = write(c->wake[1], "x", 1);
    (void)n; /* a full pipe already wakes the poll */
    errno = saved;
}

COHORT_API const char *cohort_client_last_error(const cohort_client *c)
{
    return c ? c->last_error : "";
}

COHORT_API void cohort_client_stats(const cohort_client *c, struct cohort_stats *out)
{
    if (!out)
        return;
    if (!c) {
        memset(out, 0, sizeof *out);
        return;
    }
    *out = c->stats;
}

/* ---- waiting ------------------------------------------------------------ */

static int stopped(struct cohort_client *c)
{
    return atomic_load(&c->stop) != 0;
}

/* Waits up to timeout_ms for `events` on the connection (fd < 0: just sleeps),
 * returning early when stop is requested. Returns 0 (ready or timed out; the
 * caller checks its own deadline), COHORT_ECANCELED, or a poll error. */
static int wait_fd(struct cohort_client *c, int fd, short events, int64_t timeout_ms)
{
    struct pollfd p[2] = {
        {.fd = c->wake[0], .events = POLLIN},
        {.fd = fd, .events = events},
    };
    if (timeout_ms < 0)
        timeout_ms = 0;
    if (timeout_ms > INT_MAX)
        timeout_ms = INT_MAX;
    int n = poll(p, fd >= 0 ? 2 : 1, (int)timeout_ms);
    if (stopped(c))
        return COHORT_ECANCELED;
    if (n < 0 && errno != EINTR)
        return set_error(c, -errno, "poll() failed: %s", strerror(errno));
    if (n > 0 && (p[0].revents & POLLIN)) {
        /* A byte without the flag cannot come from stop(); drain so poll blocks again. */
        char buf[64];
        while (read(c->wake[0], buf, sizeof buf) > 0) {
        }
    }
    return 0;
}

/* Sleeps ms, or less if stopped. */
static int sleep_ms(struct cohort_client *c, int64_t ms)
{
    int64_t end = mono_ms() + ms;
    for (;;) {
        int64_t left = end - mono_ms();
        if (stopped(c))
            return COHORT_ECANCELED;
        if (left <= 0)
            return 0;
        int rc = wait_fd(c, -1, 0, left);
        if (rc < 0)
            return rc;
    }
}

/* ---- connection ----------------------------------------------------------- */

static void conn_close(struct cohort_client *c)
{
    /* Whatever an interrupted update gathered is not sent after all. */
    c->gather = 0;
    c->glen = c->goff = 0;
    if (c->ssl) {
        /* Tell the server we are leaving on purpose; no waiting for its reply. */
        if (!c->tls_broken && SSL_is_init_finished(c->ssl))
            SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    ERR_clear_error();
    c->tls_broken = 0;
    c->connected = 0;
    c->awaiting_ack = 0;
    c->srv_max_frame = 0;
    c->srv_hb_ms = 0;
    /* A partial frame must not leak into the next connection. */
    coh_frame_rx_fini(&c->rx);
    coh_frame_rx_init(&c->rx, c->o.max_frame_bytes);
}

static int tcp_connect(struct cohort_client *c)
{
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    /* getaddrinfo cannot be interrupted; the resolver's own timeouts bound it. */
    int g = getaddrinfo(c->o.host, c->o.port, &hints, &res);
    if (g != 0) {
        int rc = g == EAI_SYSTEM ? -errno : (g == EAI_MEMORY ? COHORT_ENOMEM : COHORT_ENOENT);
        return set_error(c, rc, "cannot resolve the server address '%s': %s (check the host name)",
                         c->o.host, gai_strerror(g));
    }
    int64_t deadline = mono_ms() + c->o.connect_ms;
    int rc = COHORT_ECONNREFUSED;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        char addr[INET6_ADDRSTRLEN + 8] = "?";
        getnameinfo(ai->ai_addr, ai->ai_addrlen, addr, sizeof addr, NULL, 0, NI_NUMERICHOST);
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                        ai->ai_protocol);
        if (fd < 0) {
            rc = set_error(c, -errno, "cannot create a socket for %s: %s", c->peer,
                           strerror(errno));
            continue;
        }
        c->fd = fd;
        int err = 0;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
            err = errno;
            while (err == EINPROGRESS || err == EINTR) {
                int64_t left = deadline - mono_ms();
                if (left <= 0) {
                    err = ETIMEDOUT;
                    break;
                }
                rc = wait_fd(c, fd, POLLOUT, left);
                if (rc < 0) {
                    freeaddrinfo(res);
                    return rc;
                }
                struct pollfd p = {.fd = fd, .events = POLLOUT};
                if (poll(&p, 1, 0) == 1) {
                    socklen_t sl = sizeof err;
                    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &sl) < 0)
                        err = errno;
                }
            }
        }
        if (err == 0) {
            int one = 1;
            /* Frames are written whole; Nagle would only delay heartbeats and acks. */
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            freeaddrinfo(res);
            log_c(c, COHORT_LOG_DEBUG, "TCP connection to %s (%s) established", c->peer, addr);
            return 0;
        }
        close(fd);
        c->fd = -1;
        if (err == ETIMEDOUT)
            rc = set_error(c, COHORT_ETIMEDOUT,
                           "connecting to %s (%s) timed out after %u ms (is the server "
                           "reachable, and is a firewall dropping packets?)",
                           c->peer, addr, c->o.connect_ms);
        else
            rc = set_error(c, -err, "cannot connect to %s (%s): %s (is cohortd running and "
                           "listening on that port?)", c->peer, addr, strerror(err));
        if (mono_ms() >= deadline)
            break;
    }
    freeaddrinfo(res);
    return rc;
}

/* The sentence for a failed TLS read/write/handshake, and its code. */
static int tls_error(struct cohort_client *c, int ssl_err, const char *during)
{
    char why[256];
    unsigned long e = ERR_peek_last_error();
    c->tls_broken = 1;
    if (ssl_err == SSL_ERROR_ZERO_RETURN)
        return set_error(c, COHORT_ECLOSED, "%s closed the connection %s", c->peer, during);
    if (ssl_err == SSL_ERROR_SYSCALL && e == 0) {
        int err = errno;
        if (err == 0 || err == EAGAIN)
            return set_error(c, COHORT_ECLOSED, "%s closed the connection %s without a TLS "
                             "close_notify", c->peer, during);
        /* EPIPE has no COHORT_ code of its own: for the caller it is a closed link. */
        return set_error(c, err == EPIPE ? COHORT_ECLOSED : -err, "connection to %s failed %s: "
                         "%s", c->peer, during, strerror(err));
    }
    long vr = SSL_get_verify_result(c->ssl);
    if (ERR_GET_LIB(e) == ERR_LIB_SSL &&
        ERR_GET_REASON(e) == SSL_R_CERTIFICATE_VERIFY_FAILED && vr != X509_V_OK) {
        ERR_clear_error();
        const char *vs = X509_verify_cert_error_string(vr);
        if (vr == X509_V_ERR_HOSTNAME_MISMATCH || vr == X509_V_ERR_IP_ADDRESS_MISMATCH)
            return set_error(c, COHORT_ECERT,
                             "TLS handshake with %s failed: %s: the server certificate is not "
                             "valid for '%s' (set the server name to one its certificate names)",
                             c->peer, vs, verify_name(c));
        return set_error(c, COHORT_ECERT,
                         "TLS handshake with %s failed: certificate verify failed: %s (is '%s' "
                         "the federation's CA, and is the server certificate current?)",
                         c->peer, vs, c->o.ca);
    }
    int reason = ERR_GET_LIB(e) == ERR_LIB_SSL ? ERR_GET_REASON(e) : 0;
#ifdef SSL_R_UNEXPECTED_EOF_WHILE_READING
    if (reason == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        ERR_clear_error();
        return set_error(c, COHORT_ECLOSED, "%s closed the connection %s without a TLS "
                         "close_notify%s", c->peer, during,
                         c->connected ? "" : " (does it accept this client's certificate?)");
    }
#endif
    ssl_reason(why, sizeof why, "unknown TLS error");
    /* Alerts from the peer are reported as reasons 1000 + alert number. In TLS
     * 1.3 the server checks our certificate after our side of the handshake is
     * done, so its refusal shows up as an alert on the first read. */
    switch (reason - SSL_AD_REASON_OFFSET) {
    case SSL_AD_BAD_CERTIFICATE:
    case SSL_AD_UNSUPPORTED_CERTIFICATE:
    case SSL_AD_CERTIFICATE_REVOKED:
    case SSL_AD_CERTIFICATE_EXPIRED:
    case SSL_AD_CERTIFICATE_UNKNOWN:
    case SSL_AD_UNKNOWN_CA:
    case SSL_AD_ACCESS_DENIED:
#ifdef SSL_AD_CERTIFICATE_REQUIRED
    case SSL_AD_CERTIFICATE_REQUIRED:
#endif
        if (!c->o.cert)
            return set_error(c, COHORT_ECERT, "%s refused the TLS session %s: %s (this client "
                             "has no certificate; pass one with cohort_opts_set_tls)", c->peer,
                             during, why);
        return set_error(c, COHORT_ECERT, "%s refused the TLS session %s: %s (is '%s' a "
                         "current certificate issued by the federation's CA, and not revoked?)",
                         c->peer, during, why, c->o.cert);
    default:
        break;
    }
    if (reason > SSL_AD_REASON_OFFSET && reason < SSL_AD_REASON_OFFSET + 256)
        return set_error(c, COHORT_ETLS, "%s refused the TLS session %s: %s (does it accept "
                         "TLS 1.3?)", c->peer, during, why);
    return set_error(c, COHORT_ETLS, "TLS failure with %s %s: %s (does it speak TLS 1.3 "
                     "on this port?)", c->peer, during, why);
}

static int tls_connect(struct cohort_client *c)
{
    char why[256];
    ERR_clear_error();
    c->ssl = SSL_new(c->ctx);
    BIO *bio = c->ssl ? BIO_new(c->bio_meth) : NULL;
    if (!bio) {
        return set_error(c, COHORT_ENOMEM, "cannot set up TLS for %s: %s", c->peer,
                         ssl_reason(why, sizeof why, "out of memory"));
    }
    BIO_set_data(bio, c);
    SSL_set_bio(c->ssl, bio, bio);
    const char *name = verify_name(c);
    int ok;
    if (is_ip_literal(name)) {
        ok = X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), name);
    } else {
        /* SNI is for DNS names only (RFC 6066 forbids IP literals). */
        ok = SSL_set_tlsext_host_name(c->ssl, name) && SSL_set1_host(c->ssl, name);
        SSL_set_hostflags(c->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    }
    if (!ok)
        return set_error(c, COHORT_ETLS, "cannot use '%s' as the server name to verify: %s",
                         name, ssl_reason(why, sizeof why, "invalid name"));
    SSL_set_connect_state(c->ssl);
    int64_t deadline = mono_ms() + c->o.connect_ms;
    for (;;) {
        ERR_clear_error();
        errno = 0;
        int r = SSL_connect(c->ssl);
        if (r == 1)
            break;
        int e = SSL_get_error(c->ssl, r);
        if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
            return tls_error(c, e, "during the TLS handshake");
        int64_t left = deadline - mono_ms();
        if (left <= 0)
            return set_error(c, COHORT_ETIMEDOUT, "TLS handshake with %s timed out after %u ms "
                             "(is this a cohortd TLS port?)", c->peer, c->o.connect_ms);
        int rc = wait_fd(c, c->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, left);
        if (rc < 0)
            return rc;
    }
    log_c(c, COHORT_LOG_DEBUG, "TLS session with %s: %s, %s", c->peer, SSL_get_version(c->ssl),
          SSL_get_cipher_name(c->ssl));
    return 0;
}

/* ---- frames out ----------------------------------------------------------- */

static int tx_reserve(struct cohort_client *c, size_t n)
{
    if (n <= c->tx_cap)
        return 0;
    uint8_t *b = realloc(c->tx, n);
    if (!b)
        return set_error(c, COHORT_ENOMEM, "out of memory for a %zu-byte frame", n);
    c->tx = b;
    c->tx_cap = n;
    return 0;
}

static int write_all(struct cohort_client *c, const uint8_t *buf, size_t len)
{
    int64_t deadline = mono_ms() + c->o.io_timeout_ms;
    size_t off = 0;
    while (off < len) {
        size_t n = 0;
        ERR_clear_error();
        errno = 0;
        if (SSL_write_ex(c->ssl, buf + off, len - off, &n)) {
            off += n;
            deadline = mono_ms() + c->o.io_timeout_ms;
            continue;
        }
        int e = SSL_get_error(c->ssl, 0);
        if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
            return tls_error(c, e, "while sending");
        /* A gathered block that went out in part is progress too: on a slow
         * link 64 KiB may take longer than io_timeout. */
        if (c->gather && c->gather_sent_ms + c->o.io_timeout_ms > deadline)
            deadline = c->gather_sent_ms + c->o.io_timeout_ms;
        int64_t left = deadline - mono_ms();
        if (left <= 0)
            return set_error(c, COHORT_ETIMEDOUT, "sending to %s made no progress for %u ms; "
                             "reconnecting", c->peer, c->o.io_timeout_ms);
        int rc = wait_fd(c, c->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, left);
        if (rc < 0)
            return rc;
    }
    c->last_tx_ms = mono_ms();
    return 0;
}

/* From here until gather_end, TLS output is gathered (bio_sock_write). */
static void gather_begin(struct cohort_client *c)
{
    if (!c->gbuf && !(c->gbuf = malloc(GATHER_BYTES)))
        return; /* not gathering is only slower */
    c->glen = c->goff = 0;
    c->gather_sent_ms = mono_ms();
    c->gather = 1;
}

/* Sends what is still gathered, waiting for the socket as write_all does. */
static int gather_end(struct cohort_client *c)
{
    if (!c->gather)
        return 0;
    c->gather = 0;
    c->gather_sent_ms = mono_ms();
    while (gather_push(c) < 0) {
        int err = errno;
        /* Dropped records leave the TLS stream broken: no close_notify after them. */
        if (err != EAGAIN && err != EWOULDBLOCK) {
            c->glen = c->goff = 0;
            c->tls_broken = 1;
            return set_error(c, err == EPIPE ? COHORT_ECLOSED : -err, "connection to %s failed "
                             "while sending: %s", c->peer, strerror(err));
        }
        int64_t left = c->gather_sent_ms + c->o.io_timeout_ms - mono_ms();
        if (left <= 0) {
            c->glen = c->goff = 0;
            c->tls_broken = 1;
            return set_error(c, COHORT_ETIMEDOUT, "sending to %s made no progress for %u ms; "
                             "reconnecting", c->peer, c->o.io_timeout_ms);
        }
        int rc = wait_fd(c, c->fd, POLLOUT, left);
        if (rc < 0) {
            c->glen = c->goff = 0;
            c->tls_broken = 1;
            return rc;
        }
    }
    c->last_tx_ms = mono_ms();
    return 0;
}

static int send_msg(struct cohort_client *c, const Cohort__Envelope *e)
{
    size_t n = coh_wire_frame_size(e);
    if (n - COH_FRAME_HDR > UINT32_MAX ||
        (c->srv_max_frame && n - COH_FRAME_HDR > c->srv_max_frame))
        return set_error(c, COHORT_ETOOBIG, "a %zu-byte message exceeds the server's frame "
                         "limit of %u bytes", n - COH_FRAME_HDR, c->srv_max_frame);
    int rc = tx_reserve(c, n);
    if (rc < 0)
        return rc;
    size_t len = coh_wire_pack_into(e, c->tx);
    return write_all(c, c->tx, len);
}

static int send_heartbeat(struct cohort_client *c, uint64_t seq, int reply)
{
    Cohort__Heartbeat hb = COHORT__HEARTBEAT__INIT;
    hb.seq = seq;
    hb.time_ms = wall_ms();
    hb.reply = reply;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_HEARTBEAT;
    e.heartbeat = &hb;
    return send_msg(c, &e);
}

/* ---- frames in ------------------------------------------------------------ */

static uint32_t heartbeat_interval(const struct cohort_client *c)
{
    uint32_t iv = c->o.io_timeout_ms / 4;
    /* The server may drop clients that stay silent for longer than it asked. */
    if (c->srv_hb_ms && c->srv_hb_ms < iv)
        iv = c->srv_hb_ms;
    return iv ? iv : 1;
}

/* Next whole frame from the server. While it waits, sends heartbeats (once
 * Welcome came) and gives up after io_timeout of silence. The frame is valid
 * until the next call. */
/* Reads at least one byte of plaintext into p (up to avail), sending
 * heartbeats while it waits and giving up after io_timeout_ms of silence. */
static int read_some(struct cohort_client *c, uint8_t *p, size_t avail, size_t *got)
{
    if (avail > INT_MAX)
        avail = INT_MAX;
    for (;;) {
        size_t n = 0;
        int rc;
        ERR_clear_error();
        errno = 0;
        if (SSL_read_ex(c->ssl, p, avail, &n)) {
            c->last_rx_ms = mono_ms();
            *got = n;
            return 0;
        }
        int e = SSL_get_error(c->ssl, 0);
        if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
            return tls_error(c, e, c->connected ? "while receiving" : "before Welcome");
        int64_t now = mono_ms();
        int64_t wake = c->last_rx_ms + c->o.io_timeout_ms;
        if (now >= wake)
            return set_error(c, COHORT_ETIMEDOUT, "nothing received from %s for %u ms; the "
                             "link looks dead, reconnecting", c->peer, c->o.io_timeout_ms);
        if (c->connected) {
            int64_t hb_at = c->last_tx_ms + heartbeat_interval(c);
            if (now >= hb_at) {
                rc = send_heartbeat(c, ++c->hb_seq, 0);
                if (rc < 0)
                    return rc;
                continue;
            }
            if (hb_at < wake)
                wake = hb_at;
        }
        rc = wait_fd(c, c->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, wake - now);
        if (rc < 0)
            return rc;
    }
}

/* Reads more of the stream into the frame buffer, making room for the whole
 * frame now arriving (whole_frame) or only for one read. */
static int read_into_rx(struct cohort_client *c, int whole_frame)
{
    uint8_t *p;
    size_t avail, n = 0;
    int rc = whole_frame ? coh_frame_rx_space(&c->rx, READ_AHEAD, &p, &avail)
                         : coh_frame_rx_reserve(&c->rx, READ_AHEAD, &p, &avail);
    if (rc < 0)
        return set_error(c, rc, "out of memory for a frame from %s", c->peer);
    rc = read_some(c, p, avail, &n);
    if (rc < 0)
        return rc;
    coh_frame_rx_commit(&c->rx, n);
    return 0;
}

static int recv_frame(struct cohort_client *c, const uint8_t **frame, size_t *len)
{
    for (;;) {
        int rc = coh_frame_next(&c->rx, frame, len);
        if (rc == 1)
            return 0;
        if (rc < 0)
            return set_error(c, rc, "%s sent a frame larger than max_frame_bytes=%u; closing "
                             "(raise the limit with cohort_opts_set_limits if the model needs "
                             "it)", c->peer, c->o.max_frame_bytes);
        rc = read_into_rx(c, 1);
        if (rc < 0)
            return rc;
    }
}

/* When the next frame is a ModelChunk whose data is its last field, reads that
 * data straight to where it belongs in the model (dst + expected offset):
 * no frame-sized receive buffer, no copy. Returns 1 with *v set when it did,
 * 0 when the frame should go through recv_frame (anything else, or a chunk
 * that does not fit: recv_model reports those), or a negative error. */
static int recv_model_chunk_direct(struct cohort_client *c, uint64_t round, uint64_t off,
                                   uint64_t total, uint8_t *dst, struct coh_chunk_view *v)
{
    struct coh_frame_rx *rx = &c->rx;
    for (;;) {
        size_t have = rx->end - rx->start;
        if (have >= COH_FRAME_HDR) {
            const uint8_t *f = rx->buf + rx->start;
            size_t flen = coh_frame_get_len(f);
            if (flen > rx->max_frame || have >= COH_FRAME_HDR + flen)
                return 0; /* too big (recv_frame says so) or already complete */
            size_t pos;
            int r = coh_wire_peek_chunk_head(f + COH_FRAME_HDR, have - COH_FRAME_HDR, flen,
                                             COH_CHUNK_MODEL, v, &pos);
            if (r < 0 || (r == 0 && have - COH_FRAME_HDR >= COH_CHUNK_HEAD_MAX))
                return 0;
            if (r == 1) {
                if (v->round != round || v->offset != off || v->len > total - off)
                    return 0;
                size_t got = have - COH_FRAME_HDR - pos;
                memcpy(dst + off, f + COH_FRAME_HDR + pos, got);
                rx->start = rx->end = 0;
                while (got < v->len) {
                    size_t n = 0;
                    int rc = read_some(c, dst + off + got, v->len - got, &n);
                    if (rc < 0)
                        return rc;
                    got += n;
                }
                v->data = dst + off;
                return 1;
            }
        }
        /* Not enough to tell yet: read a little more, not the whole frame. */
        int rc = read_into_rx(c, 0);
        if (rc < 0)
            return rc;
    }
}

static const char *body_name(int body_case)
{
    static const char *const names[] = {
        "nothing", "Hello", "Welcome", "RoundOffer", "ModelChunk", "UpdateBegin",
        "UpdateChunk", "UpdateEnd", "UpdateAck", "Decline", "RoundResult", "RunEnd", "Error",
        "Heartbeat", "GossipPush", "GossipAck", "EvalReport",
    };
    if (body_case >= 0 && (size_t)body_case < sizeof names / sizeof names[0])
        return names[body_case];
    return "an unknown message";
}

/* A server error code to return: ours if it is one, else a generic one. */
static int remote_code(int32_t code)
{
    return code < 0 && code > -5000 ? code : COHORT_EREMOTE;
}

/* Messages that may arrive at any time after Welcome. Returns 0 (handled, go
 * on), SESSION_DONE, UNHANDLED or a negative error that ends the connection. */
static int handle_common(struct cohort_client *c, const Cohort__Envelope *env)
{
    struct cohort_event ev = {0};
    switch (env->body_case) {
    case COHORT__ENVELOPE__BODY_HEARTBEAT:
        if (!env->heartbeat->reply)
            return send_heartbeat(c, env->heartbeat->seq, 1);
        return 0;
    case COHORT__ENVELOPE__BODY_ROUND_RESULT: {
        const Cohort__RoundResult *rr = env->round_result;
        log_c(c, COHORT_LOG_INFO, "round %" PRIu64 " committed with %u participant(s), mean "
              "train loss %g%s", rr->round, rr->participants, rr->mean_train_loss,
              rr->final ? " (final round)" : "");
        if (rr->round > c->stats.last_round)
            c->stats.last_round = rr->round;
        ev.kind = COHORT_EV_ROUND_RESULT;
        ev.round = rr->round;
        ev.participants = rr->participants;
        ev.train_loss = rr->mean_train_loss;
        emit(c, &ev);
        return 0;
    }
    case COHORT__ENVELOPE__BODY_UPDATE_ACK: {
        const Cohort__UpdateAck *a = env->update_ack;
        if (a->accepted) {
            c->stats.updates_accepted++;
            log_c(c, COHORT_LOG_INFO, "update for round %" PRIu64 " accepted", a->round);
        } else {
            log_c(c, COHORT_LOG_WARN, "update for round %" PRIu64 " refused by the server: %s",
                  a->round, *a->reason ? a->reason : "no reason given");
        }
        ev.kind = COHORT_EV_UPDATE_ACK;
        ev.round = a->round;
        ev.err = a->accepted ? 0 : COHORT_EREMOTE;
        ev.message = a->reason;
        emit(c, &ev);
        if (c->awaiting_ack && a->round == c->ack_round) {
            c->awaiting_ack = 0;
            if (c->o.once)
                return SESSION_DONE;
        }
        return 0;
    }
    case COHORT__ENVELOPE__BODY_RUN_END: {
        const Cohort__RunEnd *re = env->run_end;
        if (re->done) {
            log_c(c, COHORT_LOG_NOTICE, "the federation run is over after round %" PRIu64 ": %s",
                  re->last_round, *re->reason ? re->reason : "done");
            ev.kind = COHORT_EV_RUN_END;
            ev.round = re->last_round;
            ev.message = re->reason;
            emit(c, &ev);
            return SESSION_DONE;
        }
        return set_error(c, COHORT_ECLOSED, "%s is shutting down (%s); reconnecting later",
                         c->peer, *re->reason ? re->reason : "no reason given");
    }
    case COHORT__ENVELOPE__BODY_ERROR: {
        const Cohort__Error *er = env->error;
        if (er->fatal || er->code == COHORT_EVERSION)
            return set_error(c, er->code == COHORT_EVERSION ? COHORT_EVERSION
                                                            : remote_code(er->code),
                             "%s closed the session with an error: %s (%s)", c->peer,
                             *er->message ? er->message : cohort_strerror(er->code),
                             cohort_err_name(er->code));
        log_c(c, COHORT_LOG_WARN, "%s reported: %s (%s)", c->peer,
              *er->message ? er->message : cohort_strerror(er->code), cohort_err_name(er->code));
        /* A refusal of the upload we wait for settles it as an ack would. */
        if (c->awaiting_ack && er->round == c->ack_round) {
            c->awaiting_ack = 0;
            ev.kind = COHORT_EV_UPDATE_ACK;
            ev.round = er->round;
            ev.err = remote_code(er->code);
            ev.message = er->message;
            emit(c, &ev);
            if (c->o.once)
                return SESSION_DONE;
        }
        return 0;
    }
    default:
        return UNHANDLED;
    }
}

static int unexpected(struct cohort_client *c, const char *what, const char *where)
{
    return set_error(c, COHORT_ESTATE, "%s sent %s %s; closing the connection (server and "
                     "library disagree about the protocol)", c->peer, what, where);
}

/* ---- rounds ------------------------------------------------------------- */

static int cmp_name_ptr(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int layout_equal(const struct coh_client_layout *l, const Cohort__RoundOffer *of)
{
    if (!l->info || l->ntensors != of->n_tensors)
        return 0;
    for (size_t i = 0; i < of->n_tensors; i++) {
        const Cohort__TensorInfo *t = of->tensors[i];
        const struct cohort_tensor_info *ti = &l->info[i];
        if ((size_t)ti->ndim != t->n_shape || strcmp(ti->name, t->name) != 0 ||
            (t->n_shape && memcmp(ti->shape, t->shape, t->n_shape * sizeof *t->shape) != 0))
            return 0;
    }
    return 1;
}

/* Checks the offer's tensor table and sizes; *numel gets the float count.
 * Allocates only a small pointer array for the uniqueness check. */
static int check_offer(struct cohort_client *c, const Cohort__RoundOffer *of, size_t *numel)
{
    uint64_t r = of->round;
    if (of->n_tensors == 0 || of->n_tensors > COH_CLIENT_MAX_TENSORS)
        return set_error(c, COHORT_ESHAPE, "offer for round %" PRIu64 " has %zu tensors "
                         "(allowed 1..%u); closing", r, of->n_tensors, COH_CLIENT_MAX_TENSORS);
    uint64_t limit = c->o.max_model_bytes / 4, total = 0;
    for (size_t i = 0; i < of->n_tensors; i++) {
        const Cohort__TensorInfo *t = of->tensors[i];
        size_t nl = strlen(t->name);
        if (nl == 0 || nl > COH_CLIENT_MAX_NAME)
            return set_error(c, COHORT_ESHAPE, "offer for round %" PRIu64 ": tensor %zu has a "
                             "name of %zu bytes (allowed 1..%u); closing", r, i, nl,
                             COH_CLIENT_MAX_NAME);
        if (t->n_shape > COH_CLIENT_MAX_NDIM)
            return set_error(c, COHORT_ESHAPE, "offer for round %" PRIu64 ": tensor '%s' has "
                             "%zu dimensions (at most %d); closing", r, t->name, t->n_shape,
                             COH_CLIENT_MAX_NDIM);
        uint64_t n = 1;
        for (size_t d = 0; d < t->n_shape; d++) {
            uint64_t dim = t->shape[d];
            if (dim != 0 && n > limit / dim)
                return set_error(c, COHORT_ETOOBIG, "offer for round %" PRIu64 ": tensor '%s' "
                                 "alone exceeds max_model_bytes=%" PRIu64 "; closing "
                                 "(raise it with cohort_opts_set_limits)", r, t->name,
                                 c->o.max_model_bytes);
            n *= dim;
        }
        total += n;
        if (total > limit)
            return set_error(c, COHORT_ETOOBIG, "offer for round %" PRIu64 ": the model "
                             "exceeds max_model_bytes=%" PRIu64 "; closing (raise it with "
                             "cohort_opts_set_limits)", r, c->o.max_model_bytes);
    }
    if (total == 0)
        return set_error(c, COHORT_ESHAPE, "offer for round %" PRIu64 " describes an empty "
                         "model; closing", r);
    if (of->total_bytes != total * 4)
        return set_error(c, COHORT_ESHAPE, "offer for round %" PRIu64 " announces %" PRIu64
                         " bytes but its tensors hold %" PRIu64 " float32 values (%" PRIu64
                         " bytes); closing", r, of->total_bytes, total, total * 4);
    if (of->chunk_count == 0 || of->chunk_count > of->total_bytes)
        return set_error(c, COHORT_EFRAME, "offer for round %" PRIu64 " announces %u chunks "
                         "for %" PRIu64 " bytes; closing", r, of->chunk_count, of->total_bytes);
    if (of->model_xxh3.len != COH_XXH_LEN && of->model_sha256.len != 32)
        return set_error(c, COHORT_EFRAME, "offer for round %" PRIu64 " carries no usable "
                         "model checksum (XXH3-128: %zu bytes, SHA-256: %zu bytes); closing", r,
                         of->model_xxh3.len, of->model_sha256.len);
    if (!layout_equal(&c->lay, of) && of->n_tensors > 1) {
        const char **names = malloc(of->n_tensors * sizeof *names);
        if (!names)
            return set_error(c, COHORT_ENOMEM, "out of memory checking the tensor table");
        for (size_t i = 0; i < of->n_tensors; i++)
            names[i] = of->tensors[i]->name;
        qsort(names, of->n_tensors, sizeof *names, cmp_name_ptr);
        const char *dup = NULL;
        for (size_t i = 1; i < of->n_tensors && !dup; i++)
            if (strcmp(names[i - 1], names[i]) == 0)
                dup = names[i];
        int rc = 0;
        if (dup)
            rc = set_error(c, COHORT_ESHAPE, "offer for round %" PRIu64 " names tensor '%s' "
                           "twice; closing", r, dup);
        free(names);
        if (rc < 0)
            return rc;
    }
    *numel = (size_t)total;
    return 0;
}

/* global and params are one buffer in single-buffer mode. */
static void free_model_buffers(struct cohort_client *c)
{
    if (c->global != c->params)
        free(c->global);
    free(c->params);
    c->global = c->params = NULL;
    c->buf_numel = 0;
}

/* Takes the offer's table as the current layout (unless unchanged) and sizes
 * the model buffers. */
static int adopt_layout(struct cohort_client *c, const Cohort__RoundOffer *of, size_t numel)
{
    if (!layout_equal(&c->lay, of)) {
        struct coh_client_layout l = {0};
        size_t names_len = 0;
        for (size_t i = 0; i < of->n_tensors; i++)
            names_len += strlen(of->tensors[i]->name) + 1;
        l.ntensors = of->n_tensors;
        l.info = calloc(l.ntensors, sizeof *l.info);
        l.shapes = calloc(l.ntensors * COH_CLIENT_MAX_NDIM, sizeof *l.shapes);
        l.names = malloc(names_len);
        if (!l.info || !l.shapes || !l.names) {
            layout_fini(&l);
            return set_error(c, COHORT_ENOMEM, "out of memory for the tensor table");
        }
        char *np = l.names;
        size_t off = 0;
        for (size_t i = 0; i < l.ntensors; i++) {
            const Cohort__TensorInfo *t = of->tensors[i];
            struct cohort_tensor_info *ti = &l.info[i];
            size_t nl = strlen(t->name) + 1;
            memcpy(np, t->name, nl);
            ti->name = np;
            np += nl;
            uint64_t *sh = l.shapes + i * COH_CLIENT_MAX_NDIM;
            size_t n = 1;
            for (size_t d = 0; d < t->n_shape; d++) {
                sh[d] = t->shape[d];
                n *= (size_t)t->shape[d];
            }
            ti->ndim = (int)t->n_shape;
            ti->shape = sh;
            ti->offset = off;
            ti->numel = n;
            off += n;
        }
        l.numel = off;
        layout_fini(&c->lay);
        c->lay = l;
    }
    /* One buffer only with a server that takes trained weights: the received model
     * is needed to make a difference for one that does not. */
    int single = c->o.single_buffer && (of->accepts_weights || of->evaluate_only);
    if (c->buf_numel != numel || (c->params == c->global) != single) {
        /* Free first so the peak stays at two models, not four. */
        free_model_buffers(c);
        int copies = single ? 1 : 2;
        c->params = malloc(numel * sizeof(float));
        c->global = c->params && copies == 2 ? malloc(numel * sizeof(float)) : c->params;
        if (!c->global) {
            free_model_buffers(c);
            layout_fini(&c->lay);
            return set_error(c, COHORT_ENOMEM, "out of memory for a model of %zu bytes (%d "
                             "%s needed)", numel * sizeof(float), copies,
                             copies == 1 ? "copy is" : "copies are");
        }
        c->buf_numel = numel;
    }
    return 0;
}

/* XXH3-128 with servers that announce it, SHA-256 with older ones (protocol.md). */
static void checksum_update(struct cohort_client *c, int use_xxh, const void *p, size_t n)
{
    if (use_xxh)
        coh_xxh_update(c->xxh, p, n);
    else
        EVP_DigestUpdate(c->md, p, n);
}

/* Receives the offer's model chunks into c->global and checks the checksum. */
static int recv_model(struct cohort_client *c, const Cohort__RoundOffer *of)
{
    uint64_t round = of->round, off = 0;
    uint8_t *dst = (uint8_t *)c->global;
    int use_xxh = of->model_xxh3.len == COH_XXH_LEN;
    c->srv_xxh3 = use_xxh;
    if (use_xxh)
        coh_xxh_reset(c->xxh);
    else
        EVP_DigestInit_ex(c->md, EVP_sha256(), NULL);
    for (uint32_t i = 0; i < of->chunk_count;) {
        const uint8_t *f;
        size_t flen;
        struct coh_chunk_view v;
        int rc = recv_model_chunk_direct(c, round, off, of->total_bytes, dst, &v);
        if (rc < 0)
            return rc;
        if (rc == 1) {
            checksum_update(c, use_xxh, v.data, v.len);
            off += v.len;
            i++;
            continue;
        }
        rc = recv_frame(c, &f, &flen);
        if (rc < 0)
            return rc;
        Cohort__Envelope *env = NULL;
        rc = coh_wire_peek_chunk(f, flen, &v);
        if (rc == 0) {
            rc = coh_wire_decode(f, flen, &env);
            if (rc == 0 && env->body_case == COHORT__ENVELOPE__BODY_MODEL_CHUNK) {
                const Cohort__ModelChunk *mc = env->model_chunk;
                v.kind = COH_CHUNK_MODEL;
                v.round = mc->round;
                v.offset = mc->offset;
                v.index = mc->index;
                v.data = mc->data.data;
                v.len = mc->data.len;
                rc = 1;
            } else if (rc == 0) {
                /* Heartbeats and notices may be interleaved with the chunks. */
                rc = handle_common(c, env);
                int bc = env->body_case;
                coh_wire_free(env);
                if (rc == UNHANDLED)
                    return unexpected(c, body_name(bc), "in the middle of a model transfer");
                if (rc != 0)
                    return rc;
                continue;
            }
        }
        if (rc < 0) {
            coh_wire_free(env);
            return set_error(c, COHORT_EFRAME, "%s sent a malformed frame during the model "
                             "transfer of round %" PRIu64 "; closing", c->peer, round);
        }
        if (v.kind != COH_CHUNK_MODEL) {
            coh_wire_free(env);
            return unexpected(c, "an UpdateChunk", "in the middle of a model transfer");
        }
        if (v.round != round || v.offset != off || v.len > of->total_bytes - off) {
            coh_wire_free(env);
            return set_error(c, COHORT_EFRAME, "model chunk %u of round %" PRIu64 " does not "
                             "fit the offer (round %" PRIu64 ", offset %" PRIu64 ", %zu bytes; "
                             "expected offset %" PRIu64 " of %" PRIu64 "); closing", i, round,
                             v.round, v.offset, v.len, off, of->total_bytes);
        }
        memcpy(dst + off, v.data, v.len);
        checksum_update(c, use_xxh, v.data, v.len);
        off += v.len;
        i++;
        coh_wire_free(env);
    }
    if (off != of->total_bytes)
        return set_error(c, COHORT_EFRAME, "the %u model chunks of round %" PRIu64 " hold %"
                         PRIu64 " of the %" PRIu64 " announced bytes; closing", of->chunk_count,
                         round, off, of->total_bytes);
    uint8_t md[EVP_MAX_MD_SIZE];
    unsigned mdlen = 0;
    int bad;
    if (use_xxh) {
        coh_xxh_final(c->xxh, md);
        bad = memcmp(md, of->model_xxh3.data, COH_XXH_LEN) != 0;
    } else {
        EVP_DigestFinal_ex(c->md, md, &mdlen);
        bad = mdlen != 32 || memcmp(md, of->model_sha256.data, 32) != 0;
    }
    if (bad)
        return set_error(c, COHORT_ECHECKSUM, "the model of round %" PRIu64 " does not match "
                         "its %s (corrupted?); reconnecting", round,
                         use_xxh ? "XXH3-128" : "SHA-256");
    swap_f32(c->global, (size_t)of->total_bytes);
    return 0;
}

static int send_decline(struct cohort_client *c, uint64_t round, const char *reason)
{
    Cohort__Decline d = COHORT__DECLINE__INIT;
    d.round = round;
    d.reason = (char *)reason;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_DECLINE;
    e.decline = &d;
    int rc = send_msg(c, &e);
    if (rc == 0) {
        c->stats.declines_sent++;
        log_c(c, COHORT_LOG_INFO, "declined round %" PRIu64 ": %s", round, reason);
    }
    return rc;
}

/* Sends update (numel floats) as UpdateBegin, chunks, UpdateEnd. */
static int send_update(struct cohort_client *c, uint64_t round, uint64_t num_examples,
                       double train_loss, const float *update, int weights)
{
    size_t total = c->lay.numel * sizeof(float);
    Cohort__TensorInfo *ti = calloc(c->lay.ntensors, sizeof *ti);
    Cohort__TensorInfo **tp = calloc(c->lay.ntensors, sizeof *tp);
    if (!ti || !tp) {
        free(ti);
        free(tp);
        return set_error(c, COHORT_ENOMEM, "out of memory for the update's tensor table");
    }
    for (size_t i = 0; i < c->lay.ntensors; i++) {
        cohort__tensor_info__init(&ti[i]);
        ti[i].name = (char *)c->lay.info[i].name;
        ti[i].n_shape = (size_t)c->lay.info[i].ndim;
        ti[i].shape = c->lay.shapes + i * COH_CLIENT_MAX_NDIM;
        tp[i] = &ti[i];
    }
    Cohort__UpdateBegin ub = COHORT__UPDATE_BEGIN__INIT;
    ub.round = round;
    ub.num_examples = num_examples;
    ub.n_tensors = c->lay.ntensors;
    ub.tensors = tp;
    ub.total_bytes = total;
    ub.weights = weights;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_UPDATE_BEGIN;
    e.update_begin = &ub;
    int rc = send_msg(c, &e);
    free(ti);
    free(tp);
    if (rc < 0)
        return rc;

    /* Chunks stay within the server's frame limit and hold whole floats. */
    size_t chunk = c->o.chunk_bytes;
    if (c->srv_max_frame && c->srv_max_frame > 2 * CHUNK_OVERHEAD &&
        chunk > c->srv_max_frame - CHUNK_OVERHEAD)
        chunk = c->srv_max_frame - CHUNK_OVERHEAD;
    chunk &= ~(size_t)3;
    /* Each chunk frame goes out in record-sized pieces (its head with the first
     * data, then data), so the transmit buffer is 16 KiB whatever the chunk. */
    rc = tx_reserve(c, TX_PIECE + COH_CHUNK_HEAD_MAX);
    if (rc < 0)
        return rc;
    /* XXH3-128 for servers that announced it with the model, SHA-256 otherwise
     * (an older cohortd accepts only that). */
    int use_xxh = c->srv_xxh3;
    if (use_xxh)
        coh_xxh_reset(c->xxh);
    else
        EVP_DigestInit_ex(c->md, EVP_sha256(), NULL);
    const uint8_t *src = (const uint8_t *)update;
    uint32_t index = 0;
    gather_begin(c);
    for (size_t off = 0; off < total; off += chunk, index++) {
        size_t n = total - off < chunk ? total - off : chunk, pos;
        (void)coh_wire_write_chunk(c->tx, COH_CHUNK_UPDATE, round, index, off, NULL, n, &pos);
        for (size_t done = 0; done < n;) {
            /* Whole floats per piece, so they can be put in wire order here, and at
             * most one TLS record's worth (16 KiB with the head), so no piece ends
             * in a small record of its own. */
            size_t room = (TX_PIECE - pos) & ~(size_t)3;
            size_t k = n - done < room ? n - done : room;
            if (pos == 0 && host_is_little_endian()) {
                /* Already in wire order: OpenSSL encrypts straight from params. */
                checksum_update(c, use_xxh, src + off + done, k);
                rc = write_all(c, src + off + done, k);
            } else {
                memcpy(c->tx + pos, src + off + done, k);
                swap_f32(c->tx + pos, k);
                checksum_update(c, use_xxh, c->tx + pos, k);
                rc = write_all(c, c->tx, pos + k);
            }
            if (rc < 0) {
                if (c->glen > c->goff)
                    c->tls_broken = 1; /* records dropped: see gather_end */
                c->gather = 0;
                c->glen = c->goff = 0;
                return rc;
            }
            done += k;
            pos = 0;
        }
    }
    rc = gather_end(c);
    if (rc < 0)
        return rc;
    uint8_t md[EVP_MAX_MD_SIZE];
    unsigned mdlen = 0;
    Cohort__UpdateEnd ue = COHORT__UPDATE_END__INIT;
    ue.round = round;
    if (use_xxh) {
        coh_xxh_final(c->xxh, md);
        ue.xxh3.data = md;
        ue.xxh3.len = COH_XXH_LEN;
    } else {
        EVP_DigestFinal_ex(c->md, md, &mdlen);
        ue.sha256.data = md;
        ue.sha256.len = mdlen;
    }
    ue.train_loss = train_loss;
    e.body_case = COHORT__ENVELOPE__BODY_UPDATE_END;
    e.update_end = &ue;
    rc = send_msg(c, &e);
    if (rc < 0)
        return rc;
    c->stats.updates_sent++;
    log_c(c, COHORT_LOG_INFO, "sent the update for round %" PRIu64 " (%zu bytes, %" PRIu64
          " examples)", round, total, num_examples);
    return 0;
}

/* Receives the offered model (numel floats, layout already adopted) and hands it to the
 * callback in *r, storing the callback's result in *cb. Returns recv_model's nonzero result,
 * COHORT_ECANCELED when the client was stopped while the callback ran, else 0. */
static int receive_and_call(struct cohort_client *c, const Cohort__RoundOffer *of,
                            size_t numel, cohort_train_fn fn, void *user, struct cohort_round *r,
                            int *cb)
{
    int rc = recv_model(c, of);
    if (rc != 0)
        return rc;
    /* The callback may take long: do not hold the last chunk's receive buffer meanwhile. */
    coh_frame_rx_trim(&c->rx, RX_KEEP);
    if (c->o.prefill && c->params != c->global)
        memcpy(c->params, c->global, numel * sizeof(float));
    memset(r, 0, sizeof *r);
    r->round = of->round;
    r->ntensors = c->lay.ntensors;
    r->tensors = c->lay.info;
    r->numel = numel;
    r->global = c->global;
    r->params = c->params;
    r->num_examples = c->o.num_examples;
    r->train_loss = NAN;
    if (of->evaluate_only) {
        r->evaluate = 1;
        r->model_round = of->model_round;
    }
    *cb = fn(r, user);
    /* Silence while the callback ran says nothing about the link. */
    c->last_rx_ms = mono_ms();
    return stopped(c) ? COHORT_ECANCELED : 0;
}

/* An evaluation offer (evaluators only): model in, callback, EvalReport out. */
static int do_eval(struct cohort_client *c, const Cohort__RoundOffer *of, cohort_train_fn fn,
                   void *user)
{
    size_t numel = 0;
    int rc = check_offer(c, of, &numel);
    if (rc == 0)
        rc = adopt_layout(c, of, numel);
    if (rc != 0)
        return rc;
    struct cohort_round r;
    int cb;
    rc = receive_and_call(c, of, numel, fn, user, &r, &cb);
    if (rc != 0)
        return rc;
    if (cb < 0) {
        log_c(c, COHORT_LOG_WARN, "the evaluation of round %" PRIu64 " failed: %s; reporting "
              "no metrics", of->model_round, cohort_strerror(cb));
        r.nmetrics = 0;
    }
    size_t n = r.nmetrics <= 16 ? r.nmetrics : 16;
    Cohort__EvalReport__MetricsEntry ents[16], *ptrs[16];
    for (size_t i = 0; i < n; i++) {
        cohort__eval_report__metrics_entry__init(&ents[i]);
        r.metrics[i].name[sizeof r.metrics[i].name - 1] = '\0';
        ents[i].key = r.metrics[i].name;
        ents[i].value = r.metrics[i].value;
        ptrs[i] = &ents[i];
    }
    Cohort__EvalReport er = COHORT__EVAL_REPORT__INIT;
    er.round = of->model_round;
    er.n_metrics = n;
    er.metrics = ptrs;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_EVAL_REPORT;
    e.eval_report = &er;
    rc = send_msg(c, &e);
    if (rc < 0)
        return rc;
    log_c(c, COHORT_LOG_INFO, "sent the evaluation of round %" PRIu64 " (%zu metrics)",
          of->model_round, n);
    return c->o.once ? SESSION_DONE : 0;
}

/* One offered round: model in, callback, update or decline out. */
static int do_round(struct cohort_client *c, const Cohort__RoundOffer *of, cohort_train_fn fn,
                    void *user)
{
    if (of->evaluate_only) {
        if (c->o.role != COHORT_ROLE_EVALUATOR)
            return unexpected(c, "an evaluation offer", "to a trainer");
        return do_eval(c, of, fn, user);
    }
    if (c->o.role == COHORT_ROLE_EVALUATOR)
        return unexpected(c, "a training offer", "to an evaluator");
    uint64_t round = of->round;
    c->stats.rounds_offered++;
    if (round > c->stats.last_round)
        c->stats.last_round = round;
    if (c->awaiting_ack) {
        log_c(c, COHORT_LOG_WARN, "round %" PRIu64 " offered before the update for round %"
              PRIu64 " was acknowledged", round, c->ack_round);
        c->awaiting_ack = 0;
        if (c->o.once)
            return SESSION_DONE;
    }
    size_t numel = 0;
    int rc = check_offer(c, of, &numel);
    if (rc < 0)
        return rc;
    rc = adopt_layout(c, of, numel);
    if (rc < 0)
        return rc;
    log_c(c, COHORT_LOG_DEBUG, "round %" PRIu64 " offered: %zu tensors, %" PRIu64 " bytes in "
          "%u chunks, deadline %.1f s", round, of->n_tensors, of->total_bytes, of->chunk_count,
          of->deadline_s);
    struct cohort_round r;
    int cb;
    rc = receive_and_call(c, of, numel, fn, user, &r, &cb);
    if (rc != 0)
        return rc;

    char reason[sizeof r.decline_reason + 64];
    if (cb >= 0 && !r.decline && !r.params) {
        cb = COHORT_EINVAL;
        log_c(c, COHORT_LOG_WARN, "the training callback set params to NULL for round %"
              PRIu64, round);
    }
    if (cb < 0) {
        snprintf(reason, sizeof reason, "training callback failed: %s", cohort_strerror(cb));
        rc = send_decline(c, round, reason);
    } else if (r.decline) {
        r.decline_reason[sizeof r.decline_reason - 1] = '\0';
        snprintf(reason, sizeof reason, "%s",
                 r.decline_reason[0] ? r.decline_reason : "declined by the client");
        rc = send_decline(c, round, reason);
    } else {
        /* The update is trained minus received, computed into params; an update
         * the callback gave is sent from wherever it put it. With one buffer the
         * received model is gone, so the trained weights go as they are. */
        const float *up = r.params;
        int weights = !r.out_is_update && c->params == c->global;
        if (!r.out_is_update && !weights) {
            for (size_t i = 0; i < numel; i++)
                c->params[i] = r.params[i] - c->global[i];
            up = c->params;
        }
        rc = send_update(c, round, r.num_examples, r.train_loss, up, weights);
        if (rc == 0) {
            c->awaiting_ack = 1;
            c->ack_round = round;
        }
        c->last_rx_ms = mono_ms();
        return rc;
    }
    if (rc < 0)
        return rc;
    return c->o.once ? SESSION_DONE : 0;
}

/* ---- session ------------------------------------------------------------ */

static int handshake(struct cohort_client *c)
{
    Cohort__Hello h = COHORT__HELLO__INIT;
    h.protocol_version = COH_PROTOCOL_VERSION;
    h.software = (char *)COH_CLIENT_SOFTWARE;
    h.num_examples = c->o.num_examples;
    h.role = (char *)(c->o.role == COHORT_ROLE_EVALUATOR ? "evaluator" : "trainer");
    h.accepts_xxh3 = 1;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_HELLO;
    e.hello = &h;
    c->last_rx_ms = mono_ms();
    int rc = send_msg(c, &e);
    if (rc < 0)
        return rc;

    const uint8_t *f;
    size_t flen;
    rc = recv_frame(c, &f, &flen);
    if (rc < 0)
        return rc;
    Cohort__Envelope *env;
    if (coh_wire_decode(f, flen, &env) < 0)
        return set_error(c, COHORT_EFRAME, "%s answered Hello with a malformed frame (is it a "
                         "cohortd?)", c->peer);
    if (env->body_case == COHORT__ENVELOPE__BODY_ERROR) {
        const Cohort__Error *er = env->error;
        int code = er->code == COHORT_EVERSION ? COHORT_EVERSION : remote_code(er->code);
        rc = set_error(c, code, "%s refused the session: %s (%s)%s", c->peer,
                       *er->message ? er->message : cohort_strerror(er->code),
                       cohort_err_name(er->code),
                       code == COHORT_EVERSION ? "; upgrade libcohort or the server" : "");
        coh_wire_free(env);
        return rc;
    }
    if (env->body_case != COHORT__ENVELOPE__BODY_WELCOME) {
        rc = unexpected(c, body_name(env->body_case), "instead of Welcome");
        coh_wire_free(env);
        return rc;
    }
    const Cohort__Welcome *w = env->welcome;
    if (w->protocol_version != COH_PROTOCOL_VERSION) {
        rc = set_error(c, COHORT_EVERSION, "%s speaks protocol version %u, this library "
                       "version %d; upgrade libcohort or the server", c->peer,
                       w->protocol_version, COH_PROTOCOL_VERSION);
        coh_wire_free(env);
        return rc;
    }
    snprintf(c->client_name, sizeof c->client_name, "%s", w->client_name);
    c->srv_max_frame = w->max_frame_bytes;
    c->srv_hb_ms = w->heartbeat_interval_ms;
    c->connected = 1;
    c->stats.connects++;
    log_c(c, COHORT_LOG_NOTICE, "connected to %s as '%s' (server %s, round %" PRIu64 ")",
          c->peer, c->client_name, *w->server_software ? w->server_software : "unknown",
          w->current_round);
    struct cohort_event ev = {0};
    ev.kind = COHORT_EV_CONNECTED;
    ev.round = w->current_round;
    ev.name = c->client_name;
    coh_wire_free(env);
    emit(c, &ev);
    return 0;
}

/* One connection from connect to close. Returns SESSION_DONE or a negative error. */
static int session(struct cohort_client *c, cohort_train_fn fn, void *user)
{
    int rc = tcp_connect(c);
    if (rc == 0)
        rc = tls_connect(c);
    if (rc == 0)
        rc = handshake(c);
    while (rc == 0) {
        if (stopped(c)) {
            rc = COHORT_ECANCELED;
            break;
        }
        /* Between rounds the receive buffer need not keep a chunk's worth of memory. */
        coh_frame_rx_trim(&c->rx, RX_KEEP);
        const uint8_t *f;
        size_t flen;
        rc = recv_frame(c, &f, &flen);
        if (rc < 0)
            break;
        Cohort__Envelope *env;
        struct coh_chunk_view v;
        if (coh_wire_peek_chunk(f, flen, &v) != 0) {
            rc = unexpected(c, "a chunk", "outside a transfer");
            break;
        }
        if (coh_wire_decode(f, flen, &env) < 0) {
            rc = set_error(c, COHORT_EFRAME, "%s sent a malformed frame; closing", c->peer);
            break;
        }
        if (env->body_case == COHORT__ENVELOPE__BODY_ROUND_OFFER) {
            rc = do_round(c, env->round_offer, fn, user);
        } else {
            rc = handle_common(c, env);
            if (rc == UNHANDLED)
                rc = unexpected(c, body_name(env->body_case), "after Welcome");
        }
        coh_wire_free(env);
    }
    return rc;
}

COHORT_API int cohort_client_run(cohort_client *c, cohort_train_fn fn, void *user)
{
    if (!c || !fn)
        return COHORT_EINVAL;
    if (atomic_flag_test_and_set(&c->running))
        return COHORT_ESTATE;
    c->last_error[0] = '\0';
    if (strchr(c->o.host, ':'))
        snprintf(c->peer, sizeof c->peer, "[%s]:%s", c->o.host, c->o.port);
    else
        snprintf(c->peer, sizeof c->peer, "%s:%s", c->o.host, c->o.port);
    uint64_t backoff = c->o.backoff_initial_ms;
    uint32_t failures = 0;
    int rc;
    for (;;) {
        if (stopped(c)) {
            rc = COHORT_ECANCELED;
            break;
        }
        rc = session(c, fn, user);
        if (rc == COHORT_ECANCELED)
            snprintf(c->last_error, sizeof c->last_error, "stopped by cohort_client_stop()");
        int was_connected = c->connected;
        conn_close(c);
        if (was_connected) {
            /* A session that got as far as Welcome restarts the back-off. */
            backoff = c->o.backoff_initial_ms;
            failures = 0;
            struct cohort_event ev = {0};
            ev.kind = COHORT_EV_DISCONNECTED;
            ev.err = rc == SESSION_DONE ? 0 : rc;
            ev.message = rc == SESSION_DONE ? "" : c->last_error;
            emit(c, &ev);
        }
        if (rc == SESSION_DONE) {
            rc = 0;
            break;
        }
        if (rc == COHORT_ECANCELED || rc == COHORT_EVERSION)
            break;
        failures++;
        if (c->o.max_attempts && failures >= c->o.max_attempts) {
            log_c(c, COHORT_LOG_ERR, "giving up after %u failed attempt(s) in a row: %s",
                  failures, c->last_error);
            break;
        }
        /* +-25% jitter keeps a fleet that lost the server together from
         * reconnecting in lockstep. */
        double j = 0.75 + 0.5 * coh_rng_uniform(&c->rng);
        int64_t delay = (int64_t)((double)backoff * j);
        log_c(c, COHORT_LOG_INFO, "reconnecting to %s in %" PRId64 " ms", c->peer, delay);
        rc = sleep_ms(c, delay);
        if (rc < 0)
            break;
        backoff = backoff * 2 > c->o.backoff_max_ms ? c->o.backoff_max_ms : backoff * 2;
    }
    if (rc == COHORT_ECANCELED)
        snprintf(c->last_error, sizeof c->last_error, "stopped by cohort_client_stop()");
    /* The stop request is consumed by the run it ended; a stop() that comes
     * while no run is active ends the next one at once. */
    atomic_store(&c->stop, 0);
    char buf[64];
    while (read(c->wake[0], buf, sizeof buf) > 0) {
    }
    atomic_flag_clear(&c->running);
    return rc;
}
