/*
 * Connections: accept, TLS over memory BIOs, frame reassembly, writes with
 * accounting, model streaming with a bounded send window, back-pressure and
 * closing. Loop thread only.
 *
 * Reads land in one server-wide buffer that OpenSSL reads from directly
 * (connio.c); only bytes left unread are kept, so an idle connection holds no
 * read buffer. Ciphertext goes into pooled write buffers, written at once
 * with uv_try_write when the socket takes it. A model is streamed in 16 KiB
 * slices (one TLS record each) only while less than SEND_WINDOW bytes wait
 * for the socket, so broadcasting to many clients costs at most about
 * SEND_WINDOW + one record per connection, not O(model).
 */
#include "conn.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/x509.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "checksum.h"
#include "cohort_err.h"
#include "dispatch.h"
#include "gossip.h"
#include "log.h"
#include "metrics.h"
#include "round.h"
#include "server.h"
#include "wire.h"

#define SEND_WINDOW (16u << 10)
#define SEND_SLICE (16u << 10)
#define CLOSE_GRACE_S 5.0

static void process(struct conn *c);
static void unlist_stream(struct conn *c);
static int stream_step(struct conn *c, struct model_blob *b);

const char *conn_label(const struct conn *c, char *buf, size_t len)
{
    if (c->name[0])
        snprintf(buf, len, "conn %llu (CN=%s, %s)", (unsigned long long)c->id, c->name, c->peer);
    else
        snprintf(buf, len, "conn %llu (%s)", (unsigned long long)c->id, c->peer);
    return buf;
}

/* Accepted and dialed connections alike: from here on conn_free() must undo it. */
static void enlist(struct conn *c)
{
    struct server *s = c->srv;
    uv_tcp_init(s->loop, &c->tcp);
    c->tcp.data = c;
    c->id = ++s->next_conn_id;
    c->next = s->conn_list;
    if (s->conn_list)
        s->conn_list->prev = c;
    s->conn_list = c;
    s->nconns++;
}

static void conn_free(struct conn *c)
{
    struct server *s = c->srv;
    if (c->link)
        gossip_link_gone(c);
    if (c->prev)
        c->prev->next = c->next;
    else if (s->conn_list == c)
        s->conn_list = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->nconns--;
    unlist_stream(c);
    upload_release(c);
    coh_wire_free(c->pending_begin);
    blob_unref(c->send_blob);
    coh_frame_rx_fini(&c->rx);
    coh_xxh_free(c->up_xxh);
    SSL_free(c->ssl); /* frees both BIOs */
    connio_release(c);
    free(c);
}

static void deref(struct conn *c)
{
    if (--c->refs == 0)
        conn_free(c);
}

static void forget(struct conn *c, const char *why);

static void on_close(uv_handle_t *h)
{
    struct conn *c = h->data;
    c->handle_closed = 1;
    /* Closed without conn_close (a write error inside a TLS call, where closing
     * properly would re-enter OpenSSL): take it out of the server's tables now. */
    if (c->state != CONN_CLOSING) {
        char why[80], label[400];
        snprintf(why, sizeof why, "write failed: %s",
                 c->write_err ? uv_strerror(c->write_err) : "connection lost");
        coh_info("conn", "%s: closed: %s", conn_label(c, label, sizeof label), why);
        forget(c, why);
    }
    deref(c);
}

static void force_close(struct conn *c)
{
    if (!uv_is_closing((uv_handle_t *)&c->tcp))
        uv_close((uv_handle_t *)&c->tcp, on_close);
}

/* The model of c's stream is all written. */
static void stream_done(struct conn *c)
{
    blob_unref(c->send_blob);
    c->send_blob = NULL;
    if (c->offer_pending || c->run_end_pending)
        server_stream_done(c->srv);
}

void conn_write_failed(struct conn *c, int err)
{
    c->write_err = err;
    force_close(c);
}

static void pump(struct conn *c);

static void on_write(uv_write_t *req, int status)
{
    struct wreq *w = (struct wreq *)req;
    struct conn *c = w->c;
    c->tx_pending -= w->len - w->off;
    connio_wreq_put(w);
    if (status < 0 && c->state != CONN_CLOSING)
        conn_close(c, "write failed: %s", uv_strerror(status));
    else if (c->state == CONN_CLOSING && c->tx_pending == 0)
        force_close(c);
    else
        pump(c);
    deref(c);
}

