/*
 * cohort-loadgen: many cohort clients in one process, for the ingest, memory and
 * scale benchmarks (bench/bench_server.py drives it; docs/performance.md).
 *
 *   cohort-loadgen mkmodel --out FILE --params P
 *       writes an initial safetensors model of P float32 values
 *       (layer.weight [P/100-1, 100] + layer.bias [100], or w [P]).
 *
 *   cohort-loadgen upload --server HOST:PORT --ca CA.pem --ca-key CA.key --clients N
 *                  --rounds R [--chunk-bytes B] [--examples E] [--server-pid PID]
 *                  [--prefix NAME] [--parallel K] [--timeout S] [--sndbuf BYTES]
 *                  [--after-all-models 0|1]
 *       N clients answer every RoundOffer with the same fixed random update (no
 *       training) until the server's RunEnd, then print one JSON line per round with
 *       the round's timeline as the clients saw it and the server's CPU time.
 *       --after-all-models 1: no client starts its upload before every client has
 *       its model, so the upload window holds uploads only (the ingest benchmark;
 *       otherwise early uploads overlap the rest of the model broadcast).
 *       --sndbuf caps each socket's kernel send buffer (SO_SNDBUF): with a thousand
 *       uploads held back by cohortd's back-pressure, default buffers park megabytes per
 *       connection in the kernel and can push the host into TCP memory pressure.
 *
 *   cohort-loadgen aesref --params BYTES
 *       single-core AES-128-GCM and AES-256-GCM decryption of BYTES bytes in 16 KiB
 *       records (OpenSSL EVP): the ingest benchmark's same-run reference.
 *
 *   cohort-loadgen idle --server ... --clients N [--hb-interval-ms MS] [--warmup S]
 *                  [--duration S] [--server-pid PID] [--parallel K]
 *       N connections complete the TLS handshake and Hello, then only heartbeat
 *       (Heartbeat{seq, time_ms}; cohortd answers Heartbeat{reply=true}) with their
 *       phases spread evenly over the interval; prints the round-trip percentiles, the
 *       connect rate and the server's RSS and CPU with all N connected.
 *
 * One thread, non-blocking sockets, epoll (edge-triggered) and OpenSSL on the
 * sockets directly. Client identities are made in memory: one EC P-256 key and, per
 * connection, a certificate with CN PREFIX-i signed by the federation CA (the
 * server binds identities to the CN; the shared key does not matter to it). The
 * update is built once per round as chunk frames shared by every connection, so a
 * client costs its TLS encryption and little else: the load generator stays cheap
 * next to the server it measures on the same two cores.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "checksum.h"
#include "bench_aes.h"
#include "bench_util.h"
#include "frame.h"
#include "wire.h"

#define MAX_ROUNDS 64
#define MAX_CTL_FRAME 4096
#define SCRATCH (256u << 10)

enum { M_UPLOAD = 1, M_IDLE };
enum { S_CONNECTING = 0, S_TLS, S_HELLO, S_READY, S_DONE };

struct opts {
    int mode;
    const char *server, *ca, *ca_key, *prefix, *out;
    uint32_t clients, rounds, parallel, chunk_bytes, hb_interval_ms, sndbuf;
    uint64_t examples, params;
    int after_all_models;
    double warmup_s, duration_s, timeout_s;
    int server_pid;
};

/* One round's update as frames, shared read-only by every connection. */
struct ufr {
    int refs;
    uint64_t round;
    uint8_t *begin, *chunks, *end;
    size_t begin_len, chunks_len, end_len;
};

struct seg {
    const uint8_t *p;
    size_t len;
    uint8_t *owned;      /* freed when written */
    int is_update_end;   /* last segment of an update */
};

#define QCAP 16

struct conn {
    int fd, idx, state;
    SSL *ssl;
    /* receive: frame header, then body (buffered) or skipped (model chunks) */
    uint8_t hdr[4];
    int hdr_have, skip;
    uint32_t flen, fgot;
    uint8_t *body;
    /* send queue */
    struct seg q[QCAP];
    int qh, qn;
    struct ufr *uf;
    /* round */
    uint64_t round;
    uint32_t chunks_expected, chunks_got;
    int model_ready;     /* --after-all-models: has its model, waits for the others */
    /* heartbeats */
    uint64_t hb_seq;
    double hb_sent;
    int hb_measured;     /* the outstanding heartbeat was sent in the measured window */
    double t_start;
};

/* Per-round timeline, over all connections (loadgen clock, seconds). */
struct rstat {
    double first_offer, last_model, first_begin, last_end, last_ack, first_result;
    uint32_t offers, acks, accepted, errors, models;
    uint64_t bytes;
    /* server CPU (process, loop thread) at first_offer, first_begin, last_ack */
    double cpu_offer[2], cpu_begin[2], cpu_ack[2];
    double self_cpu_begin, self_cpu_ack;
};

