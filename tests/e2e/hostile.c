/*
 * hostile: a cohort client that misbehaves on purpose, for tests/e2e/test_hostile.py.
 *
 *   hostile MODE --server HOST:PORT --ca CA --cert C --key K [--round R]
 *                [--model-layout-from-offer | --layout NAME:D0xD1,...] [--examples N]
 *                [--count N] [--timeout-ms MS]
 *
 * It connects (TLS 1.3 unless the mode is about plain text), sends Hello properly unless
 * the mode is about Hello, waits for the RoundOffer and the model chunks when the mode
 * needs a round, then misbehaves as MODE says. It prints one line per observation:
 *
 *   local 127.0.0.1:PORT          our address (the server logs it for unnamed peers)
 *   tls ok | tls failed: WHY       the client side of the handshake
 *   welcome name=N round=R max_frame=M
 *   offer round=R tensors=T bytes=B chunks=C
 *   model complete chunks=C
 *   error code=C fatal=F round=R msg=...    an Error frame from the server
 *   ack round=R accepted=A reason=...       an UpdateAck
 *   result round=R participants=P final=F   a RoundResult
 *   runend done=D reason=...
 *   tls-alert: WHY                 the TLS layer failed (an alert from the server)
 *   closed                         the server closed the connection
 *   timeout WHAT                   nothing arrived in time
 *   PASS: ... | FAIL: ...          the verdict; exit status 0 for PASS, 1 for FAIL, 2 for usage
 *
 * Expected reaction per mode (anything else is FAIL):
 *   plaintext     bytes before TLS: the server closes (it may send a TLS alert first)
 *   nocert, othercca, expired, revoked: no Welcome; the handshake or first read fails
 *                 with a TLS alert, or the server closes
 *   badversion    Hello{protocol_version=99}: Error EVERSION fatal, then closed
 *   bigframe      a length above Welcome.max_frame_bytes: Error ETOOBIG fatal, closed
 *   undecodable   a frame of garbage: Error EFRAME fatal, closed
 *   truncated     half an UpdateBegin frame, then TCP half-close: the server closes
 *   midupload     UpdateBegin + 2 chunks, then half-close: the server closes, no ack
 *   badnames, badshapes, badcount: Error ESHAPE non-fatal, no ack
 *   nan, inf      Error ENONFINITE non-fatal, no ack
 *   huge          every value +-3e38 (finite): with --examples 1e10 the weighted sum
 *                 overflows, so Error ENONFINITE non-fatal, no ack
 *   badchecksum   Error ECHECKSUM non-fatal, no ack (a wrong sha256)
 *   badxxh        Error ECHECKSUM non-fatal, no ack (a wrong XXH3-128)
 *   slowread      not an attack on the server but on its streaming: takes the offer, then
 *                 reads nothing for --count ms (so the model stream stalls part-way through
 *                 a chunk while the round ends), then reads on. PASS when every frame
 *                 decodes, the chunks are contiguous, the model matches the offer's XXH3
 *                 and the RoundResult arrived: no frame was put inside a chunk.
 *   closedround   update for the offered round - 1 (or --round): Error EROUND, no ack
 *   futureround   update for the offered round + 5: Error EROUND, no ack
 *   duplicate     two complete updates back to back: an ack for the first and Error EDUP
 *                 for the second (exactly one ack)
 *   early         Hello + update for --round pipelined while no round is open: Error EROUND
 *   notoffered    Hello + update for --round pipelined, before the offer can have arrived,
 *                 while that round is open: Error EOFFER, no ack
 *   slowloris     an UpdateBegin frame one byte per second: Error ETIMEDOUT fatal and closed
 *                 before the frame is complete
 *   burst         --count connections (default 1000) opened and dropped quickly, some
 *                 mid-handshake, some reset; then a probe (TLS + Hello version 99) must
 *                 still get Error EVERSION
 *   honest        a correct update: ack accepted (checks this program's encoders)
 *   trickle       an honest update sent slowly: UpdateBegin (after --send-delay-ms) and a
 *                 few KiB at once, the rest in 20 pieces spread over --count ms, then
 *                 UpdateEnd; PASS on an ack. Prints "trickle begin t=S" and "trickle acked
 *                 t=S" (CLOCK_MONOTONIC seconds, comparable between processes), so a test
 *                 can tell in which order cohortd took uploads.
 *   offersums     takes the offer and the model: PASS when the model matches the offer's
 *                 XXH3 and the offer has a matching model_sha256 without --accepts-xxh3,
 *                 none with it (the server then never hashes the model with SHA-256)
 * Every update that is sent holds v[i] = ((i % 7) - 3) * 0.01 as float32 (the second one of
 * `duplicate`: 100 times that), num_examples = --examples (default 50).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "checksum.h"
#include "cohort_err.h"
#include "frame.h"
#include "wire.h"

#define MAXT 64
#define UPD_CHUNK 256 /* update chunk payload: several chunks even for a small model */

struct layout {
    size_t n;
    char *names[MAXT];
    uint64_t shapes[MAXT][8];
    size_t ndim[MAXT];
    size_t numel;
};

struct opts {
    const char *mode, *server, *ca, *cert, *key, *layout;
    uint64_t round;
    int have_round;
    uint64_t examples;
    long count;
    int timeout_ms;
    int accepts_xxh3;           /* --accepts-xxh3: set Hello.accepts_xxh3 */
    int send_delay_ms;          /* --send-delay-ms: wait this long before sending an update */
};

struct h {
    struct opts *o;
    int fd;
    SSL_CTX *ctx;
    SSL *ssl;
    struct coh_frame_rx rx;
    int closed, tls_failed;
    char tls_why[256];
    /* what the server said */
    int welcome;
    uint32_t max_frame;
    uint64_t welcome_round;
    int offer;
    uint64_t offer_round;
    uint32_t chunk_count, chunks;
    struct layout offered;
    int nerr;
    int err_codes[64];
    int err_fatal[64];
    int acks, acks_accepted;
    int results;
    /* model stream checks (slowread) */
    int undecodable;
    uint64_t next_off;
    int offsets_bad;
    int offer_has_xxh;
    uint8_t offer_xxh[COH_XXH_LEN];
    struct coh_xxh *xxh;
    int model_ok;               /* the last complete model matched the offer's XXH3 */
    int offer_has_sha;          /* offersums: the offer's model_sha256, when it has one */
    uint8_t offer_sha[32];
    EVP_MD_CTX *md;             /* offersums: sha256 of the model as it arrives */
};