void conn_flush(struct conn *c)
{
    struct wreq *w = c->out;
    if (!w || w->len == 0)
        return;
    c->out = NULL;
    if (c->handle_closed || uv_is_closing((uv_handle_t *)&c->tcp)) {
        connio_wreq_put(w);
        return;
    }
    c->bytes_out += w->len;
    metrics_bytes_out(w->len);
    /* Most writes fit the socket at once: then the buffer goes straight back to
     * the pool. uv_try_write refuses while writes are queued, so order holds. */
    uv_buf_t b = uv_buf_init((char *)w->data, (unsigned int)w->len);
    int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (n == (int)w->len) {
        connio_wreq_put(w);
        return;
    }
    if (n < 0 && n != UV_EAGAIN) {
        connio_wreq_put(w);
        c->write_err = n;
        force_close(c);
        return;
    }
    w->off = n > 0 ? (size_t)n : 0;
    w->c = c;
    b = uv_buf_init((char *)w->data + w->off, (unsigned int)(w->len - w->off));
    c->refs++;
    c->tx_pending += w->len - w->off;
    int rc = uv_write(&w->req, (uv_stream_t *)&c->tcp, &b, 1, on_write);
    if (rc < 0) {
        c->tx_pending -= w->len - w->off;
        connio_wreq_put(w);
        c->refs--;
        c->write_err = rc;
        force_close(c);
    }
}

size_t conn_write_now(struct conn *c, const uint8_t *p, size_t n)
{
    if ((c->out && c->out->len) || c->tx_pending || c->handle_closed ||
        uv_is_closing((uv_handle_t *)&c->tcp))
        return 0;
    uv_buf_t b = uv_buf_init((char *)p, (unsigned int)n);
    int w = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (w < 0) {
        if (w != UV_EAGAIN) {
            c->write_err = w;
            force_close(c);
        }
        return 0;
    }
    c->bytes_out += (size_t)w;
    metrics_bytes_out((size_t)w);
    return (size_t)w;
}