static struct opts O;
static int ep;
static SSL_CTX *ctx;
static EVP_PKEY *client_key, *ca_pkey;
static X509 *ca_cert;
static struct conn *conns;
static uint8_t *scratch;
static float *update;
static size_t update_floats;
static uint8_t update_sha[32];
static struct ufr *cur_uf;
static struct rstat rs[MAX_ROUNDS + 1];
static uint32_t nready, ndone, nfailed, inflight, next_to_connect;
static double *rtts;
static size_t nrtts, caprtts;
static int measuring;
static uint64_t hb_sent_count, hb_recv_count;
static char first_error[512];
static char cipher[64];
static struct sockaddr_in srv_addr;

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "cohort-loadgen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

/* ---- CPU and memory of a process, from /proc ---- */

static double proc_cpu(int pid, int tid)
{
    char path[128], buf[1024];
    if (tid)
        snprintf(path, sizeof path, "/proc/%d/task/%d/stat", pid, tid);
    else
        snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    unsigned long ut = 0, st = 0;
    /* fields after the command: state(3) ... utime(14) stime(15) */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return -1;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static void server_cpu(double out[2])
{
    out[0] = out[1] = -1;
    if (O.server_pid > 0) {
        out[0] = proc_cpu(O.server_pid, 0);
        out[1] = proc_cpu(O.server_pid, O.server_pid);
    }
}

static double self_cpu(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec * 1e-6;
}

/* VmRSS / VmHWM of pid in KiB (0 when unknown). */
static long proc_status_kib(int pid, const char *field)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    long v = 0;
    size_t fl = strlen(field);
    while (fgets(line, sizeof line, f))
        if (strncmp(line, field, fl) == 0 && line[fl] == ':') {
            v = atol(line + fl + 1);
            break;
        }
    fclose(f);
    return v;
}

/* ---- identities ---- */

static void load_ca(void)
{
    FILE *f = fopen(O.ca, "r");
    if (!f)
        die("cannot open --ca %s", O.ca);
    ca_cert = PEM_read_X509(f, NULL, NULL, NULL);
    fclose(f);
    f = fopen(O.ca_key, "r");
    if (!f)
        die("cannot open --ca-key %s", O.ca_key);
    ca_pkey = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    fclose(f);
    if (!ca_cert || !ca_pkey)
        die("cannot read the CA certificate or key");
    client_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    if (!client_key)
        die("EC key generation failed");
}