static int small_rcvbuf;        /* slowread: cap our receive buffer so the server's stalls */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static int verdict(int pass, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int verdict(int pass, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    printf("%s: ", pass ? "PASS" : "FAIL");
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
    return pass ? 0 : 1;
}

/* ---- sockets and TLS ---- */

static int split_hp(const char *s, char *host, size_t hl, char *port, size_t pl)
{
    const char *c = strrchr(s, ':');
    if (!c || (size_t)(c - s) >= hl || strlen(c + 1) >= pl)
        return -1;
    memcpy(host, s, (size_t)(c - s));
    host[c - s] = '\0';
    snprintf(port, pl, "%s", c + 1);
    return 0;
}

/* Blocking connect, then non-blocking. Returns fd or -1. */
static int tcp_connect(const char *server, int quiet)
{
    char host[256], port[16];
    if (split_hp(server, host, sizeof host, port, sizeof port) < 0)
        return -1;
    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, port, &hints, &ai) != 0 || !ai)
        return -1;
    int fd = socket(ai->ai_family, SOCK_STREAM, 0);
    if (fd >= 0 && small_rcvbuf) {
        /* Before connect, so the window is small from the start. */
        int sz = 32768;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    }
    if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        if (!quiet)
            say("connect failed: %s", strerror(errno));
        if (fd >= 0)
            close(fd);
        freeaddrinfo(ai);
        return -1;
    }
    freeaddrinfo(ai);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    if (!quiet) {
        struct sockaddr_in sa;
        socklen_t sl = sizeof sa;
        char ip[64] = "?";
        if (getsockname(fd, (struct sockaddr *)&sa, &sl) == 0 && sa.sin_family == AF_INET) {
            inet_ntop(AF_INET, &sa.sin_addr, ip, sizeof ip);
            say("local %s:%d", ip, ntohs(sa.sin_port));
        }
    }
    return fd;
}

static int wait_fd(int fd, short ev, int ms)
{
    struct pollfd p = {.fd = fd, .events = ev};
    int r;
    do
        r = poll(&p, 1, ms < 0 ? 0 : ms);
    while (r < 0 && errno == EINTR);
    return r;
}

static SSL_CTX *make_ctx(const struct opts *o, int with_cert)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        return NULL;
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (SSL_CTX_load_verify_locations(ctx, o->ca, NULL) != 1) {
        say("cannot load --ca %s", o->ca);
        SSL_CTX_free(ctx);
        return NULL;
    }
    if (with_cert) {
        if (SSL_CTX_use_certificate_chain_file(ctx, o->cert) != 1 ||
            SSL_CTX_use_PrivateKey_file(ctx, o->key, SSL_FILETYPE_PEM) != 1) {
            say("cannot load --cert %s / --key %s", o->cert, o->key);
            SSL_CTX_free(ctx);
            return NULL;
        }
    }
    return ctx;
}

static void ssl_why(struct h *h, int rc)
{
    unsigned long e = ERR_peek_last_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    if (r)
        snprintf(h->tls_why, sizeof h->tls_why, "%s", r);
    else if (rc == SSL_ERROR_SYSCALL)
        snprintf(h->tls_why, sizeof h->tls_why, "connection closed (%s)",
                 errno ? strerror(errno) : "EOF");
    else
        snprintf(h->tls_why, sizeof h->tls_why, "TLS error %d", rc);
    ERR_clear_error();
}

/* Returns 0 when the client side of the handshake completed. */
static int tls_handshake(struct h *h, int ms)
{
    h->ssl = SSL_new(h->ctx);
    SSL_set_fd(h->ssl, h->fd);
    SSL_set_connect_state(h->ssl);
    double end = now_s() + ms / 1000.0;
    for (;;) {
        ERR_clear_error();
        int r = SSL_connect(h->ssl);
        if (r == 1) {
            say("tls ok (%s)", SSL_get_version(h->ssl));
            return 0;
        }
        int e = SSL_get_error(h->ssl, r);
        if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
            ssl_why(h, e);
            h->tls_failed = 1;
            h->closed = 1;
            say("tls failed: %s", h->tls_why);
            return -1;
        }
        int left = (int)((end - now_s()) * 1000);
        if (left <= 0 || wait_fd(h->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, left) <= 0) {
            say("timeout during the TLS handshake");
            return -1;
        }
    }
}

static int send_raw(struct h *h, const uint8_t *p, size_t n)
{
    while (n > 0) {
        if (h->ssl) {
            size_t w = 0;
            ERR_clear_error();
            if (SSL_write_ex(h->ssl, p, n, &w)) {
                p += w;
                n -= w;
                continue;
            }
            int e = SSL_get_error(h->ssl, 0);
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
                ssl_why(h, e);
                say("write failed: %s", h->tls_why);
                return -1;
            }
            if (wait_fd(h->fd, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT, 5000) <= 0)
                return -1;
        } else {
            ssize_t w = send(h->fd, p, n, MSG_NOSIGNAL);
            if (w > 0) {
                p += w;
                n -= (size_t)w;
            } else if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
                wait_fd(h->fd, POLLOUT, 5000);
            } else {
                say("write failed: %s", strerror(errno));
                return -1;
            }
        }
    }
    return 0;
}

static int send_env(struct h *h, const Cohort__Envelope *e)
{
    uint8_t *f;
    size_t n;
    if (coh_wire_encode(e, &f, &n) < 0)
        return -1;
    int rc = send_raw(h, f, n);
    free(f);
    return rc;
}

/* ---- frames from the server ---- */