static int ssl_write_all(struct conn *c, const uint8_t *p, size_t n)
{
    while (n > 0) {
        int chunk = n > (1u << 30) ? (1 << 30) : (int)n;
        int w = SSL_write(c->ssl, p, chunk);
        if (w <= 0)
            return COHORT_ETLS;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int conn_send(struct conn *c, const Cohort__Envelope *e)
{
    if (c->state == CONN_CLOSING || c->state == CONN_HANDSHAKE)
        return COHORT_ECLOSED;
    /* The model streams in slices; a frame sent now must not land inside the
     * chunk frame being streamed: finish that chunk first (at most one chunk,
     * past the window). */
    struct model_blob *b = c->send_blob;
    while (b && c->send_off > 0 && !c->write_err && !uv_is_closing((uv_handle_t *)&c->tcp))
        if (stream_step(c, b) < 0)
            return COHORT_ETLS;
    if (b && c->send_idx >= b->nchunks)
        stream_done(c);
    uint8_t stackbuf[1024];
    size_t n = coh_wire_frame_size(e);
    uint8_t *buf = n <= sizeof stackbuf ? stackbuf : malloc(n);
    if (!buf)
        return COHORT_ENOMEM;
    coh_wire_pack_into(e, buf);
    int rc = ssl_write_all(c, buf, n);
    if (buf != stackbuf)
        free(buf);
    conn_flush(c);
    return rc;
}

void conn_send_error(struct conn *c, int code, uint64_t round, int fatal, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    Cohort__Error er = COHORT__ERROR__INIT;
    er.code = code;
    er.message = msg;
    er.round = round;
    er.fatal = fatal;
    Cohort__Envelope e = COHORT__ENVELOPE__INIT;
    e.body_case = COHORT__ENVELOPE__BODY_ERROR;
    e.error = &er;
    conn_send(c, &e);
}

static size_t queued(const struct conn *c)
{
    return c->tx_pending + (c->out ? c->out->len : 0);
}

/* Encrypts the next slice of the model being streamed: a chunk's frame header
 * travels in one record with the start of its payload, the rest of the payload
 * goes from the model data in record-sized slices. */
static int stream_step(struct conn *c, struct model_blob *b)
{
    static uint8_t first[SEND_SLICE];
    size_t doff, dlen;
    int rc;
    if (c->send_off == 0) {
        size_t h = blob_chunk_header(b, c->send_idx, first, &doff, &dlen);
        size_t n = dlen < SEND_SLICE - h ? dlen : SEND_SLICE - h;
        memcpy(first + h, (const uint8_t *)b->data + doff, n);
        rc = ssl_write_all(c, first, h + n);
        c->send_off = n;
    } else {
        doff = c->send_idx * (size_t)b->chunk_bytes;
        dlen = (size_t)(b->total_bytes - doff < b->chunk_bytes ? b->total_bytes - doff
                                                                : b->chunk_bytes);
        size_t n = dlen - c->send_off < SEND_SLICE ? dlen - c->send_off : SEND_SLICE;
        rc = ssl_write_all(c, (const uint8_t *)b->data + doff + c->send_off, n);
        c->send_off += n;
    }
    if (c->send_off >= dlen) {
        c->send_idx++;
        c->send_off = 0;
    }
    return rc;
}

/* Streams c's model while its socket takes it, at most `budget` bytes of model
 * data; returns the bytes sent. The burst's records are gathered and written
 * in one call (connio_burst_*), and the socket is corked meanwhile so what the
 * socket refuses and is queued still leaves in full-size segments instead of
 * one per 16 KiB record (fewer packets through loopback or the NIC, fewer
 * wake-ups of the client); uncorking sends the rest at once. */
static size_t stream_burst(struct conn *c, size_t budget)
{
    struct model_blob *b = c->send_blob;
    size_t sent = 0;
    uv_os_fd_t fd = -1;
    int one = 1, zero = 0;
    if (uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0)
        setsockopt(fd, IPPROTO_TCP, TCP_CORK, &one, sizeof one);
    connio_burst_begin(c);
    while (sent < budget && c->send_idx < b->nchunks && queued(c) < SEND_WINDOW &&
           !c->write_err && !uv_is_closing((uv_handle_t *)&c->tcp)) {
        size_t before = c->send_idx * (size_t)b->chunk_bytes + c->send_off;
        if (stream_step(c, b) < 0) {
            connio_burst_end(c);
            if (fd >= 0)
                setsockopt(fd, IPPROTO_TCP, TCP_CORK, &zero, sizeof zero);
            conn_close(c, "TLS write failed while sending the model");
            return sent + 1;
        }
        conn_flush(c);
        sent += c->send_idx * (size_t)b->chunk_bytes + c->send_off - before;
    }
    connio_burst_end(c);
    if (fd >= 0)
        setsockopt(fd, IPPROTO_TCP, TCP_CORK, &zero, sizeof zero);
    if (c->send_blob && c->send_idx >= b->nchunks)
        stream_done(c);
    return sent;
}

static int can_stream(const struct conn *c)
{
    return c->send_blob && c->state != CONN_CLOSING && queued(c) < SEND_WINDOW &&
           !c->write_err && !c->handle_closed && !uv_is_closing((uv_handle_t *)&c->tcp);
}

static void unlist_stream(struct conn *c)
{
    if (c->stream_pos)
        c->srv->streams[c->stream_pos - 1] = NULL;
    c->stream_pos = 0;
}

/*
 * Model streams run from an idle handle, at most STREAM_BUDGET bytes per turn of
 * the loop, so the loop polls its sockets between bursts: uploads that arrive
 * during a broadcast are read as they come instead of after every model has
 * been written (with sockets whose buffers take a whole model, a broadcast was
 * one burst of the whole round's encryption). Streams are served in the order
 * they began and each as far as its socket takes it, so the first clients get
 * their model soonest and their updates overlap the rest of the broadcast.
 */
#define STREAM_BUDGET (256u << 10)

static void on_stream_idle(uv_idle_t *h)
{
    struct server *s = h->data;
    size_t budget = STREAM_BUDGET, w = 0;
    size_t i = 0;
    for (; i < s->nstreams && budget > 0; i++) {
        struct conn *c = s->streams[i];
        if (c && !c->send_blob)
            unlist_stream(c), c = NULL;
        if (c && can_stream(c)) {
            size_t n = stream_burst(c, budget);
            budget = n < budget ? budget - n : 0;
            c = s->streams[i]; /* only conn_free() clears an entry; it runs later */
            if (c && !c->send_blob)
                unlist_stream(c), c = NULL;
        }
        if (c) {
            s->streams[w++] = c;
            c->stream_pos = w;
        }
    }
    /* Stopped on the budget: keep the rest as they are. */
    for (; i < s->nstreams; i++) {
        struct conn *c = s->streams[i];
        if (c) {
            s->streams[w++] = c;
            c->stream_pos = w;
        }
    }
    s->nstreams = w;
    int more = 0;
    for (i = 0; i < s->nstreams && !more; i++)
        more = s->streams[i] && can_stream(s->streams[i]);
    if (!more)
        uv_idle_stop(h);
}

/* c has model data to stream and its socket may take it: let the idle handle run. */
static void pump(struct conn *c)
{
    struct server *s = c->srv;
    if (!c->send_blob || c->state == CONN_CLOSING)
        return;
    if (!c->stream_pos) {
        if (s->nstreams == s->capstreams) {
            size_t ncap = s->capstreams ? s->capstreams * 2 : 64;
            struct conn **nl = realloc(s->streams, ncap * sizeof *nl);
            if (!nl) {
                conn_close(c, "out of memory for a model stream");
                return;
            }
            s->streams = nl;
            s->capstreams = ncap;
        }
        s->streams[s->nstreams++] = c;
        c->stream_pos = s->nstreams;
    }
    if (!s->stream_idle_init) {
        uv_idle_init(s->loop, &s->stream_idle);
        s->stream_idle.data = s;
        s->stream_idle_init = 1;
    }
    if (can_stream(c))
        uv_idle_start(&s->stream_idle, on_stream_idle);
}

void conn_streams_fini(struct server *s)
{
    for (size_t i = 0; i < s->nstreams; i++)
        if (s->streams[i])
            s->streams[i]->stream_pos = 0;
    free(s->streams);
    s->streams = NULL;
    s->nstreams = s->capstreams = 0;
    connio_burst_free();
    if (s->stream_idle_init) {
        uv_close((uv_handle_t *)&s->stream_idle, NULL);
        s->stream_idle_init = 0;
    }
}

void conn_finish_blob(struct conn *c)
{
    struct model_blob *b = c->send_blob;
    if (!b)
        return;
    while (c->send_idx < b->nchunks && !c->write_err && !uv_is_closing((uv_handle_t *)&c->tcp))
        if (stream_step(c, b) < 0)
            break;
    blob_unref(b);
    c->send_blob = NULL;
    conn_flush(c);
}

void conn_send_blob(struct conn *c, struct model_blob *b)
{
    blob_unref(c->send_blob);
    c->send_blob = blob_ref(b);
    c->send_idx = 0;
    c->send_off = 0;
    pump(c);
}

void conn_close(struct conn *c, const char *fmt, ...)
{
    if (c->state == CONN_CLOSING)
        return;
    char why[512], label[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    coh_info("conn", "%s: closing: %s", conn_label(c, label, sizeof label), why);
    forget(c, why);
    uv_read_stop((uv_stream_t *)&c->tcp);
    /* A TLS close_notify after a final Error lets the peer read the reason. */
    if (SSL_is_init_finished(c->ssl)) {
        SSL_shutdown(c->ssl);
        conn_flush(c);
    }
    if (c->tx_pending == 0)
        force_close(c);
}

/* Takes c out of the server's tables and the round; it is CLOSING afterwards. */
static void forget(struct conn *c, const char *why)
{
    struct server *s = c->srv;
    int was_ready = c->state == CONN_READY;
    c->state = CONN_CLOSING;
    c->closing_at = server_now(s);
    if (idmap_get(&s->conns_by_id, c->id) == c)
        idmap_del(&s->conns_by_id, c->id);
    if (c->client_id && idmap_get(&s->conns_by_client, (uint64_t)c->client_id) == c)
        idmap_del(&s->conns_by_client, (uint64_t)c->client_id);
    if (was_ready && c->evaluator)
        s->nevaluators--;
    else if (was_ready)
        s->nready--;
    round_conn_gone(s, c, why);
    upload_release(c);
    blob_unref(c->send_blob);
    c->send_blob = NULL;
}

void conn_pause(struct conn *c)
{
    if (!c->paused) {
        c->paused = 1;
        uv_read_stop((uv_stream_t *)&c->tcp);
    }
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct conn *c = h->data;
    buf->base = (char *)c->srv->readbuf;
    /* Whatever a read brings in beyond what is processed stays with the
     * connection (e.g. the start of an upload that must wait for a slot):
     * only uploading connections read in large blocks. */
    buf->len = c->up.active ? sizeof c->srv->readbuf : 16384;
    (void)suggested;
}

/* A peer that goes away in the middle of a frame sent a truncated message: say so. */
static void close_peer_gone(struct conn *c, const char *what)
{
    size_t pend = coh_frame_rx_pending(&c->rx);
    if (c->direct_left)
        conn_close(c, "%s inside a frame (%zu of %zu bytes of an update chunk's data received)",
                   what, c->direct_len - c->direct_left, c->direct_len);
    else if (pend)
        conn_close(c, "%s inside a frame (%zu bytes of an incomplete frame received)", what, pend);
    else
        conn_close(c, "%s", what);
}

static void on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    struct conn *c = st->data;
    if (nread == 0 || c->state == CONN_CLOSING)
        return;
    if (nread < 0) {
        if (nread == UV_EOF)
            close_peer_gone(c, c->state == CONN_HANDSHAKE ? "peer closed during the TLS handshake"
                                                          : "peer closed the connection");
        else
            conn_close(c, "read error: %s", uv_strerror((int)nread));
        return;
    }
    c->last_rx = server_now(c->srv);
    c->bytes_in += (uint64_t)nread;
    metrics_bytes_in((uint64_t)nread);
    if (c->spill_len > c->spill_off) {
        /* Older unread bytes go first: queue these behind them. */
        if (connio_keep_input(c, (const uint8_t *)buf->base, (size_t)nread) < 0) {
            conn_close(c, "out of memory buffering input");
            return;
        }
        process(c);
        return;
    }
    c->in = (const uint8_t *)buf->base;
    c->in_len = (size_t)nread;
    process(c);
    /* The shared read buffer is reused by the next read: keep what is left. */
    if (c->in_len > 0 && c->state != CONN_CLOSING &&
        connio_keep_input(c, c->in, c->in_len) < 0)
        conn_close(c, "out of memory buffering input");
    c->in = NULL;
    c->in_len = 0;
}

void conn_resume(struct conn *c)
{
    if (!c->paused || c->state == CONN_CLOSING)
        return;
    c->paused = 0;
    /* The wait was our back-pressure, not a slow sender: restart that clock. */
    c->partial_since = 0;
    process(c);
    if (c->state != CONN_CLOSING && !c->paused)
        uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, on_read);
}

static const char *ssl_reason(SSL *ssl, char *buf, size_t len)
{
    long vr = SSL_get_verify_result(ssl);
    unsigned long e = ERR_peek_last_error();
    if (vr != X509_V_OK) {
        snprintf(buf, len, "certificate verify failed: %s", X509_verify_cert_error_string(vr));
    } else if (e) {
        char tmp[256];
        ERR_error_string_n(e, tmp, sizeof tmp);
        const char *r = ERR_reason_error_string(e);
        snprintf(buf, len, "%s", r ? r : tmp);
    } else {
        snprintf(buf, len, "protocol error");
    }
    ERR_clear_error();
    return buf;
}

/* Binds the connection to its certificate's subject CN. */
static int take_identity(struct conn *c)
{
    X509 *cert = SSL_get0_peer_certificate(c->ssl);
    if (!cert) {
        if (c->srv->cfg.require_client_cert) {
            conn_close(c, "no client certificate");
            return -1;
        }
        snprintf(c->name, sizeof c->name, "anon-%s", c->peer);
        return 0;
    }
    char cn[256];
    int n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn, sizeof cn);
    if (n <= 0 || n >= (int)sizeof cn) {
        conn_close(c, "client certificate has no usable subject CN");
        return -1;
    }
    for (int i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)cn[i];
        if (ch < 0x20 || ch == 0x7f) {
            conn_close(c, "client certificate CN contains control characters");
            return -1;
        }
    }
    snprintf(c->name, sizeof c->name, "%s", cn);
    if (!c->outgoing && !server_client_allowed(c->srv, c->name)) {
        char label[400];
        coh_warn("conn", "%s: client '%s' is not in the allow-list; refusing",
                 conn_label(c, label, sizeof label), c->name);
        c->state = CONN_HELLO; /* lets the Error frame through */
        conn_send_error(c, COHORT_ECERT, 0, 1, "client '%s' is not allowed in this federation",
                        c->name);
        conn_close(c, "not in the allow-list");
        return -1;
    }
    return 0;
}