static X509 *make_cert(uint32_t i)
{
    X509 *x = X509_new();
    char cn[64];
    snprintf(cn, sizeof cn, "%s-%u", O.prefix, i + 1);
    X509_set_version(x, 2);
    ASN1_INTEGER_set_int64(X509_get_serialNumber(x), (int64_t)getpid() * 1000000 + i + 1);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_set_pubkey(x, client_key);
    X509_NAME *nm = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(nm, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
    X509_set_issuer_name(x, X509_get_subject_name(ca_cert));
    X509V3_CTX v3;
    X509V3_set_ctx(&v3, ca_cert, x, NULL, NULL, 0);
    static const char *exts[][2] = {{"basicConstraints", "critical,CA:FALSE"},
                                    {"keyUsage", "critical,digitalSignature"},
                                    {"extendedKeyUsage", "clientAuth"}};
    for (size_t e = 0; e < 3; e++) {
        X509_EXTENSION *ex = X509V3_EXT_conf(NULL, &v3, exts[e][0], exts[e][1]);
        if (ex) {
            X509_add_ext(x, ex, -1);
            X509_EXTENSION_free(ex);
        }
    }
    if (!X509_sign(x, ca_pkey, EVP_sha256()))
        die("signing a client certificate failed");
    return x;
}

/* ---- the update ---- */

static struct ufr *ufr_build(const Cohort__RoundOffer *of)
{
    size_t total = (size_t)of->total_bytes;
    if (!update || update_floats * 4 != total) {
        free(update);
        update_floats = total / 4;
        update = bench_alloc(total);
        bench_fill(update, update_floats, 7);
        coh_xxh128(update, total, update_sha); /* as libcohort sends it */
    }
    struct ufr *u = calloc(1, sizeof *u);
    u->refs = 1;
    u->round = of->round;
    Cohort__UpdateBegin ub = COHORT__UPDATE_BEGIN__INIT;
    ub.round = of->round;
    ub.num_examples = O.examples;
    ub.n_tensors = of->n_tensors;
    ub.tensors = of->tensors;
    ub.total_bytes = of->total_bytes;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_UPDATE_BEGIN;
    e.update_begin = &ub;
    if (coh_wire_encode(&e, &u->begin, &u->begin_len) < 0)
        die("encoding UpdateBegin failed");
    size_t chunk = O.chunk_bytes & ~(size_t)3;
    size_t nch = total ? (total + chunk - 1) / chunk : 0;
    u->chunks = bench_alloc(nch * coh_wire_chunk_frame_max(chunk) + 1);
    size_t pos = 0;
    for (size_t off = 0; off < total; off += chunk) {
        size_t n = total - off < chunk ? total - off : chunk;
        pos += coh_wire_write_chunk(u->chunks + pos, COH_CHUNK_UPDATE, of->round, 0, off,
                                    (const uint8_t *)update + off, n, NULL);
    }
    u->chunks_len = pos;
    Cohort__UpdateEnd ue = COHORT__UPDATE_END__INIT;
    ue.round = of->round;
    ue.xxh3.data = update_sha;
    ue.xxh3.len = COH_XXH_LEN;
    ue.train_loss = 0.5;
    e.body_case = COHORT__ENVELOPE__BODY_UPDATE_END;
    e.update_end = &ue;
    if (coh_wire_encode(&e, &u->end, &u->end_len) < 0)
        die("encoding UpdateEnd failed");
    return u;
}

static void ufr_unref(struct ufr *u)
{
    if (!u || --u->refs > 0)
        return;
    free(u->begin);
    free(u->chunks);
    free(u->end);
    free(u);
}

/* ---- connections ---- */

/* Marks c done and frees everything it holds. */
static void conn_release(struct conn *c)
{
    c->state = S_DONE;
    ndone++;
    if (c->fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    SSL_free(c->ssl);
    c->ssl = NULL;
    free(c->body);
    c->body = NULL;
    while (c->qn > 0) {
        free(c->q[c->qh].owned);
        c->qh = (c->qh + 1) % QCAP;
        c->qn--;
    }
    ufr_unref(c->uf);
    c->uf = NULL;
}

static void conn_fail(struct conn *c, const char *fmt, ...)
{
    if (c->state == S_DONE)
        return;
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    nfailed++;
    if (!first_error[0])
        snprintf(first_error, sizeof first_error, "client %d: %s", c->idx + 1, msg);
    if (c->state < S_READY && inflight > 0)
        inflight--;
    else if (c->state == S_READY && nready > 0)
        nready--;
    conn_release(c);
}

static void conn_finish(struct conn *c)
{
    /* Orderly end (RunEnd): not a failure. */
    if (c->state == S_READY && nready > 0)
        nready--;
    conn_release(c);
}

static void enqueue(struct conn *c, const uint8_t *p, size_t len, uint8_t *owned, int is_end)
{
    if (c->qn == QCAP)
        die("send queue overflow");
    struct seg *s = &c->q[(c->qh + c->qn) % QCAP];
    s->p = p;
    s->len = len;
    s->owned = owned;
    s->is_update_end = is_end;
    c->qn++;
}

static void send_msg(struct conn *c, const Cohort__Envelope *e)
{
    uint8_t *f;
    size_t n;
    if (coh_wire_encode(e, &f, &n) < 0)
        die("encoding a message failed");
    enqueue(c, f, n, f, 0);
}

static void send_heartbeat(struct conn *c, double now)
{
    Cohort__Heartbeat h = COHORT__HEARTBEAT__INIT;
    h.seq = ++c->hb_seq;
    h.time_ms = (uint64_t)(now * 1000);
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_HEARTBEAT;
    e.heartbeat = &h;
    send_msg(c, &e);
    c->hb_sent = now;
    c->hb_measured = measuring;
    if (measuring)
        hb_sent_count++;
}

static void start_upload(struct conn *c, double now)
{
    struct rstat *r = c->round <= MAX_ROUNDS ? &rs[c->round] : NULL;
    if (r) {
        if (now > r->last_model)
            r->last_model = now;
        if (r->first_begin == 0) {
            r->first_begin = now;
            server_cpu(r->cpu_begin);
            r->self_cpu_begin = self_cpu();
        }
    }
    struct ufr *u = cur_uf;
    u->refs++;
    ufr_unref(c->uf);
    c->uf = u;
    enqueue(c, u->begin, u->begin_len, NULL, 0);
    enqueue(c, u->chunks, u->chunks_len, NULL, 0);
    enqueue(c, u->end, u->end_len, NULL, 1);
}

static void flush_tx(struct conn *c, double now);

/* c has the whole model: it uploads now, or once every client has its model. */
static void model_complete(struct conn *c, double now)
{
    if (!O.after_all_models) {
        start_upload(c, now);
        return;
    }
    c->model_ready = 1;
    uint64_t rd = c->round;
    if (rd > MAX_ROUNDS || ++rs[rd].models < O.clients - nfailed)
        return;
    for (uint32_t i = 0; i < O.clients; i++) {
        struct conn *o = &conns[i];
        if (o->model_ready && o->round == rd) {
            o->model_ready = 0;
            start_upload(o, now);
            /* Edge-triggered epoll: a writable socket gets no new event, so the
             * others' uploads are written here (c's by its own service pass). */
            if (o != c)
                flush_tx(o, now);
        }
    }
}

static void on_frame(struct conn *c, const uint8_t *f, size_t len, double now)
{
    Cohort__Envelope *e;
    if (coh_wire_decode(f, len, &e) < 0) {
        conn_fail(c, "undecodable frame of %zu bytes", len);
        return;
    }
    switch (e->body_case) {
    case COHORT__ENVELOPE__BODY_WELCOME:
        if (c->state == S_HELLO) {
            c->state = S_READY;
            inflight--;
            nready++;
        }
        break;
    case COHORT__ENVELOPE__BODY_ROUND_OFFER: {
        const Cohort__RoundOffer *of = e->round_offer;
        if (O.mode == M_IDLE) {
            Cohort__Decline d = COHORT__DECLINE__INIT;
            d.round = of->round;
            d.reason = (char *)"idle benchmark client";
            Cohort__Envelope de = COHORT__ENVELOPE__INIT;
            de.body_case = COHORT__ENVELOPE__BODY_DECLINE;
            de.decline = &d;
            send_msg(c, &de);
            c->chunks_expected = 0;
            break;
        }
        c->round = of->round;
        c->chunks_expected = of->chunk_count;
        c->chunks_got = 0;
        if (of->round <= MAX_ROUNDS) {
            struct rstat *r = &rs[of->round];
            if (r->offers++ == 0) {
                r->first_offer = now;
                server_cpu(r->cpu_offer);
            }
        }
        if (!cur_uf || cur_uf->round != of->round) {
            ufr_unref(cur_uf);
            cur_uf = ufr_build(of);
        }
        if (c->chunks_expected == 0)
            model_complete(c, now);
        break;
    }
    case COHORT__ENVELOPE__BODY_UPDATE_ACK: {
        uint64_t rd = e->update_ack->round;
        if (rd <= MAX_ROUNDS) {
            struct rstat *r = &rs[rd];
            r->acks++;
            if (e->update_ack->accepted) {
                r->accepted++;
                r->bytes += (uint64_t)update_floats * 4;
            }
            r->last_ack = now;
            server_cpu(r->cpu_ack);
            r->self_cpu_ack = self_cpu();
        }
        break;
    }
    case COHORT__ENVELOPE__BODY_ROUND_RESULT: {
        uint64_t rd = e->round_result->round;
        if (rd <= MAX_ROUNDS && rs[rd].first_result == 0)
            rs[rd].first_result = now;
        break;
    }
    case COHORT__ENVELOPE__BODY_HEARTBEAT:
        if (e->heartbeat->reply && c->hb_sent > 0 && e->heartbeat->seq == c->hb_seq) {
            if (c->hb_measured) {
                if (nrtts == caprtts) {
                    caprtts = caprtts ? caprtts * 2 : 65536;
                    rtts = realloc(rtts, caprtts * sizeof *rtts);
                }
                rtts[nrtts++] = now - c->hb_sent;
                hb_recv_count++;
            }
            c->hb_sent = 0;
        } else if (!e->heartbeat->reply) {
            Cohort__Heartbeat h = COHORT__HEARTBEAT__INIT;
            h.seq = e->heartbeat->seq;
            h.time_ms = e->heartbeat->time_ms;
            h.reply = 1;
            Cohort__Envelope he = COHORT__ENVELOPE__INIT;
            he.body_case = COHORT__ENVELOPE__BODY_HEARTBEAT;
            he.heartbeat = &h;
            send_msg(c, &he);
        }
        break;
    case COHORT__ENVELOPE__BODY_ERROR:
        if (c->round <= MAX_ROUNDS)
            rs[c->round].errors++;
        if (!first_error[0])
            snprintf(first_error, sizeof first_error, "client %d: server error %d: %s",
                     c->idx + 1, e->error->code, e->error->message);
        if (e->error->fatal) {
            coh_wire_free(e);
            conn_fail(c, "fatal server error");
            return;
        }
        break;
    case COHORT__ENVELOPE__BODY_RUN_END:
        coh_wire_free(e);
        conn_finish(c);
        return;
    default:
        break;
    }
    coh_wire_free(e);
}

/* Feeds received plaintext to the frame parser. Model chunk bodies are counted
 * and dropped, everything else is buffered and decoded. */
static void on_bytes(struct conn *c, const uint8_t *p, size_t n, double now)
{
    while (n > 0 && c->state != S_DONE) {
        if (c->hdr_have < 4) {
            size_t k = 4 - (size_t)c->hdr_have;
            if (k > n)
                k = n;
            memcpy(c->hdr + c->hdr_have, p, k);
            c->hdr_have += (int)k;
            p += k;
            n -= k;
            if (c->hdr_have < 4)
                return;
            c->flen = coh_frame_get_len(c->hdr);
            c->fgot = 0;
            c->skip = -1;
            if (c->flen > (64u << 20)) {
                conn_fail(c, "frame of %u bytes", c->flen);
                return;
            }
            if (c->flen == 0) {
                c->hdr_have = 0;
                continue;
            }
            continue;
        }
        if (c->skip < 0) {
            /* First body byte: 0x22 is field 4 (ModelChunk), length-delimited. */
            c->skip = p[0] == 0x22;
            if (!c->skip)
                c->body = malloc(c->flen);
        }
        size_t k = c->flen - c->fgot;
        if (k > n)
            k = n;
        if (!c->skip)
            memcpy(c->body + c->fgot, p, k);
        c->fgot += (uint32_t)k;
        p += k;
        n -= k;
        if (c->fgot == c->flen) {
            c->hdr_have = 0;
            if (c->skip) {
                if (c->chunks_expected && ++c->chunks_got == c->chunks_expected)
                    model_complete(c, now);
            } else {
                uint8_t *b = c->body;
                c->body = NULL;
                on_frame(c, b, c->flen, now);
                free(b);
            }
        }
    }
}

static void flush_tx(struct conn *c, double now)
{
    while (c->qn > 0 && c->state != S_DONE) {
        struct seg *s = &c->q[c->qh];
        size_t want = s->len > (1u << 20) ? (1u << 20) : s->len;
        ERR_clear_error();
        int w = SSL_write(c->ssl, s->p, (int)want);
        if (w <= 0) {
            int err = SSL_get_error(c->ssl, w);
            if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ)
                return;
            conn_fail(c, "TLS write failed (%d)", err);
            return;
        }
        s->p += w;
        s->len -= (size_t)w;
        if (s->len == 0) {
            if (s->is_update_end && c->round <= MAX_ROUNDS && now > rs[c->round].last_end)
                rs[c->round].last_end = now;
            free(s->owned);
            c->qh = (c->qh + 1) % QCAP;
            c->qn--;
        }
    }
}

static void read_all(struct conn *c, double now)
{
    while (c->state != S_DONE) {
        ERR_clear_error();
        int n = SSL_read(c->ssl, scratch, SCRATCH);
        if (n > 0) {
            on_bytes(c, scratch, (size_t)n, now);
            continue;
        }
        int err = SSL_get_error(c->ssl, n);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
            return;
        if (err == SSL_ERROR_ZERO_RETURN)
            conn_fail(c, "server closed the TLS session");
        else {
            unsigned long e = ERR_peek_error();
            char why[256];
            ERR_error_string_n(e, why, sizeof why);
            conn_fail(c, "TLS read failed: %s", e ? why : "connection closed");
        }
        return;
    }
}

static void start_connect(struct conn *c)
{
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        c->state = S_CONNECTING;
        inflight++;
        conn_fail(c, "socket: %s", strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (O.sndbuf) {
        int sb = (int)O.sndbuf;
        setsockopt(c->fd, SOL_SOCKET, SO_SNDBUF, &sb, sizeof sb);
    }
    c->state = S_CONNECTING;
    c->t_start = bench_now();
    inflight++;
    int rc = connect(c->fd, (struct sockaddr *)&srv_addr, sizeof srv_addr);
    if (rc < 0 && errno != EINPROGRESS) {
        conn_fail(c, "connect: %s", strerror(errno));
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

static void service(struct conn *c, double now)
{
    if (c->state == S_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err == EINPROGRESS || err == EALREADY)
            return;
        if (err) {
            conn_fail(c, "connect: %s", strerror(err));
            return;
        }
        c->ssl = SSL_new(ctx);
        X509 *x = make_cert((uint32_t)c->idx);
        SSL_use_certificate(c->ssl, x);
        SSL_use_PrivateKey(c->ssl, client_key);
        X509_free(x);
        SSL_set_fd(c->ssl, c->fd);
        SSL_set_connect_state(c->ssl);
        c->state = S_TLS;
    }
    if (c->state == S_TLS) {
        ERR_clear_error();
        int rc = SSL_do_handshake(c->ssl);
        if (rc != 1) {
            int err = SSL_get_error(c->ssl, rc);
            if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
                return;
            char why[256] = "";
            ERR_error_string_n(ERR_peek_error(), why, sizeof why);
            conn_fail(c, "TLS handshake failed: %s", why);
            return;
        }
        if (!cipher[0])
            snprintf(cipher, sizeof cipher, "%s", SSL_get_cipher_name(c->ssl));
        Cohort__Hello h = COHORT__HELLO__INIT;
        h.protocol_version = COH_PROTOCOL_VERSION;
        h.software = (char *)"cohort-loadgen";
        h.accepts_xxh3 = 1; /* it never checks the model it is sent */
        h.num_examples = O.examples;
        h.role = (char *)"trainer";
        Cohort__Envelope e = COHORT__ENVELOPE__INIT;
        e.body_case = COHORT__ENVELOPE__BODY_HELLO;
        e.hello = &h;
        send_msg(c, &e);
        c->state = S_HELLO;
    }
    flush_tx(c, now);
    read_all(c, now);
    flush_tx(c, now);
}

static void connect_more(void)
{
    while (inflight < O.parallel && next_to_connect < O.clients)
        start_connect(&conns[next_to_connect++]);
}

/* Runs the loop until done() or the deadline; hb: heartbeat schedule on. */
static int (*done_fn)(void);
static double hb_start;
static uint32_t hb_next;
static uint64_t hb_cycle;

static double hb_due(uint32_t i, uint64_t cycle)
{
    double iv = O.hb_interval_ms / 1000.0;
    return hb_start + (double)cycle * iv + iv * (double)i / (double)O.clients;
}

static void loop(double deadline, int hb)
{
    struct epoll_event evs[512];
    while (!done_fn()) {
        double now = bench_now();
        if (now > deadline)
            return;
        int timeout = (int)((deadline - now) * 1000) + 1;
        if (hb) {
            /* epoll waits in whole milliseconds: send what is due within one. */
            while (hb_due(hb_next, hb_cycle) <= now + 0.001) {
                struct conn *c = &conns[hb_next];
                /* One outstanding heartbeat per connection: a late reply counts once. */
                if (c->state == S_READY && c->hb_sent == 0) {
                    send_heartbeat(c, now);
                    flush_tx(c, now);
                }
                if (++hb_next == O.clients) {
                    hb_next = 0;
                    hb_cycle++;
                }
            }
            int t = (int)((hb_due(hb_next, hb_cycle) - now) * 1000) + 1;
            if (t < timeout)
                timeout = t;
        }
        int n = epoll_wait(ep, evs, 512, timeout);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c->state != S_DONE)
                service(c, bench_now());
        }
        connect_more();
    }
}

static int all_ready(void)
{
    return nready + nfailed >= O.clients && inflight == 0 && next_to_connect >= O.clients;
}

static int all_done(void)
{
    return ndone >= O.clients;
}

static int never(void)
{
    return 0;
}

static int no_measured_outstanding(void)
{
    for (uint32_t i = 0; i < O.clients; i++)
        if (conns[i].hb_measured && conns[i].hb_sent > 0 && conns[i].state == S_READY)
            return 0;
    return 1;
}

static void setup_net(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
        if (rl.rlim_cur < (rlim_t)O.clients + 64)
            die("RLIMIT_NOFILE is %llu (hard limit); %u connections need more: raise the hard "
                "limit (ulimit -Hn, LimitNOFILE=)", (unsigned long long)rl.rlim_cur, O.clients);
    }
    signal(SIGPIPE, SIG_IGN);
    const char *colon = strrchr(O.server, ':');
    if (!colon)
        die("--server must be HOST:PORT");
    char host[64];
    snprintf(host, sizeof host, "%.*s", (int)(colon - O.server), O.server);
    memset(&srv_addr, 0, sizeof srv_addr);
    srv_addr.sin_family = AF_INET;
    srv_addr.sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &srv_addr.sin_addr) != 1)
        die("--server host must be an IPv4 address (127.0.0.1)");
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    if (SSL_CTX_load_verify_locations(ctx, O.ca, NULL) != 1)
        die("cannot load --ca %s", O.ca);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_RELEASE_BUFFERS);
    load_ca();
    ep = epoll_create1(EPOLL_CLOEXEC);
    scratch = malloc(SCRATCH);
    conns = calloc(O.clients, sizeof *conns);
    for (uint32_t i = 0; i < O.clients; i++) {
        conns[i].idx = (int)i;
        conns[i].fd = -1;
        conns[i].state = S_CONNECTING;
    }
}