static void on_frame(struct h *h, const uint8_t *f, size_t len)
{
    struct coh_chunk_view v;
    if (coh_wire_peek_chunk(f, len, &v) == 1 && v.kind == COH_CHUNK_MODEL) {
        h->chunks++;
        if (v.offset != h->next_off)
            h->offsets_bad++;
        h->next_off = v.offset + v.len;
        if (h->xxh)
            coh_xxh_update(h->xxh, v.data, v.len);
        if (h->md)
            EVP_DigestUpdate(h->md, v.data, v.len);
        if (h->offer && h->chunks == h->chunk_count) {
            if (h->xxh) {
                uint8_t d[COH_XXH_LEN];
                coh_xxh_final(h->xxh, d);
                h->model_ok = h->offer_has_xxh && memcmp(d, h->offer_xxh, COH_XXH_LEN) == 0;
            }
            uint8_t sd[EVP_MAX_MD_SIZE];
            if (h->md && EVP_DigestFinal_ex(h->md, sd, NULL) && h->offer_has_sha &&
                memcmp(sd, h->offer_sha, 32) != 0)
                h->offer_has_sha = -1; /* present but wrong */
            say("model complete chunks=%u%s", h->chunks,
                h->xxh ? (h->model_ok ? " xxh3 ok" : " xxh3 MISMATCH") : "");
        }
        return;
    }
    Cohort__Envelope *e = NULL;
    if (coh_wire_decode(f, len, &e) < 0) {
        h->undecodable++;
        say("undecodable frame of %zu bytes from the server", len);
        return;
    }
    switch (e->body_case) {
    case COHORT__ENVELOPE__BODY_WELCOME:
        h->welcome = 1;
        h->max_frame = e->welcome->max_frame_bytes;
        h->welcome_round = e->welcome->current_round;
        say("welcome name=%s round=%llu max_frame=%u", e->welcome->client_name,
            (unsigned long long)e->welcome->current_round, e->welcome->max_frame_bytes);
        break;
    case COHORT__ENVELOPE__BODY_ROUND_OFFER: {
        Cohort__RoundOffer *o = e->round_offer;
        h->offer = 1;
        h->offer_round = o->round;
        h->chunk_count = o->chunk_count;
        h->chunks = 0;
        h->next_off = 0;
        h->model_ok = 0;
        h->offer_has_xxh = o->model_xxh3.len == COH_XXH_LEN;
        if (h->offer_has_xxh)
            memcpy(h->offer_xxh, o->model_xxh3.data, COH_XXH_LEN);
        h->offer_has_sha = o->model_sha256.len == 32;
        if (h->offer_has_sha)
            memcpy(h->offer_sha, o->model_sha256.data, 32);
        if (h->xxh)
            coh_xxh_reset(h->xxh);
        if (h->md)
            EVP_DigestInit_ex(h->md, EVP_sha256(), NULL);
        struct layout *l = &h->offered;
        for (size_t i = 0; i < l->n; i++)
            free(l->names[i]);
        memset(l, 0, sizeof *l);
        for (size_t i = 0; i < o->n_tensors && i < MAXT; i++) {
            l->names[i] = strdup(o->tensors[i]->name);
            l->ndim[i] = o->tensors[i]->n_shape < 8 ? o->tensors[i]->n_shape : 8;
            size_t ne = 1;
            for (size_t d = 0; d < l->ndim[i]; d++) {
                l->shapes[i][d] = o->tensors[i]->shape[d];
                ne *= (size_t)o->tensors[i]->shape[d];
            }
            l->numel += ne;
            l->n++;
        }
        say("offer round=%llu tensors=%zu bytes=%llu chunks=%u", (unsigned long long)o->round,
            o->n_tensors, (unsigned long long)o->total_bytes, o->chunk_count);
        break;
    }
    case COHORT__ENVELOPE__BODY_ERROR:
        if (h->nerr < 64) {
            h->err_codes[h->nerr] = e->error->code;
            h->err_fatal[h->nerr] = e->error->fatal;
        }
        h->nerr++;
        say("error code=%d fatal=%d round=%llu msg=%s", e->error->code, (int)e->error->fatal,
            (unsigned long long)e->error->round, e->error->message ? e->error->message : "");
        break;
    case COHORT__ENVELOPE__BODY_UPDATE_ACK:
        h->acks++;
        if (e->update_ack->accepted)
            h->acks_accepted++;
        say("ack round=%llu accepted=%d reason=%s", (unsigned long long)e->update_ack->round,
            (int)e->update_ack->accepted, e->update_ack->reason ? e->update_ack->reason : "");
        break;
    case COHORT__ENVELOPE__BODY_ROUND_RESULT:
        h->results++;
        say("result round=%llu participants=%u final=%d",
            (unsigned long long)e->round_result->round, e->round_result->participants,
            (int)e->round_result->final);
        break;
    case COHORT__ENVELOPE__BODY_RUN_END:
        say("runend done=%d reason=%s", (int)e->run_end->done,
            e->run_end->reason ? e->run_end->reason : "");
        break;
    case COHORT__ENVELOPE__BODY_HEARTBEAT:
        if (!e->heartbeat->reply) {
            Cohort__Heartbeat r = COHORT__HEARTBEAT__INIT;
            r.seq = e->heartbeat->seq;
            r.reply = 1;
            Cohort__Envelope re = COHORT__ENVELOPE__INIT;
            re.body_case = COHORT__ENVELOPE__BODY_HEARTBEAT;
            re.heartbeat = &r;
            send_env(h, &re);
        }
        break;
    default:
        say("message type %d from the server", (int)e->body_case);
        break;
    }
    coh_wire_free(e);
}

/* Reads and handles frames for up to ms milliseconds, or until done(h) is true or the
 * connection is closed. Returns 1 when done(h) became true, 0 otherwise. */