static void handshake(struct conn *c)
{
    ERR_clear_error();
    int rc = SSL_do_handshake(c->ssl);
    if (rc == 1) {
        conn_flush(c);
        if (take_identity(c) < 0)
            return;
        c->state = CONN_HELLO;
        char label[400];
        coh_debug("conn", "%s: TLS %s established", conn_label(c, label, sizeof label),
                  SSL_get_version(c->ssl));
        if (c->outgoing)
            gossip_link_connected(c);
        return;
    }
    int err = SSL_get_error(c->ssl, rc);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
        conn_flush(c);
        return;
    }
    char why[300];
    ssl_reason(c->ssl, why, sizeof why);
    conn_flush(c); /* deliver the alert so the peer learns why */
    char label[400];
    coh_warn("conn", "%s: TLS handshake failed: %s; refusing", conn_label(c, label, sizeof label),
             why);
    c->state = CONN_CLOSING;
    c->closing_at = server_now(c->srv);
    idmap_del(&c->srv->conns_by_id, c->id);
    uv_read_stop((uv_stream_t *)&c->tcp);
    if (c->tx_pending == 0)
        force_close(c);
}

/* When the frame arriving is an UpdateChunk that continues this connection's
 * upload, moves the data already buffered into the staging buffer and
 * arranges for the rest to be decrypted straight there: the chunk needs no
 * frame-sized receive buffer and no copy. Returns 1 when it did. */