static int run_upload(void)
{
    setup_net();
    done_fn = all_done;
    double t0 = bench_now();
    connect_more();
    loop(t0 + O.timeout_s, 0);
    double t1 = bench_now();
    uint32_t rounds = 0;
    for (uint32_t r = 1; r <= MAX_ROUNDS; r++)
        if (rs[r].offers)
            rounds = r;
    for (uint32_t r = 1; r <= rounds; r++) {
        struct rstat *s = &rs[r];
        double up = s->last_ack - s->first_begin;
        double srv_cpu = s->cpu_ack[0] - s->cpu_begin[0];
        double loop_cpu = s->cpu_ack[1] - s->cpu_begin[1];
        double gen_cpu = s->self_cpu_ack - s->self_cpu_begin;
        printf("{\"name\": \"loadgen_round\", \"params\": {\"N\": %u, \"P\": %zu, \"round\": %u}, "
               "\"offers\": %u, \"acks\": %u, \"accepted\": %u, \"errors\": %u, "
               "\"bytes\": %llu, \"t_offer\": %.6f, \"t_models\": %.6f, \"t_first_begin\": %.6f, "
               "\"t_last_end\": %.6f, \"t_last_ack\": %.6f, \"t_result\": %.6f, "
               "\"upload_s\": %.6f, \"server_cpu_upload_s\": %.4f, \"server_loop_cpu_upload_s\": "
               "%.4f, \"loadgen_cpu_upload_s\": %.4f, \"server_cpu_round_s\": %.4f}\n",
               O.clients, update_floats, r, s->offers, s->acks, s->accepted, s->errors,
               (unsigned long long)s->bytes, s->first_offer - t0, s->last_model - t0,
               s->first_begin - t0, s->last_end - t0, s->last_ack - t0,
               s->first_result ? s->first_result - t0 : -1.0, up, srv_cpu, loop_cpu, gen_cpu,
               s->cpu_ack[0] - s->cpu_offer[0]);
    }
    printf("{\"name\": \"loadgen_summary\", \"params\": {\"N\": %u}, \"rounds\": %u, "
           "\"failed\": %u, \"wall_s\": %.3f, \"loadgen_maxrss_kib\": %ld, \"cipher\": \"%s\", "
           "\"first_error\": \"",
           O.clients, rounds, nfailed, t1 - t0, proc_status_kib(getpid(), "VmHWM"), cipher);
    for (const char *p = first_error; *p; p++)
        if (*p != '"' && *p != '\\' && (unsigned char)*p >= 0x20)
            putchar(*p);
    printf("\"}\n");
    fflush(stdout);
    return nfailed ? 1 : 0;
}