static int pump(struct h *h, int ms, int (*done)(struct h *))
{
    double end = now_s() + ms / 1000.0;
    for (;;) {
        if (done && done(h))
            return 1;
        if (h->closed)
            return 0;
        const uint8_t *f;
        size_t len;
        int r = coh_frame_next(&h->rx, &f, &len);
        if (r == 1) {
            on_frame(h, f, len);
            continue;
        }
        if (r < 0) {
            say("server sent a frame above our limit");
            h->closed = 1;
            return 0;
        }
        uint8_t *p;
        size_t avail;
        if (coh_frame_rx_space(&h->rx, 65536, &p, &avail) < 0)
            return 0;
        int ev = POLLIN;
        if (h->ssl) {
            size_t n = 0;
            ERR_clear_error();
            errno = 0;
            if (SSL_read_ex(h->ssl, p, avail, &n)) {
                coh_frame_rx_commit(&h->rx, n);
                continue;
            }
            int e = SSL_get_error(h->ssl, 0);
            if (e == SSL_ERROR_ZERO_RETURN) {
                say("closed");
                h->closed = 1;
                return done && done(h);
            }
            if (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
                say("closed%s%s", errno ? " with " : "", errno ? strerror(errno) : "");
                h->closed = 1;
                return done && done(h);
            }
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
                ssl_why(h, e);
                h->tls_failed = 1;
                say("tls-alert: %s", h->tls_why);
                say("closed");
                h->closed = 1;
                return done && done(h);
            }
            ev = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
        } else {
            ssize_t n = recv(h->fd, p, avail, 0);
            if (n > 0) {
                say("received %zd bytes%s", n,
                    p[0] == 0x15 ? " (a TLS alert record)" : "");
                /* Plain text mode: just count, never parse as frames. */
                continue;
            }
            if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
                say("closed%s%s", n < 0 ? " with " : "", n < 0 ? strerror(errno) : "");
                h->closed = 1;
                return done && done(h);
            }
        }
        int left = (int)((end - now_s()) * 1000);
        if (left <= 0)
            return 0;
        wait_fd(h->fd, (short)ev, left);
    }
}

static int got_welcome(struct h *h) { return h->welcome; }
static int got_model(struct h *h) { return h->offer && h->chunks >= h->chunk_count; }
static int got_error(struct h *h) { return h->nerr > 0; }
static int got_ack(struct h *h) { return h->acks > 0; }
static int got_ack_and_error(struct h *h) { return h->acks > 0 && h->nerr > 0; }

/* ---- messages we send ---- */

static int hello(struct h *h, uint32_t version, int send_now, uint8_t **out, size_t *outlen)
{
    Cohort__Hello m = COHORT__HELLO__INIT;
    m.protocol_version = version;
    m.software = "cohort hostile test client";
    m.num_examples = h->o->examples;
    m.role = "trainer";
    m.accepts_xxh3 = h->o->accepts_xxh3;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_HELLO;
    e.hello = &m;
    if (!send_now)
        return coh_wire_encode(&e, out, outlen);
    return send_env(h, &e);
}

struct buf {
    uint8_t *p;
    size_t n, cap;
};

static void buf_put(struct buf *b, const void *p, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 1024;
        b->p = realloc(b->p, b->cap);
        if (!b->p) {
            fprintf(stderr, "out of memory\n");
            exit(2);
        }
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
}

static void buf_env(struct buf *b, const Cohort__Envelope *e)
{
    uint8_t *f;
    size_t n;
    if (coh_wire_encode(e, &f, &n) < 0) {
        fprintf(stderr, "encode failed\n");
        exit(2);
    }
    buf_put(b, f, n);
    free(f);
}

static float *pattern(size_t n, float scale)
{
    float *v = malloc((n ? n : 1) * sizeof *v);
    for (size_t i = 0; i < n; i++)
        v[i] = (float)((double)((long)(i % 7) - 3) * 0.01 * scale);
    return v;
}

static void buf_begin(struct buf *b, uint64_t round, const struct layout *l, uint64_t examples,
                      uint64_t total_bytes)
{
    Cohort__TensorInfo ti[MAXT], *tp[MAXT];
    for (size_t i = 0; i < l->n; i++) {
        cohort__tensor_info__init(&ti[i]);
        ti[i].name = l->names[i];
        ti[i].n_shape = l->ndim[i];
        ti[i].shape = (uint64_t *)l->shapes[i];
        tp[i] = &ti[i];
    }
    Cohort__UpdateBegin m = COHORT__UPDATE_BEGIN__INIT;
    m.round = round;
    m.num_examples = examples;
    m.n_tensors = l->n;
    m.tensors = tp;
    m.total_bytes = total_bytes;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_UPDATE_BEGIN;
    e.update_begin = &m;
    buf_env(b, &e);
}

/* Appends chunk frames of data[0..n) starting at byte offset 0, at most max_chunks. */
static void buf_chunks(struct buf *b, uint64_t round, const uint8_t *data, size_t n,
                       long max_chunks)
{
    uint8_t fr[UPD_CHUNK + 128];
    long k = 0;
    for (size_t off = 0; off < n && (max_chunks < 0 || k < max_chunks); off += UPD_CHUNK, k++) {
        size_t dl = n - off < UPD_CHUNK ? n - off : UPD_CHUNK;
        size_t fl = coh_wire_write_chunk(fr, COH_CHUNK_UPDATE, round, 0, off, data + off, dl, NULL);
        buf_put(b, fr, fl);
    }
}

/* corrupt: 0 honest (XXH3-128, as libcohort sends), 1 a wrong sha256 (the
 * older checksum, still accepted), 2 a wrong XXH3-128. */
static void buf_end(struct buf *b, uint64_t round, const uint8_t *data, size_t n, int corrupt)
{
    uint8_t sha[32], xxh[COH_XXH_LEN];
    Cohort__UpdateEnd m = COHORT__UPDATE_END__INIT;
    m.round = round;
    if (corrupt == 1) {
        SHA256(data, n, sha);
        sha[0] ^= 0x5a;
        m.sha256.data = sha;
        m.sha256.len = 32;
    } else {
        coh_xxh128(data, n, xxh);
        if (corrupt == 2)
            xxh[0] ^= 0x5a;
        m.xxh3.data = xxh;
        m.xxh3.len = COH_XXH_LEN;
    }
    m.train_loss = 0.5;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_UPDATE_END;
    e.update_end = &m;
    buf_env(b, &e);
}

/* A whole update (begin, chunks, end) for round with layout l and values v. */
static void buf_update(struct buf *b, uint64_t round, const struct layout *l, const float *v,
                       size_t numel, uint64_t examples, int corrupt_sha)
{
    buf_begin(b, round, l, examples, (uint64_t)numel * 4);
    buf_chunks(b, round, (const uint8_t *)v, numel * 4, -1);
    buf_end(b, round, (const uint8_t *)v, numel * 4, corrupt_sha);
}