static int start_direct(struct conn *c)
{
    struct coh_frame_rx *rx = &c->rx;
    size_t have = rx->end - rx->start;
    if (have < COH_FRAME_HDR)
        return 0;
    const uint8_t *f = rx->buf + rx->start;
    size_t flen = coh_frame_get_len(f);
    if (flen > rx->max_frame || have >= COH_FRAME_HDR + flen)
        return 0;
    struct coh_chunk_view v;
    size_t pos;
    if (coh_wire_peek_update_head(f + COH_FRAME_HDR, have - COH_FRAME_HDR, flen, &v, &pos) != 1)
        return 0;
    uint8_t *dst = round_direct_begin(c->srv, c, &v);
    if (!dst)
        return 0;
    size_t got = have - COH_FRAME_HDR - pos;
    memcpy(dst, f + COH_FRAME_HDR + pos, got);
    rx->start = rx->end = 0;
    c->direct_len = v.len;
    c->direct_left = v.len - got;
    c->direct_dst = dst + got;
    if (got)
        round_direct_data(c->srv, c, got, c->direct_left == 0);
    if (c->direct_left == 0)
        c->direct_dst = NULL;
    return 1;
}

static void process(struct conn *c)
{
    static uint8_t drop[16384];
    if (c->state == CONN_HANDSHAKE) {
        handshake(c);
        if (c->state == CONN_HANDSHAKE || c->state == CONN_CLOSING)
            return;
    }
    while (c->state != CONN_CLOSING && !c->paused) {
        const uint8_t *f;
        size_t len;
        int r = 0;
        while (c->state != CONN_CLOSING && !c->paused &&
               (r = coh_frame_next(&c->rx, &f, &len)) == 1)
            dispatch_frame(c, f, len);
        if (c->state == CONN_CLOSING || c->paused)
            break;
        if (r < 0) {
            conn_send_error(c, COHORT_ETOOBIG, 0, 1,
                            "frame of %u bytes exceeds max_frame_bytes=%u",
                            coh_frame_get_len(c->rx.buf + c->rx.start), c->srv->cfg.max_frame_bytes);
            conn_close(c, "frame of %u bytes exceeds max_frame_bytes=%u",
                       coh_frame_get_len(c->rx.buf + c->rx.start), c->srv->cfg.max_frame_bytes);
            break;
        }
        if (c->direct_left == 0 && c->up.active)
            (void)start_direct(c);
        uint8_t *p;
        size_t avail;
        if (c->direct_left > 0) {
            p = c->direct_dst ? c->direct_dst : drop;
            avail = c->direct_dst ? c->direct_left
                                  : (c->direct_left < sizeof drop ? c->direct_left : sizeof drop);
        } else if ((c->up.active ? coh_frame_rx_reserve(&c->rx, 16384, &p, &avail)
                                 : coh_frame_rx_space(&c->rx, 16384, &p, &avail)) < 0) {
            conn_close(c, "out of memory for the receive buffer");
            break;
        }
        ERR_clear_error();
        int n = SSL_read(c->ssl, p, avail > INT32_MAX ? INT32_MAX : (int)avail);
        if (n > 0 && c->direct_left > 0) {
            c->direct_left -= (size_t)n;
            if (c->direct_dst) {
                c->direct_dst += n;
                /* Checked while the piece is in cache; may refuse the update. */
                round_direct_data(c->srv, c, (size_t)n, c->direct_left == 0);
            }
            if (c->direct_left == 0)
                c->direct_dst = NULL;
            continue;
        }
        if (n > 0) {
            coh_frame_rx_commit(&c->rx, (size_t)n);
            continue;
        }
        int err = SSL_get_error(c->ssl, n);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
            break;
        if (err == SSL_ERROR_ZERO_RETURN) {
            close_peer_gone(c, "peer closed the TLS session");
        } else {
            char why[300];
            conn_close(c, "TLS error: %s", ssl_reason(c->ssl, why, sizeof why));
        }
        break;
    }
    if (c->state != CONN_CLOSING) {
        conn_flush(c);
        if (!c->paused)
            coh_frame_rx_trim(&c->rx, 0);
        else
            /* Waiting for an upload slot may take a while, and at N = 1000 most
             * connections wait at once: keep only the bytes of the update already
             * decrypted, not the 32 KiB buffer they came in (16-28 KiB each). */
            coh_frame_rx_shrink(&c->rx);
        /* Slow senders (one byte a second) keep a connection "active" forever; a
         * frame or TLS record that stays incomplete too long closes it instead. */
        int partial = coh_frame_rx_pending(&c->rx) > 0 || connio_in_pending(c) > 0 ||
                      c->direct_left > 0;
        if (!partial)
            c->partial_since = 0;
        else if (c->partial_since == 0)
            c->partial_since = server_now(c->srv);
    }
}

