/*
 * Ciphertext I/O of a connection: two small OpenSSL BIO methods in place of
 * memory BIOs.
 *
 * Memory BIOs cost two copies per byte (socket buffer -> read BIO -> OpenSSL,
 * OpenSSL -> write BIO -> write request) and keep their peak allocation after
 * they drain, so every connection that was ever sent a model kept ~350 KiB.
 * Here the read BIO hands OpenSSL the loop's shared read buffer directly and
 * keeps only the bytes left unread when the connection pauses or a record is
 * incomplete (freed once consumed); the write BIO writes ciphertext straight
 * into pooled fixed-size write buffers that conn.c tries to write at once and
 * queues only what the socket does not take. Loop thread only.
 */
#include <openssl/bio.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"
#include "log.h"

/* Write buffers come from a small server-wide pool, so a broadcast to many
 * connections reuses the same few blocks instead of faulting in new ones. */
#define POOL_KEEP 64
static struct wreq *pool[POOL_KEEP];
static size_t npool;
static BIO_METHOD *read_meth, *write_meth;
#define CONNIO_DIRECT_MIN 4096

struct wreq *connio_wreq_get(void)
{
    if (npool > 0)
        return pool[--npool];
    struct wreq *w = malloc(sizeof *w);
    if (w)
        w->len = w->off = 0;
    return w;
}

void connio_wreq_put(struct wreq *w)
{
    if (!w)
        return;
    if (npool < POOL_KEEP) {
        w->len = w->off = 0;
        pool[npool++] = w;
        return;
    }
    free(w);
}

size_t connio_in_pending(const struct conn *c)
{
    return c->in_len + (c->spill_len - c->spill_off);
}

static int read_ex(BIO *b, char *out, size_t outl, size_t *got)
{
    struct conn *c = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    size_t n = 0;
    if (c->spill_len > c->spill_off) {
        n = c->spill_len - c->spill_off;
        if (n > outl)
            n = outl;
        memcpy(out, c->spill + c->spill_off, n);
        c->spill_off += n;
        if (c->spill_off == c->spill_len) {
            free(c->spill);
            c->spill = NULL;
            c->spill_off = c->spill_len = c->spill_cap = 0;
        }
    } else if (c->in_len > 0) {
        n = c->in_len < outl ? c->in_len : outl;
        memcpy(out, c->in, n);
        c->in += n;
        c->in_len -= n;
    }
    if (n == 0) {
        BIO_set_retry_read(b); /* "wait for more", never end of stream */
        *got = 0;
        return 0;
    }
    *got = n;
    return 1;
}

int connio_keep_input(struct conn *c, const uint8_t *p, size_t n)
{
    if (n == 0)
        return 0;
    if (c->spill_off > 0 && c->spill_off == c->spill_len)
        c->spill_off = c->spill_len = 0;
    if (c->spill_len + n > c->spill_cap) {
        size_t have = c->spill_len - c->spill_off;
        size_t ncap = have + n;
        uint8_t *nb = malloc(ncap);
        if (!nb)
            return -1;
        if (have)
            memcpy(nb, c->spill + c->spill_off, have);
        free(c->spill);
        c->spill = nb;
        c->spill_cap = ncap;
        c->spill_len = have;
        c->spill_off = 0;
    }
    memcpy(c->spill + c->spill_len, p, n);
    c->spill_len += n;
    return 0;
}

/* A model stream's burst of records is gathered here and written BURST_CAP at
 * a time: one write per 16 KiB record cost cohortd ~5 % more CPU per round at
 * (50, 1e6) (docs/performance.md), the copy into this buffer (in cache) less
 * than the system calls it saves. What the socket does not take goes into
 * write buffers as before, and the rest of the burst goes record by record,
 * so a slow reader holds at most one block besides its window. */
#define BURST_CAP ((size_t)(64u << 10))
static uint8_t *burst_buf;
static size_t burst_len;
static struct conn *burst_conn;

static int out_append(struct conn *c, const uint8_t *data, size_t len);

void connio_burst_begin(struct conn *c)
{
    if (!burst_buf)
        burst_buf = malloc(BURST_CAP);
    if (burst_buf && !(c->out && c->out->len) && !c->tx_pending)
        burst_conn = c;
}

void connio_burst_free(void)
{
    free(burst_buf);
    burst_buf = NULL;
    burst_len = 0;
    burst_conn = NULL;
}