static int run_idle(void)
{
    setup_net();
    done_fn = all_ready;
    double t0 = bench_now();
    connect_more();
    loop(t0 + O.timeout_s, 0);
    double t1 = bench_now();
    long rss_connected = O.server_pid > 0 ? proc_status_kib(O.server_pid, "VmRSS") : 0;
    fprintf(stderr, "cohort-loadgen: %u ready, %u failed in %.1f s\n", nready, nfailed, t1 - t0);
    /* Heartbeats: warm-up, then the measured window. */
    done_fn = never;
    hb_start = bench_now();
    hb_next = 0;
    hb_cycle = 0;
    loop(hb_start + O.warmup_s, 1);
    measuring = 1;
    double c0[2];
    server_cpu(c0);
    double w0 = bench_now(), g0 = self_cpu();
    loop(w0 + O.duration_s, 1);
    double w1 = bench_now(), g1 = self_cpu();
    double c1[2];
    server_cpu(c1);
    measuring = 0;
    /* Collect the replies to heartbeats sent at the end of the window (no new ones). */
    done_fn = no_measured_outstanding;
    loop(bench_now() + 2.0, 0);
    /* Unanswered heartbeats count as 2 s (a lower bound) in the percentiles. */
    for (uint32_t i = 0; i < O.clients; i++) {
        if (conns[i].hb_measured && conns[i].hb_sent > 0) {
            if (nrtts == caprtts) {
                caprtts = caprtts ? caprtts * 2 : 65536;
                rtts = realloc(rtts, caprtts * sizeof *rtts);
            }
            rtts[nrtts++] = 2.0;
        }
    }
    long rss = O.server_pid > 0 ? proc_status_kib(O.server_pid, "VmRSS") : 0;
    long hwm = O.server_pid > 0 ? proc_status_kib(O.server_pid, "VmHWM") : 0;
    double p50 = bench_percentile(rtts, nrtts, 50), p99 = bench_percentile(rtts, nrtts, 99);
    double p999 = bench_percentile(rtts, nrtts, 99.9), mx = bench_percentile(rtts, nrtts, 100);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    printf("{\"name\": \"loadgen_idle\", \"params\": {\"N\": %u, \"hb_interval_ms\": %u}, "
           "\"ready\": %u, \"failed\": %u, \"connect_s\": %.3f, \"connect_rate\": %.1f, "
           "\"hb_sent\": %llu, \"hb_answered\": %llu, \"rtt_p50_ms\": %.3f, \"rtt_p99_ms\": %.3f, "
           "\"rtt_p999_ms\": %.3f, \"rtt_max_ms\": %.3f, \"window_s\": %.2f, "
           "\"server_rss_connected_kib\": %ld, \"server_rss_kib\": %ld, \"server_hwm_kib\": %ld, "
           "\"server_cpu_pct\": %.1f, \"server_cpu_us_per_hb\": %.1f, \"loadgen_cpu_pct\": %.1f, "
           "\"loadgen_rss_kib\": %ld, "
           "\"nofile_limit\": %llu, \"cipher\": \"%s\", \"first_error\": \"",
           O.clients, O.hb_interval_ms, nready, nfailed, t1 - t0,
           (double)nready / (t1 - t0), (unsigned long long)hb_sent_count,
           (unsigned long long)hb_recv_count, p50 * 1e3, p99 * 1e3, p999 * 1e3, mx * 1e3, w1 - w0,
           rss_connected, rss, hwm, (c1[0] - c0[0]) / (w1 - w0) * 100,
           hb_sent_count ? (c1[0] - c0[0]) / (double)hb_sent_count * 1e6 : 0.0,
           (g1 - g0) / (w1 - w0) * 100, proc_status_kib(getpid(), "VmRSS"),
           (unsigned long long)rl.rlim_cur, cipher);
    for (const char *p = first_error; *p; p++)
        if (*p != '"' && *p != '\\' && (unsigned char)*p >= 0x20)
            putchar(*p);
    printf("\"}\n");
    fflush(stdout);
    return nready == O.clients ? 0 : 1;
}