void conn_on_connection(uv_stream_t *listener, int status)
{
    struct server *s = listener->data;
    if (status < 0) {
        coh_warn("listener", "accept failed: %s", uv_strerror(status));
        return;
    }
    struct conn *c = calloc(1, sizeof *c);
    if (!c) {
        coh_err("listener", "out of memory accepting a connection");
        return;
    }
    c->srv = s;
    c->refs = 1;
    enlist(c);
    c->state = CONN_CLOSING; /* until fully set up */
    if (uv_accept(listener, (uv_stream_t *)&c->tcp) < 0) {
        force_close(c);
        return;
    }
    struct sockaddr_storage ss;
    int sl = sizeof ss;
    snprintf(c->peer, sizeof c->peer, "?");
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
        char ip[INET6_ADDRSTRLEN] = "?";
        int port = 0;
        if (ss.ss_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)&ss;
            uv_ip4_name(a, ip, sizeof ip);
            port = ntohs(a->sin_port);
        } else if (ss.ss_family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
            uv_ip6_name(a, ip, sizeof ip);
            port = ntohs(a->sin6_port);
        }
        snprintf(c->peer, sizeof c->peer, "%s:%d", ip, port);
    }
    if (s->stopping || s->nconns > s->cfg.max_connections) {
        coh_warn("listener", "conn %llu (%s): refused: %s", (unsigned long long)c->id, c->peer,
                 s->stopping ? "server is stopping"
                             : "max_connections reached; raise --max-connections");
        force_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    c->ssl = SSL_new(s->ssl_ctx);
    if (!c->ssl || connio_attach(c) < 0) {
        force_close(c);
        return;
    }
    SSL_set_accept_state(c->ssl);
    coh_frame_rx_init(&c->rx, s->cfg.max_frame_bytes);
    c->state = CONN_HANDSHAKE;
    c->accepted_at = c->last_rx = server_now(s);
    idmap_put(&s->conns_by_id, c->id, c);
    uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, on_read);
}