static int parse_layout(const char *spec, struct layout *l)
{
    memset(l, 0, sizeof *l);
    char *s = strdup(spec), *save = NULL;
    for (char *tok = strtok_r(s, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *colon = strrchr(tok, ':');
        if (!colon || l->n >= MAXT) {
            free(s);
            return -1;
        }
        *colon = '\0';
        size_t i = l->n++;
        l->names[i] = strdup(tok);
        size_t ne = 1;
        char *save2 = NULL;
        for (char *d = strtok_r(colon + 1, "x", &save2); d; d = strtok_r(NULL, "x", &save2)) {
            if (l->ndim[i] >= 8) {
                free(s);
                return -1;
            }
            l->shapes[i][l->ndim[i]++] = strtoull(d, NULL, 10);
            ne *= (size_t)strtoull(d, NULL, 10);
        }
        l->numel += ne;
    }
    free(s);
    return l->n ? 0 : -1;
}

/* ---- modes ---- */

/* Exactly one Error, with code (and fatality when fatal >= 0). */
static int only_error(const struct h *h, int code, int fatal)
{
    return h->nerr == 1 && h->err_codes[0] == code && (fatal < 0 || h->err_fatal[0] == fatal);
}

static int connect_tls(struct h *h, int with_cert)
{
    h->fd = tcp_connect(h->o->server, 0);
    if (h->fd < 0)
        return -1;
    h->ctx = make_ctx(h->o, with_cert);
    if (!h->ctx)
        return -1;
    return tls_handshake(h, h->o->timeout_ms);
}

/* TLS, Hello, Welcome. */
static int join(struct h *h)
{
    if (connect_tls(h, 1) < 0)
        return -1;
    if (hello(h, COH_PROTOCOL_VERSION, 1, NULL, NULL) < 0)
        return -1;
    if (!pump(h, h->o->timeout_ms, got_welcome)) {
        say("timeout waiting for Welcome");
        return -1;
    }
    return 0;
}

/* join, then the RoundOffer and all model chunks. */
static int join_round(struct h *h)
{
    if (join(h) < 0)
        return -1;
    if (!pump(h, h->o->timeout_ms, got_model)) {
        say("timeout waiting for the round offer and model");
        return -1;
    }
    return 0;
}

static const struct layout *update_layout(struct h *h)
{
    static struct layout given;
    if (h->o->layout) {
        if (!given.n && parse_layout(h->o->layout, &given) < 0) {
            fprintf(stderr, "hostile: bad --layout '%s'\n", h->o->layout);
            exit(2);
        }
        return &given;
    }
    return &h->offered;
}

static void half_close(struct h *h)
{
    shutdown(h->fd, SHUT_WR);
    say("half-closed our side");
}

static int mode_refused_tls(struct h *h, int with_cert)
{
    if (connect_tls(h, with_cert) < 0) {
        if (h->tls_failed)
            return verdict(1, "handshake refused: %s", h->tls_why);
        return verdict(0, "could not reach the server");
    }
    /* TLS 1.3: the server verifies our certificate after our side has finished. Let its
     * verdict (an alert) arrive before we send anything, then try Hello. */
    pump(h, 1000, NULL);
    if (!h->closed) {
        hello(h, COH_PROTOCOL_VERSION, 1, NULL, NULL);
        pump(h, h->o->timeout_ms, got_welcome);
    }
    if (h->welcome)
        return verdict(0, "the server accepted the connection (Welcome)");
    if (!h->closed)
        return verdict(0, "the connection is still open after %d ms", h->o->timeout_ms);
    return verdict(1, "refused without a Welcome%s%s", h->tls_failed ? ": " : "",
                   h->tls_failed ? h->tls_why : "");
}

static int mode_plaintext(struct h *h)
{
    h->fd = tcp_connect(h->o->server, 0);
    if (h->fd < 0)
        return verdict(0, "could not connect");
    uint8_t *f;
    size_t n;
    hello(h, COH_PROTOCOL_VERSION, 0, &f, &n);
    int rc = send_raw(h, f, n);
    free(f);
    if (rc < 0)
        return verdict(1, "the server closed before we finished writing");
    pump(h, h->o->timeout_ms, NULL);
    return verdict(h->closed, h->closed ? "the server closed the plain-text connection"
                                        : "the connection is still open");
}

static int mode_badversion(struct h *h)
{
    if (connect_tls(h, 1) < 0)
        return verdict(0, "TLS failed");
    hello(h, 99, 1, NULL, NULL);
    pump(h, h->o->timeout_ms, NULL);
    int ok = !h->welcome && only_error(h, COHORT_EVERSION, 1) && h->closed;
    return verdict(ok, "expected Error EVERSION fatal and a close, no Welcome");
}

static int mode_bigframe(struct h *h)
{
    if (join_round(h) < 0)
        return verdict(0, "no round");
    uint32_t big = h->max_frame + 1;
    uint8_t hdr[4 + 64] = {0};
    coh_frame_put_len(hdr, big);
    say("announcing a frame of %u bytes", big);
    send_raw(h, hdr, sizeof hdr);
    pump(h, h->o->timeout_ms, NULL);
    int ok = only_error(h, COHORT_ETOOBIG, 1) && h->closed;
    return verdict(ok, "expected Error ETOOBIG fatal and a close");
}

static int mode_undecodable(struct h *h)
{
    if (join_round(h) < 0)
        return verdict(0, "no round");
    uint8_t fr[4 + 16];
    coh_frame_put_len(fr, 16);
    memset(fr + 4, 0xff, 16); /* field 31, wire type 7: not protobuf */
    send_raw(h, fr, sizeof fr);
    pump(h, h->o->timeout_ms, NULL);
    int ok = only_error(h, COHORT_EFRAME, 1) && h->closed;
    return verdict(ok, "expected Error EFRAME fatal and a close");
}

static int mode_truncated(struct h *h)
{
    if (join_round(h) < 0)
        return verdict(0, "no round");
    const struct layout *l = update_layout(h);
    struct buf b = {0};
    buf_begin(&b, h->offer_round, l, h->o->examples, (uint64_t)l->numel * 4);
    say("sending %zu of the %zu bytes of an UpdateBegin frame", b.n / 2, b.n);
    send_raw(h, b.p, b.n / 2);
    free(b.p);
    half_close(h);
    pump(h, h->o->timeout_ms, NULL);
    int ok = h->closed && h->nerr == 0 && h->acks == 0;
    return verdict(ok, "expected the server to close, without an Error or ack");
}

static int mode_midupload(struct h *h)
{
    if (join_round(h) < 0)
        return verdict(0, "no round");
    const struct layout *l = update_layout(h);
    float *v = pattern(l->numel, 1);
    struct buf b = {0};
    buf_begin(&b, h->offer_round, l, h->o->examples, (uint64_t)l->numel * 4);
    buf_chunks(&b, h->offer_round, (const uint8_t *)v, l->numel * 4, 2);
    send_raw(h, b.p, b.n);
    say("sent UpdateBegin and 2 chunks of %zu bytes", (size_t)l->numel * 4);
    free(b.p);
    free(v);
    /* Let the server take the begin and chunks before we go. */
    pump(h, 300, NULL);
    half_close(h);
    pump(h, h->o->timeout_ms, NULL);
    int ok = h->closed && h->nerr == 0 && h->acks == 0;
    return verdict(ok, "expected the server to close, without an Error or ack");
}

static int mode_trickle(struct h *h)
{
    if (join_round(h) < 0)
        return verdict(0, "no round");
    const struct layout *l = update_layout(h);
    float *v = pattern(l->numel, 1);
    struct buf b = {0};
    buf_update(&b, h->offer_round, l, v, l->numel, h->o->examples, 0);
    free(v);
    if (h->o->send_delay_ms > 0)
        pump(h, h->o->send_delay_ms, NULL);
    size_t first = b.n < 4096 ? b.n : 4096, pieces = 20;
    say("trickle begin t=%.6f", now_s());
    int rc = send_raw(h, b.p, first);
    for (size_t k = 0; k < pieces && rc == 0; k++) {
        size_t lo = first + (b.n - first) * k / pieces, hi = first + (b.n - first) * (k + 1) / pieces;
        pump(h, (int)(h->o->count / (long)pieces), NULL);
        rc = send_raw(h, b.p + lo, hi - lo);
    }
    free(b.p);
    if (rc < 0)
        return verdict(0, "the update could not be sent");
    say("trickle sent t=%.6f", now_s());
    pump(h, h->o->timeout_ms, got_ack);
    if (h->acks_accepted == 1)
        say("trickle acked t=%.6f", now_s());
    return verdict(h->acks_accepted == 1 && h->nerr == 0, "expected UpdateAck accepted and no "
                   "Error");
}

/* Sends one update after the model arrived, built by the mode, and waits for errors. */
static int mode_update(struct h *h, int code, const char *what)
{
    if (join_round(h) < 0)
        return verdict(0, "no round");
    struct layout l = *update_layout(h);
    size_t numel = l.numel;
    float *v = pattern(numel, 1);
    uint64_t round = h->offer_round;
    int corrupt = 0;
    const char *m = h->o->mode;
    if (!strcmp(m, "badnames")) {
        l.names[0] = "evil.weight";
    } else if (!strcmp(m, "badshapes")) {
        /* Same element count, other shape: only the shape check can catch it. */
        if (l.ndim[0] >= 2) {
            uint64_t t = l.shapes[0][0];
            l.shapes[0][0] = l.shapes[0][1];
            l.shapes[0][1] = t;
            if (l.shapes[0][0] == l.shapes[0][1]) {
                l.shapes[0][0] *= l.shapes[0][1];
                l.ndim[0] = 1;
            }
        } else {
            l.shapes[0][1] = 1;
            l.ndim[0] = 2;
        }
    } else if (!strcmp(m, "badcount")) {
        l.n--; /* the values still cover the whole model; only the table is short */
    } else if (!strcmp(m, "nan")) {
        v[numel / 2] = NAN;
    } else if (!strcmp(m, "inf")) {
        v[numel / 2] = INFINITY;
    } else if (!strcmp(m, "huge")) {
        for (size_t i = 0; i < numel; i++)
            v[i] = (i % 2 ? -3e38f : 3e38f); /* finite, but not times a big weight */
    } else if (!strcmp(m, "badchecksum")) {
        corrupt = 1;
    } else if (!strcmp(m, "badxxh")) {
        corrupt = 2;
    } else if (!strcmp(m, "closedround")) {
        round = h->o->have_round ? h->o->round : h->offer_round - 1;
    } else if (!strcmp(m, "futureround")) {
        round = h->offer_round + 5;
    }
    if (h->o->send_delay_ms > 0)
        usleep((useconds_t)h->o->send_delay_ms * 1000);
    say("sending a %s update for round %llu", m, (unsigned long long)round);
    struct buf b = {0};
    buf_update(&b, round, &l, v, numel, h->o->examples, corrupt);
    send_raw(h, b.p, b.n);
    free(b.p);
    free(v);
    if (code == 0) { /* honest: the update must be taken */
        pump(h, h->o->timeout_ms, got_ack);
        int ok = h->acks_accepted == 1 && h->nerr == 0;
        return verdict(ok, "expected UpdateAck accepted and no Error");
    }
    pump(h, h->o->timeout_ms, got_error);
    /* Anything that follows the refusal (an ack, more errors) would show up here. */
    pump(h, 300, NULL);
    int ok = only_error(h, code, 0) && h->acks == 0 && !h->closed;
    return verdict(ok, "expected exactly one Error %s (non-fatal), no ack, connection open",
                   what);
}

static int mode_duplicate(struct h *h)
{
    if (join_round(h) < 0)
        return verdict(0, "no round");
    const struct layout *l = update_layout(h);
    float *v = pattern(l->numel, 1), *w = pattern(l->numel, 100);
    struct buf b = {0};
    /* Both updates in one write, so the second arrives while the first is being folded. */
    buf_update(&b, h->offer_round, l, v, l->numel, h->o->examples, 0);
    buf_update(&b, h->offer_round, l, w, l->numel, h->o->examples, 0);
    send_raw(h, b.p, b.n);
    free(b.p);
    free(v);
    free(w);
    pump(h, h->o->timeout_ms, got_ack_and_error);
    pump(h, 300, NULL);
    int ok = h->acks == 1 && h->acks_accepted == 1 && only_error(h, COHORT_EDUP, 0);
    return verdict(ok, "expected one UpdateAck accepted and exactly one Error EDUP");
}

/* Hello and a whole update in one write: the update left before any offer could arrive. */
static int mode_pipelined(struct h *h, int code, const char *what)
{
    if (!h->o->have_round || !h->o->layout) {
        fprintf(stderr, "hostile: %s needs --round and --layout\n", h->o->mode);
        return 2;
    }
    if (connect_tls(h, 1) < 0)
        return verdict(0, "TLS failed");
    const struct layout *l = update_layout(h);
    float *v = pattern(l->numel, 1);
    uint8_t *f;
    size_t n;
    hello(h, COH_PROTOCOL_VERSION, 0, &f, &n);
    struct buf b = {0};
    buf_put(&b, f, n);
    free(f);
    buf_update(&b, h->o->round, l, v, l->numel, h->o->examples, 0);
    say("sending Hello and an update for round %llu in one write (%zu bytes)",
        (unsigned long long)h->o->round, b.n);
    send_raw(h, b.p, b.n);
    free(b.p);
    free(v);
    pump(h, h->o->timeout_ms, got_error);
    pump(h, 300, NULL);
    int ok = h->welcome && only_error(h, code, 0) && h->acks == 0;
    return verdict(ok, "expected Welcome, exactly one Error %s, no ack", what);
}

static int mode_slowloris(struct h *h)
{
    if (join_round(h) < 0)
        return verdict(0, "no round");
    const struct layout *l = update_layout(h);
    struct buf b = {0};
    buf_begin(&b, h->offer_round, l, h->o->examples, (uint64_t)l->numel * 4);
    double t0 = now_s();
    size_t i;
    for (i = 0; i < b.n && !h->closed; i++) {
        if (send_raw(h, b.p + i, 1) < 0)
            break;
        pump(h, 1000, NULL);
    }
    say("sent %zu of %zu bytes in %.1f s", i, b.n, now_s() - t0);
    int complete = i >= b.n;
    free(b.p);
    pump(h, 2000, NULL);
    int ok = !complete && only_error(h, COHORT_ETIMEDOUT, 1) && h->closed;
    return verdict(ok, "expected Error ETIMEDOUT fatal and a close before the frame was complete");
}

static int mode_burst(struct h *h)
{
    /* A ClientHello to replay on the mid-handshake connections. */
    SSL_CTX *ctx = make_ctx(h->o, 0);
    if (!ctx)
        return verdict(0, "no TLS context");
    SSL *s = SSL_new(ctx);
    BIO *rb = BIO_new(BIO_s_mem()), *wb = BIO_new(BIO_s_mem());
    SSL_set_bio(s, rb, wb);
    SSL_set_connect_state(s);
    SSL_do_handshake(s);
    uint8_t ch[4096];
    int chlen = BIO_read(wb, ch, sizeof ch);
    SSL_free(s);
    SSL_CTX_free(ctx);
    if (chlen <= 0)
        return verdict(0, "could not build a ClientHello");
    enum { WINDOW = 64 };
    int fds[WINDOW];
    for (int i = 0; i < WINDOW; i++)
        fds[i] = -1;
    long opened = 0, failed = 0, kinds[4] = {0};
    double t0 = now_s();
    for (long i = 0; i < h->o->count; i++) {
        int slot = (int)(i % WINDOW);
        if (fds[slot] >= 0) {
            close(fds[slot]);
            fds[slot] = -1;
        }
        int fd = tcp_connect(h->o->server, 1);
        if (fd < 0) {
            failed++;
            continue;
        }
        opened++;
        int kind = (int)(i % 4);
        kinds[kind]++;
        if (kind == 0) { /* connect and go */
            close(fd);
            continue;
        }
        if (kind == 1 || kind == 3) /* mid-handshake: a ClientHello, no more */
            (void)!send(fd, ch, (size_t)chlen, MSG_NOSIGNAL);
        if (kind == 2 || kind == 3) { /* reset instead of a clean close */
            if (kind == 3)
                wait_fd(fd, POLLIN, 50);
            struct linger lg = {1, 0};
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            close(fd);
            continue;
        }
        fds[slot] = fd; /* kind 1: left open a while, closed when the window wraps */
    }
    for (int i = 0; i < WINDOW; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    say("burst: %ld connections opened (%ld closed at once, %ld mid-handshake, %ld reset, "
        "%ld reset mid-handshake), %ld failed, %.2f s",
        opened, kinds[0], kinds[1], kinds[2], kinds[3], failed, now_s() - t0);
    /* Is the server still serving? A full handshake and a Hello it must answer. */
    say("probe: TLS + Hello version 99");
    if (connect_tls(h, 1) < 0)
        return verdict(0, "the probe could not complete TLS after the burst");
    hello(h, 99, 1, NULL, NULL);
    pump(h, h->o->timeout_ms, NULL);
    int ok = opened + failed == h->o->count && failed == 0 && only_error(h, COHORT_EVERSION, 1) &&
             h->closed;
    return verdict(ok, "expected every connection to open and the probe to get Error EVERSION");
}

static int got_offer(struct h *h) { return h->offer; }
static int got_result_and_model(struct h *h) { return h->results > 0 && got_model(h); }

static int mode_slowread(struct h *h)
{
    small_rcvbuf = 1;
    h->xxh = coh_xxh_new();
    if (!h->xxh || join(h) < 0)
        return verdict(0, "could not join");
    if (!pump(h, h->o->timeout_ms, got_offer))
        return verdict(0, "no round offer");
    uint64_t round = h->offer_round;
    say("stalling the download of round %llu for %ld ms", (unsigned long long)round,
        h->o->count);
    usleep((useconds_t)h->o->count * 1000);
    /* The round ends meanwhile (this client never answers); its RoundResult and the
     * rest of the model must arrive as whole frames, in order. */
    int done = pump(h, h->o->timeout_ms, got_result_and_model);
    int pass = done && h->undecodable == 0 && h->offsets_bad == 0 && h->model_ok &&
               h->offer_round == round;
    coh_xxh_free(h->xxh);
    h->xxh = NULL;
    return verdict(pass, "expected the RoundResult and the whole model of round %llu as whole "
                   "frames (result %d, chunks %u/%u, undecodable %d, offset breaks %d, xxh3 %s)",
                   (unsigned long long)round, h->results, h->chunks, h->chunk_count,
                   h->undecodable, h->offsets_bad, h->model_ok ? "ok" : "bad");
}

/* The offer carries the checksums the client can use: model_sha256 only for a
 * client without Hello.accepts_xxh3 (the server skips SHA-256 otherwise), and
 * each checksum given matches the model that arrives. */
static int mode_offersums(struct h *h)
{
    h->xxh = coh_xxh_new();
    h->md = EVP_MD_CTX_new();
    if (!h->xxh || !h->md || join_round(h) < 0)
        return verdict(0, "could not join and receive the model");
    int want_sha = !h->o->accepts_xxh3;
    int pass = h->model_ok && h->undecodable == 0 && h->offsets_bad == 0 &&
               (want_sha ? h->offer_has_sha == 1 : h->offer_has_sha == 0);
    say("offer sums: xxh3 %s, sha256 %s", h->model_ok ? "matches" : "BAD",
        h->offer_has_sha == 1 ? "present, matches" : h->offer_has_sha ? "present, WRONG"
                                                                      : "absent");
    coh_xxh_free(h->xxh);
    h->xxh = NULL;
    EVP_MD_CTX_free(h->md);
    h->md = NULL;
    return verdict(pass, "expected a matching XXH3 and %s", want_sha ?
                   "a matching sha256 (Hello without accepts_xxh3)" :
                   "no sha256 (Hello.accepts_xxh3 set)");
}

static int usage(void)
{
    fprintf(stderr,
            "usage: hostile MODE --server HOST:PORT --ca CA --cert C --key K [--round R]\n"
            "               [--model-layout-from-offer | --layout NAME:D0xD1,...]\n"
            "               [--examples N] [--count N] [--timeout-ms MS] [--accepts-xxh3]\n"
            "               [--send-delay-ms MS]\n"
            "MODE: plaintext nocert othercca expired revoked badversion bigframe undecodable\n"
            "      truncated midupload badnames badshapes badcount nan inf huge closedround\n"
            "      futureround duplicate early notoffered badchecksum badxxh slowloris burst honest\n"
            "      slowread offersums\n");
    return 2;
}

int main(int argc, char **argv)
{
    struct opts o = {.examples = 50, .count = 1000, .timeout_ms = 15000};
    if (argc < 2)
        return usage();
    o.mode = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--model-layout-from-offer")) {
            o.layout = NULL;
            continue;
        }
        if (!strcmp(a, "--accepts-xxh3")) {
            o.accepts_xxh3 = 1;
            continue;
        }
        if (!v)
            return usage();
        i++;
        if (!strcmp(a, "--server"))
            o.server = v;
        else if (!strcmp(a, "--ca"))
            o.ca = v;
        else if (!strcmp(a, "--cert"))
            o.cert = v;
        else if (!strcmp(a, "--key"))
            o.key = v;
        else if (!strcmp(a, "--layout"))
            o.layout = v;
        else if (!strcmp(a, "--round")) {
            o.round = strtoull(v, NULL, 10);
            o.have_round = 1;
        } else if (!strcmp(a, "--examples"))
            o.examples = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--count"))
            o.count = strtol(v, NULL, 10);
        else if (!strcmp(a, "--timeout-ms"))
            o.timeout_ms = atoi(v);
        else if (!strcmp(a, "--send-delay-ms"))
            o.send_delay_ms = atoi(v);
        else
            return usage();
    }
    if (!o.server || !o.ca || ((!o.cert || !o.key) && strcmp(o.mode, "nocert") != 0 &&
                               strcmp(o.mode, "plaintext") != 0))
        return usage();
    signal(SIGPIPE, SIG_IGN);

    struct h h = {.o = &o, .fd = -1};
    coh_frame_rx_init(&h.rx, 64u << 20);
    const char *m = o.mode;
    int rc;
    if (!strcmp(m, "plaintext"))
        rc = mode_plaintext(&h);
    else if (!strcmp(m, "nocert"))
        rc = mode_refused_tls(&h, 0);
    else if (!strcmp(m, "othercca") || !strcmp(m, "expired") || !strcmp(m, "revoked"))
        rc = mode_refused_tls(&h, 1);
    else if (!strcmp(m, "badversion"))
        rc = mode_badversion(&h);
    else if (!strcmp(m, "bigframe"))
        rc = mode_bigframe(&h);
    else if (!strcmp(m, "undecodable"))
        rc = mode_undecodable(&h);
    else if (!strcmp(m, "truncated"))
        rc = mode_truncated(&h);
    else if (!strcmp(m, "midupload"))
        rc = mode_midupload(&h);
    else if (!strcmp(m, "badnames") || !strcmp(m, "badshapes") || !strcmp(m, "badcount"))
        rc = mode_update(&h, COHORT_ESHAPE, "ESHAPE");
    else if (!strcmp(m, "nan") || !strcmp(m, "inf") || !strcmp(m, "huge"))
        rc = mode_update(&h, COHORT_ENONFINITE, "ENONFINITE");
    else if (!strcmp(m, "badchecksum") || !strcmp(m, "badxxh"))
        rc = mode_update(&h, COHORT_ECHECKSUM, "ECHECKSUM");
    else if (!strcmp(m, "closedround") || !strcmp(m, "futureround"))
        rc = mode_update(&h, COHORT_EROUND, "EROUND");
    else if (!strcmp(m, "honest"))
        rc = mode_update(&h, 0, "");
    else if (!strcmp(m, "duplicate"))
        rc = mode_duplicate(&h);
    else if (!strcmp(m, "early"))
        rc = mode_pipelined(&h, COHORT_EROUND, "EROUND");
    else if (!strcmp(m, "notoffered"))
        rc = mode_pipelined(&h, COHORT_EOFFER, "EOFFER");
    else if (!strcmp(m, "slowloris"))
        rc = mode_slowloris(&h);
    else if (!strcmp(m, "slowread"))
        rc = mode_slowread(&h);
    else if (!strcmp(m, "offersums"))
        rc = mode_offersums(&h);
    else if (!strcmp(m, "trickle"))
        rc = mode_trickle(&h);
    else if (!strcmp(m, "burst"))
        rc = mode_burst(&h);
    else
        return usage();
    if (h.ssl)
        SSL_free(h.ssl);
    SSL_CTX_free(h.ctx);
    if (h.fd >= 0)
        close(h.fd);
    coh_frame_rx_fini(&h.rx);
    for (size_t i = 0; i < h.offered.n; i++)
        free(h.offered.names[i]);
    return rc;
}