/* ---- mkmodel ---- */

static int run_mkmodel(void)
{
    size_t p = (size_t)O.params;
    if (!O.out || p == 0)
        die("mkmodel needs --out FILE --params P");
    char hdr[512];
    int hl;
    if (p % 100 == 0 && p >= 200)
        hl = snprintf(hdr, sizeof hdr,
                      "{\"layer.weight\":{\"dtype\":\"F32\",\"shape\":[%zu,100],"
                      "\"data_offsets\":[0,%zu]},\"layer.bias\":{\"dtype\":\"F32\",\"shape\":[100],"
                      "\"data_offsets\":[%zu,%zu]}}",
                      p / 100 - 1, (p - 100) * 4, (p - 100) * 4, p * 4);
    else
        hl = snprintf(hdr, sizeof hdr,
                      "{\"w\":{\"dtype\":\"F32\",\"shape\":[%zu],\"data_offsets\":[0,%zu]}}", p,
                      p * 4);
    while (hl % 8)
        hdr[hl++] = ' ';
    float *x = bench_alloc(p * 4);
    bench_fill(x, p, 3);
    FILE *f = fopen(O.out, "wb");
    if (!f)
        die("cannot write %s", O.out);
    uint64_t le = (uint64_t)hl;
    fwrite(&le, 8, 1, f);
    fwrite(hdr, 1, (size_t)hl, f);
    fwrite(x, 4, p, f);
    if (fclose(f) != 0)
        die("writing %s failed", O.out);
    free(x);
    return 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: cohort-loadgen mkmodel --out FILE --params P\n"
            "       cohort-loadgen upload --server H:P --ca CA --ca-key KEY --clients N "
            "[--rounds R]\n"
            "              [--chunk-bytes B] [--examples E] [--server-pid PID] [--prefix NAME]\n"
            "              [--parallel K] [--timeout S] [--sndbuf BYTES] [--after-all-models 0|1]\n"
            "       cohort-loadgen idle --server H:P --ca CA --ca-key KEY --clients N\n"
            "              [--hb-interval-ms MS] [--warmup S] [--duration S] [--server-pid PID]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    O.prefix = "bench";
    O.clients = 1;
    O.rounds = 3;
    O.parallel = 64;
    O.chunk_bytes = COH_CHUNK_DEFAULT;
    O.examples = 100;
    O.hb_interval_ms = 1000;
    O.warmup_s = 2;
    O.duration_s = 10;
    O.timeout_s = 600;
    const char *mode = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            usage();
        i++;
        if (strcmp(a, "--server") == 0) O.server = v;
        else if (strcmp(a, "--ca") == 0) O.ca = v;
        else if (strcmp(a, "--ca-key") == 0) O.ca_key = v;
        else if (strcmp(a, "--prefix") == 0) O.prefix = v;
        else if (strcmp(a, "--out") == 0) O.out = v;
        else if (strcmp(a, "--clients") == 0) O.clients = (uint32_t)atol(v);
        else if (strcmp(a, "--rounds") == 0) O.rounds = (uint32_t)atol(v);
        else if (strcmp(a, "--parallel") == 0) O.parallel = (uint32_t)atol(v);
        else if (strcmp(a, "--chunk-bytes") == 0) O.chunk_bytes = (uint32_t)atol(v);
        else if (strcmp(a, "--hb-interval-ms") == 0) O.hb_interval_ms = (uint32_t)atol(v);
        else if (strcmp(a, "--sndbuf") == 0) O.sndbuf = (uint32_t)atol(v);
        else if (strcmp(a, "--after-all-models") == 0) O.after_all_models = atoi(v);
        else if (strcmp(a, "--examples") == 0) O.examples = strtoull(v, NULL, 10);
        else if (strcmp(a, "--params") == 0) O.params = (uint64_t)strtod(v, NULL);
        else if (strcmp(a, "--warmup") == 0) O.warmup_s = atof(v);
        else if (strcmp(a, "--duration") == 0) O.duration_s = atof(v);
        else if (strcmp(a, "--timeout") == 0) O.timeout_s = atof(v);
        else if (strcmp(a, "--server-pid") == 0) O.server_pid = atoi(v);
        else usage();
    }
    if (strcmp(mode, "mkmodel") == 0)
        return run_mkmodel();
    if (strcmp(mode, "aesref") == 0) {
        /* The same-run TLS reference for ingest: one core, EVP, 16 KiB records. */
        uint64_t bytes = O.params ? O.params : (1ull << 30);
        double g128 = bench_gcm_decrypt_gbps(EVP_aes_128_gcm(), 16384, bytes);
        double g256 = bench_gcm_decrypt_gbps(EVP_aes_256_gcm(), 16384, bytes);
        printf("{\"name\": \"aesref\", \"params\": {\"bytes\": %llu, \"record_bytes\": 16384}, "
               "\"aes128gcm_gbps\": %.4f, \"aes256gcm_gbps\": %.4f}\n",
               (unsigned long long)bytes, g128, g256);
        return 0;
    }
    if (!O.server || !O.ca || !O.ca_key || O.clients == 0 || O.parallel == 0 ||
        O.chunk_bytes < 1024 || O.hb_interval_ms == 0)
        usage();
    if (strcmp(mode, "upload") == 0) {
        O.mode = M_UPLOAD;
        return run_upload();
    }
    if (strcmp(mode, "idle") == 0) {
        O.mode = M_IDLE;
        return run_idle();
    }
    usage();
    return 2;
}