struct dial_req {
    uv_connect_t req;
    struct conn *c;
};

static void on_dialed(uv_connect_t *req, int status)
{
    struct dial_req *d = (struct dial_req *)req;
    struct conn *c = d->c;
    free(d);
    if (c->state != CONN_CLOSING) {
        if (status < 0) {
            conn_close(c, "cannot connect: %s", uv_strerror(status));
        } else {
            uv_tcp_nodelay(&c->tcp, 1);
            c->last_rx = server_now(c->srv);
            uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, on_read);
            process(c); /* writes the ClientHello */
        }
    }
    deref(c);
}

struct conn *conn_dial(struct server *s, SSL_CTX *ctx, const struct sockaddr *addr,
                       const char *label, const char *host)
{
    struct conn *c = calloc(1, sizeof *c);
    struct dial_req *d = calloc(1, sizeof *d);
    if (!c || !d) {
        free(c);
        free(d);
        return NULL;
    }
    c->srv = s;
    c->refs = 1;
    c->outgoing = 1;
    c->state = CONN_HANDSHAKE;
    snprintf(c->peer, sizeof c->peer, "%s", label);
    c->ssl = SSL_new(ctx);
    int ok = c->ssl && connio_attach(c) == 0;
    if (ok) {
        SSL_set_connect_state(c->ssl);
        /* The peer certificate must name the host we dialed, as for any TLS client. */
        X509_VERIFY_PARAM *vp = SSL_get0_param(c->ssl);
        if (X509_VERIFY_PARAM_set1_ip_asc(vp, host) != 1) {
            ERR_clear_error();
            ok = SSL_set_tlsext_host_name(c->ssl, host) == 1 && SSL_set1_host(c->ssl, host) == 1;
        }
    }
    if (!ok) {
        SSL_free(c->ssl); /* frees the BIOs once they were set */
        ERR_clear_error();
        free(c);
        free(d);
        return NULL;
    }
    enlist(c);
    coh_frame_rx_init(&c->rx, s->cfg.max_frame_bytes);
    c->accepted_at = c->last_rx = server_now(s);
    idmap_put(&s->conns_by_id, c->id, c);
    d->c = c;
    c->refs++; /* held by the connect request */
    int rc = uv_tcp_connect(&d->req, &c->tcp, addr, on_dialed);
    if (rc < 0) {
        free(d);
        c->refs--;
        /* The caller gets the conn and learns of the failure when it closes. */
        conn_close(c, "cannot connect: %s", uv_strerror(rc));
    }
    return c;
}