/* Writes what is gathered; 1 when the socket took all of it. */
static int burst_write(struct conn *c)
{
    size_t n = burst_len;
    burst_len = 0;
    if (n == 0)
        return 1;
    size_t done = conn_write_now(c, burst_buf, n);
    if (done == n || c->write_err)
        return done == n;
    /* OpenSSL counts these records as written: losing them breaks the stream. */
    if (out_append(c, burst_buf + done, n - done) < 0) {
        conn_write_failed(c, UV_ENOMEM);
        return 0;
    }
    conn_flush(c);
    return 0;
}

void connio_burst_end(struct conn *c)
{
    if (burst_conn != c)
        return;
    burst_conn = NULL;
    burst_write(c);
}

/* Copies ciphertext behind what is already gathered or queued; 0, or -1 when no
 * write buffer could be had. */
static int out_append(struct conn *c, const uint8_t *data, size_t len)
{
    size_t done = 0;
    while (done < len) {
        if (c->out && c->out->len == sizeof c->out->data)
            conn_flush(c);
        if (!c->out && !(c->out = connio_wreq_get())) {
            coh_err("conn", "conn %llu: out of memory for TLS output",
                    (unsigned long long)c->id);
            return -1;
        }
        size_t room = sizeof c->out->data - c->out->len;
        size_t n = len - done < room ? len - done : room;
        memcpy(c->out->data + c->out->len, data + done, n);
        c->out->len += n;
        done += n;
    }
    return 0;
}

static int write_ex(BIO *b, const char *data, size_t len, size_t *written)
{
    struct conn *c = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    size_t done = 0;
    if (burst_conn == c && burst_len + len > BURST_CAP && !burst_write(c))
        burst_conn = NULL; /* the socket is full: the window applies again */
    if (burst_conn == c && len <= BURST_CAP) {
        memcpy(burst_buf + burst_len, data, len);
        burst_len += len;
        *written = len;
        return 1;
    }
    /* A whole record (a model slice) goes to the socket from OpenSSL's buffer
     * when nothing waits before it; only what the socket refuses is copied.
     * Small records are gathered, so a burst of small frames is one write. */
    if (len >= CONNIO_DIRECT_MIN)
        done = conn_write_now(c, (const uint8_t *)data, len);
    if (done < len && out_append(c, (const uint8_t *)data + done, len - done) < 0)
        return 0;
    *written = len;
    return 1;
}

static long ctrl(BIO *b, int cmd, long num, void *ptr)
{
    struct conn *c = BIO_get_data(b);
    (void)num;
    (void)ptr;
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        return 1; /* conn.c writes the gathered output after each TLS call */
    case BIO_CTRL_PENDING:
        return c && b == SSL_get_rbio(c->ssl) ? (long)connio_in_pending(c) : 0;
    case BIO_CTRL_WPENDING:
        return c && c->out ? (long)c->out->len : 0;
    case BIO_CTRL_EOF:
        return 0;
    default:
        return 0;
    }
}

static int create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

int connio_init(void)
{
    if (read_meth)
        return 0;
    int idx = BIO_get_new_index();
    read_meth = BIO_meth_new(idx | BIO_TYPE_SOURCE_SINK, "cohort conn read");
    write_meth = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "cohort conn write");
    if (!read_meth || !write_meth || idx < 0 || !BIO_meth_set_read_ex(read_meth, read_ex) ||
        !BIO_meth_set_ctrl(read_meth, ctrl) || !BIO_meth_set_create(read_meth, create) ||
        !BIO_meth_set_write_ex(write_meth, write_ex) || !BIO_meth_set_ctrl(write_meth, ctrl) ||
        !BIO_meth_set_create(write_meth, create))
        return -1;
    return 0;
}

int connio_attach(struct conn *c)
{
    if (connio_init() < 0)
        return -1;
    BIO *r = BIO_new(read_meth), *w = BIO_new(write_meth);
    if (!r || !w) {
        BIO_free(r);
        BIO_free(w);
        return -1;
    }
    BIO_set_data(r, c);
    BIO_set_data(w, c);
    SSL_set_bio(c->ssl, r, w);
    return 0;
}

void connio_release(struct conn *c)
{
    free(c->spill);
    c->spill = NULL;
    c->spill_off = c->spill_len = c->spill_cap = 0;
    connio_wreq_put(c->out);
    c->out = NULL;
}