void upload_release(struct conn *c)
{
    struct upload *u = &c->up;
    if (c->direct_left)
        c->direct_dst = NULL; /* the rest of the chunk in flight is dropped */
    if (!u->active)
        return;
    staging_put(c->srv, u->buf);
    memset(u, 0, sizeof *u);
    round_slot_freed(c->srv);
}

void conn_sweep(struct server *s)
{
    double now = server_now(s);
    struct conn *c = s->conn_list, *next;
    for (; c; c = next) {
        next = c->next;
        if (c->state == CONN_CLOSING) {
            if (now - c->closing_at > CLOSE_GRACE_S)
                force_close(c);
            continue;
        }
        if (c->state == CONN_HANDSHAKE || c->state == CONN_HELLO) {
            if ((now - c->accepted_at) * 1000.0 > s->cfg.handshake_timeout_ms)
                conn_close(c, "no TLS handshake and Hello within %u ms",
                           s->cfg.handshake_timeout_ms);
        } else if ((now - c->last_rx) * 1000.0 > s->cfg.idle_timeout_ms && !c->paused &&
                   !round_awaits(s, c)) {
            conn_close(c, "idle for more than %u ms", s->cfg.idle_timeout_ms);
        } else if (c->partial_since > 0 && !c->paused &&
                   (now - c->partial_since) * 1000.0 > s->cfg.frame_timeout_ms) {
            conn_send_error(c, COHORT_ETIMEDOUT, 0, 1, "a frame took longer than %u ms to arrive",
                            s->cfg.frame_timeout_ms);
            conn_close(c, "incomplete frame for more than %u ms (slow sender)",
                       s->cfg.frame_timeout_ms);
        } else if (c->up.active && (now - c->up.started) * 1000.0 > s->cfg.upload_timeout_ms) {
            round_upload_expired(s, c);
        }
    }
}
